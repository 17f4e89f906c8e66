"""Benchmark multi-adapter serving (not a test). Prints a markdown table.

On the embedded SmolLM2-135M-Instruct, N concurrent requests (prompt ~P tokens, T new tokens,
all arriving at once) are served by the loraforge engine, spread over 1, 8 and N distinct
adapters (random rank-8 adapters on every linear layer), and compared within one run against:

  engine, base only       the same engine, no adapter in any row
  PEFT, switching         what one writes without a server: transformers `generate` on a PEFT
                          model, `set_adapter` per request, one request at a time
  HF generate, bare base  transformers' own batched `generate` on the base model (no adapters)

Columns: throughput (generated tokens / wall time), time to first token (mean over requests,
from the moment all requests were submitted) and per-token latency (mean over requests of the
time between their tokens). Adapters are loaded into the engine before timing (warm cache).

    .venv/bin/python bench/serve.py                          # 64 requests, 64 new tokens
    .venv/bin/python bench/serve.py --requests 16 --new-tokens 16 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.core.config import LoraConfig
from loraforge.core.io import save_adapter
from loraforge.core.ops import attach, unload
from loraforge.models import DEFAULT_MODEL, load_model, load_tokenizer
from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.api import preload
from loraforge.serve.engine import Engine, GenerationRequest, SamplingParams
from loraforge.serve.kvcache import new_cache

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by --clock

TEXT = ("Low-rank adaptation trains two small matrices instead of the full weight. The quick brown fox jumps "
        "over the lazy dog while the model answers questions about capitals, translations, haiku and sums. ")


@dataclass
class Result:
    name: str
    tokens: int
    seconds: float
    ttft: float  # mean seconds
    per_token: float  # mean seconds between tokens of one request

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--requests", type=int, default=64, help="concurrent requests")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=64)
    p.add_argument("--adapters", default="1,8,all", help="distinct adapter counts ('all' = one per request)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-peft", action="store_true", help="skip the PEFT switching baseline (slowest)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over all setups; the median run is reported")
    p.add_argument("--pairs", type=int, default=15,
                   help="alternating decode steps for the paired overhead measurement (0: skip)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="cpu: time.process_time, immune to other processes on a shared machine (use with "
                        "--threads 1: then it is the time the run takes on one idle core)")
    return p.parse_args(argv)


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens."""
    prompts = []
    for i in range(n):
        ids = tokenizer(f"Request {i}: " + TEXT * (length // 8 + 2))["input_ids"]
        prompts.append(ids[:length])
    return prompts


def make_adapters(model, n: int, rank: int, out: Path) -> list[Path]:
    """n random rank-`rank` adapters on every linear layer, saved with loraforge (B random)."""
    paths = []
    for i in range(n):
        attach(model, LoraConfig(r=rank, alpha=2.0 * rank, target_modules="all-linear"), "bench", activate=False)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B.bench" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        paths.append(save_adapter(model, out / f"adapter{i:03d}", "bench"))
        unload(model)
    return paths


# --- the loraforge engine ----------------------------------------------------------------------
def run_engine(engine: Engine, prompts, names: list[str | None], new_tokens: int, label: str) -> Result:
    for name in sorted({n for n in names if n}):  # warm adapter cache: loads are not timed
        engine.call(lambda n=name: preload(engine, n)).result()
    stamps: dict[int, list[float]] = {}
    engine.on_token = lambda seq, now: stamps.setdefault(seq.id, []).append(clock())
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = clock()
    seqs = [engine.submit(GenerationRequest(p, n, params), lambda ev: None) for p, n in zip(prompts, names)]
    while engine.busy:
        engine.step()
    seconds = clock() - start
    engine.on_token = None
    return summarize(label, [stamps[s.id] for s in seqs], start, seconds)


def summarize(label: str, stamps: list[list[float]], start: float, seconds: float) -> Result:
    tokens = sum(len(s) for s in stamps)
    ttft = sum(s[0] - start for s in stamps) / len(stamps)
    gaps = [(s[-1] - s[0]) / (len(s) - 1) for s in stamps if len(s) > 1]
    return Result(label, tokens, seconds, ttft, sum(gaps) / max(1, len(gaps)))


def paired_overhead(engine: Engine, prompts, names: list[str], pairs: int) -> dict[str, float]:
    """Decode-step time with adapters / without, from forward passes in strict alternation on one
    batch (the median ratio: robust to a noisy machine). 'one': every row the same adapter;
    'distinct': row i adapter names[i]."""
    model, kernel, rows = engine.model, engine.kernel, len(prompts)
    slots = {name: engine.adapters.acquire(name) for name in set(names)}
    configs = {"one": [slots[names[0]]] * rows, "distinct": [slots[n] for n in names]}
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        cache = new_cache(model.config)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{engine.cache_arg: cache})

        def step(slot_rows: list[int]) -> float:
            kernel.set_rows(slot_rows, reuse=True)
            start = clock()
            model(input_ids=ids[:, -1:], use_cache=True, logits_to_keep=1, **{engine.cache_arg: cache})
            seconds = clock() - start
            for layer in cache.layers:  # drop the appended column: every step sees the same cache
                layer.keys, layer.values = layer.keys[:, :, :ids.shape[1]], layer.values[:, :, :ids.shape[1]]
            return seconds

        ratios = {key: [step(r) / step([0] * rows) for _ in range(pairs)] for key, r in configs.items()}
    kernel.reset_rows()
    for name in names:
        engine.adapters.release(name)
    return {key: sorted(v)[len(v) // 2] for key, v in ratios.items()}


# --- baselines -------------------------------------------------------------------------------------
class FirstCall:
    """A logits processor that records when generate produced each token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(clock())
        return scores


def generate_fixed(model, ids: torch.Tensor, new_tokens: int, pad_id: int) -> list[float]:
    from transformers import LogitsProcessorList

    clock = FirstCall()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                   logits_processor=LogitsProcessorList([clock]))
    return clock.times


def peft_with_adapters(model_name: str, paths: list[Path], names: list[str]):
    from peft import PeftModel

    where = {p.name: str(p) for p in paths}
    model = PeftModel.from_pretrained(load_model(model_name, dtype="float32", device="cpu"), where[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(where[name], adapter_name=name)
    return model.eval()


def run_peft(model, prompts, names: list[str], new_tokens: int, pad_id: int) -> Result:
    generate_fixed(model, torch.tensor([prompts[0]]), 2, pad_id)  # warm-up
    start, stamps = clock(), []
    with torch.inference_mode():
        for prompt, name in zip(prompts, names):
            model.set_adapter(name)
            stamps.append(generate_fixed(model, torch.tensor([prompt]), new_tokens, pad_id))
    return summarize("PEFT generate, set_adapter per request (one at a time)", stamps, start, clock() - start)


def run_hf_batched(model, prompts, new_tokens: int, pad_id: int) -> Result:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    generate_fixed(model, ids[:2, :8], 2, pad_id)  # warm-up
    start = clock()
    with torch.inference_mode():
        times = generate_fixed(model, ids, new_tokens, pad_id)
    seconds = clock() - start
    return summarize("transformers batched generate, bare base", [times] * len(prompts), start, seconds)


# --- report -----------------------------------------------------------------------------------------
def table(results: list[Result], base: Result, args) -> str:
    lines = [f"{args.requests} concurrent requests, {args.prompt_tokens} prompt tokens, {args.new_tokens} new "
             f"tokens, rank-{args.rank} adapters on all linear layers, {torch.get_num_threads()} CPU thread(s), "
             f"median of {args.repeat} interleaved round(s), {args.clock} clock\n",
             "| setup | tokens/s | vs base-only engine | time to first token (s) | per-token latency (ms) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.name} | {r.throughput:.1f} | {r.throughput / base.throughput:.2f}x | {r.ttft:.2f} | "
                     f"{r.per_token * 1000:.1f} |")
    return "\n".join(lines)


def targets(results: dict[str, Result], paired: dict[str, float]) -> str:
    base, lines = results["base"], []
    many, one = results.get("many"), results.get("one")
    if many:
        lines.append(f"- distinct adapters vs base-only throughput: {many.throughput / base.throughput:.2f}x "
                     f"(target >= 0.9x)")
        if "peft" in results:
            lines.append(f"- distinct adapters vs PEFT switching: {many.throughput / results['peft'].throughput:.1f}x "
                         f"(target >= 10x)")
        lines.append(f"- distinct adapters vs batched generate on the bare base: "
                     f"{many.throughput / results['hf'].throughput:.2f}x (target >= 2x)")
    if one:
        lines.append(f"- per-token overhead of one unmerged adapter (end to end): "
                     f"{100 * (one.per_token / base.per_token - 1):+.1f}% (target <= 3%)")
    for key, label in (("one", "one adapter in every row"), ("distinct", "a distinct adapter per row")):
        if key in paired:
            lines.append(f"- decode step, {label}, paired with base-only steps: {100 * (paired[key] - 1):+.1f}%")
    return "\n".join(lines)


def median_result(results: list[Result]) -> Result:
    """The run with the median throughput (the machine is noisy: runs are interleaved, see --repeat)."""
    return sorted(results, key=lambda r: r.throughput)[len(results) // 2]


def runners(args, model, tokenizer, paths: list[Path], prompts, counts: list[int], tmp: str) -> tuple[Engine, dict]:
    """The engine, and {key: zero-argument function returning a Result} in the order they run."""
    engine = Engine(model, tokenizer, AdapterRegistry(tmp), max_batch=args.requests, max_loaded=max(counts),
                    max_queue=args.requests, prefill_tokens=args.requests * args.prompt_tokens)
    run_engine(engine, prompts[:4], [None] * 4, 4, "warm-up")
    jobs = {"base": lambda: run_engine(engine, prompts, [None] * args.requests, args.new_tokens,
                                       "loraforge engine, base model only")}
    for count in counts:
        names = [paths[i % count].name for i in range(args.requests)]
        key = "one" if count == 1 else "many" if count == max(counts) else f"k{count}"
        jobs[key] = (lambda names=names, count=count: run_engine(
            engine, prompts, names, args.new_tokens, f"loraforge engine, {count} distinct adapter(s)"))
    bare = load_model(args.model, dtype="float32", device="cpu")  # never wrapped by LoRA layers
    jobs["hf"] = lambda: run_hf_batched(bare, prompts, args.new_tokens, tokenizer.pad_token_id)
    if not args.skip_peft:
        names = [paths[i % max(counts)].name for i in range(args.requests)]
        peft_model = peft_with_adapters(args.model, paths, sorted(set(names)))
        jobs["peft"] = lambda: run_peft(peft_model, prompts, names, args.new_tokens, tokenizer.pad_token_id)
    return engine, jobs


def main(argv=None) -> int:
    global clock
    args = parse_args(argv)
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    prompts = make_prompts(tokenizer, args.requests, args.prompt_tokens)
    counts = [args.requests if c == "all" else int(c) for c in args.adapters.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, max(counts), args.rank, Path(tmp))
        engine, jobs = runners(args, model, tokenizer, paths, prompts, counts, tmp)
        samples: dict[str, list[Result]] = {key: [] for key in jobs}
        for round_ in range(args.repeat):  # interleaved, so that load changes hit every setup alike
            for key, job in jobs.items():
                samples[key].append(job())
                print(f"round {round_ + 1}: {samples[key][-1].name}: {samples[key][-1].throughput:.1f} tokens/s",
                      file=sys.stderr, flush=True)
        distinct = [paths[i % max(counts)].name for i in range(args.requests)]
        paired = paired_overhead(engine, prompts, distinct, args.pairs) if args.pairs else {}
    runs = {key: median_result(results) for key, results in samples.items()}
    print(table(list(runs.values()), runs["base"], args))
    print()
    print(targets(runs, paired))
    return 0


if __name__ == "__main__":
    sys.exit(main())
