"""Helpers for the command tests: demo-task JSONL data and ways to run the CLI
(in-process through ``loraforge.cli.main`` where a real process is not the point, else as a
subprocess with one thread, as a user would).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from loraforge.demo.tasks import write_splits

hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr would hide what the tests check

# The settings most tests train with: float32 (exact comparisons), a high learning rate, two
# packed rows (about four examples) per step so that a step is quick, no progress bar, every step
# run (early stopping off: tests/train/test_early_stop.py covers it).
FAST = ["--precision", "fp32", "--lr", "0.02", "--batch-size", "2", "--seed", "0", "--no-progress", "--patience", "0"]


def write_data(out: Path, n_train: int = 60, n_test: int = 8) -> dict[str, Path]:
    return write_splits(out, n_train=n_train, n_test=n_test, seed=0, task="extract")


def env() -> dict[str, str]:
    """The environment of a CLI subprocess: one thread (the machine is shared), no network."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def command(*args) -> list[str]:
    return [sys.executable, "-m", "loraforge", *map(str, args)]


def run_cli(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), env=env(), capture_output=True, text=True, timeout=timeout)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "adapter_model.safetensors")


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(a: Path, b: Path, atol: float = 0.0):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        if atol:
            torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(ta[key], tb[key]), f"{key} differs"


def one_line_error(stderr: str) -> str:
    """The single line a LoraError prints; fails on a traceback or extra lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def kill_at_first_checkpoint(argv: list, out: Path, poll: float = 0.005) -> int:
    """Start `loraforge *argv` as a subprocess, kill -9 it as soon as its first checkpoint is
    complete, and return the step of the newest complete checkpoint left behind."""
    import signal
    import time

    from loraforge.train.checkpoint import find_latest

    process = subprocess.Popen(command(*argv), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (Path(out) / "checkpoints" / "latest").exists():
            assert process.poll() is None, f"training ended before its first checkpoint: {process.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(poll)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (Path(out) / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    return int(find_latest(out).name.removeprefix("step-"))
