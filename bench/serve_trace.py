"""Serving on a workload like real traffic (not a test): a seeded trace replayed against the
loraforge engine, transformers' static batched `generate` on the bare base, and PEFT with
`set_adapter` per request. Prints a markdown table and a per-step profile of the engine.

The trace (generated from --seed, nothing downloaded):
  prompts      log-normal lengths clipped to [--min-prompt, --max-prompt] tokens (long-tailed)
  outputs      log-normal lengths clipped to [--min-new, --max-new] tokens, generated to the end
               (ignore_eos), so every system produces the same tokens
  arrivals     a Poisson process at --rate requests/s
  adapters     each request names one of N adapters (--adapters 1,8,64,256), uniform or Zipf
               (--zipf S); random rank-8 adapters on every linear layer of SmolLM2

Systems, each replaying the same arrival times on the wall clock:
  engine        continuous batching (requests join and leave every step); with more adapters
                than --max-loaded the LRU loads and evicts (those loads are in the timing)
  HF static     batches of --batch requests formed in arrival order; a batch starts when its
                last member has arrived and the previous batch is done, and runs until its
                longest output is finished (the bare base: no adapters at all)
  PEFT          one request at a time in arrival order, `set_adapter` before each

Columns: completed tokens/s (the requested output tokens over the time from the first arrival
to the last completion), p50 / p99 time to first token (from each request's arrival), p50 / p99
per-token latency (mean gap between a request's tokens).

    .venv/bin/python bench/serve_trace.py                        # the table in the README
    .venv/bin/python bench/serve_trace.py --quick                # a smoke run (tiny trace)
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve import TEXT, make_adapters, peft_with_adapters  # noqa: E402  (bench/serve.py)

from loraforge.models import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from loraforge.serve.adapters import AdapterRegistry  # noqa: E402
from loraforge.serve.api import preload  # noqa: E402
from loraforge.serve.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402


@dataclass
class Request:
    arrival: float  # seconds after the start of the trace
    prompt: list[int]
    new_tokens: int
    adapter: int  # index into the adapters of this run


@dataclass
class Outcome:
    arrival: float
    stamps: list[float]  # when each token was produced, seconds after the start
    wanted: int


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def make_trace(args, tokenizer, n_adapters: int) -> list[Request]:
    rng = random.Random(args.seed)
    corpus = tokenizer(TEXT * (args.max_prompt // 8 + 4))["input_ids"]
    weights = [1 / (k + 1) ** args.zipf for k in range(n_adapters)] if args.zipf else [1.0] * n_adapters
    trace, now = [], 0.0
    for i in range(args.requests):
        now += rng.expovariate(args.rate)
        length = lognormal_length(rng, args.median_prompt, 0.9, args.min_prompt, args.max_prompt)
        start = rng.randrange(0, len(corpus) - length)
        prompt = tokenizer(f"Request {i}: ")["input_ids"] + corpus[start:start + length]
        new = lognormal_length(rng, args.median_new, 0.9, args.min_new, args.max_new)
        trace.append(Request(now, prompt[:length], new, rng.choices(range(n_adapters), weights)[0]))
    return trace


# --- the systems -------------------------------------------------------------------------------
def replay_engine(engine: Engine, trace: list[Request], names: list[str | None]) -> list[Outcome]:
    stamps: dict[int, list[float]] = defaultdict(list)
    start = time.perf_counter()
    engine.on_token = lambda seq, now: stamps[seq.id].append(time.perf_counter() - start)
    pending, seqs = list(trace), []
    while pending or engine.busy:
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            r = pending.pop(0)
            params = SamplingParams(max_tokens=r.new_tokens, temperature=0.0, ignore_eos=True)
            seqs.append((r, engine.submit(GenerationRequest(r.prompt, names[r.adapter], params), lambda ev: None)))
        if engine.busy:
            engine.step()
        elif pending:
            time.sleep(max(0.0, min(0.01, pending[0].arrival - now)))
    engine.on_token = None
    return [Outcome(r.arrival, stamps[s.id], r.new_tokens) for r, s in seqs]


class Stamps:
    """A logits processor that records when generate produced each token."""

    def __init__(self, start: float):
        self.start, self.times = start, []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter() - self.start)
        return scores


def _generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, start: float) -> list[float]:
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stamps = Stamps(start)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad_id, logits_processor=LogitsProcessorList([stamps]))
    return stamps.times


def _wait_until(start: float, moment: float):
    delay = moment - (time.perf_counter() - start)
    if delay > 0:
        time.sleep(delay)


def replay_static(model, trace: list[Request], batch: int, pad_id: int) -> list[Outcome]:
    outcomes, start = [], time.perf_counter()
    for i in range(0, len(trace), batch):
        group = trace[i:i + batch]
        _wait_until(start, group[-1].arrival)
        times = _generate(model, [r.prompt for r in group], max(r.new_tokens for r in group), pad_id, start)
        outcomes += [Outcome(r.arrival, times[:r.new_tokens], r.new_tokens) for r in group]
    return outcomes


def replay_peft(model, trace: list[Request], names: list[str], pad_id: int) -> list[Outcome]:
    outcomes, start = [], time.perf_counter()
    for r in trace:
        _wait_until(start, r.arrival)
        model.set_adapter(names[r.adapter])
        outcomes.append(Outcome(r.arrival, _generate(model, [r.prompt], r.new_tokens, pad_id, start), r.new_tokens))
    return outcomes


# --- figures -------------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def figures(outcomes: list[Outcome]) -> dict:
    done = max(o.stamps[-1] for o in outcomes if o.stamps)
    first = min(o.arrival for o in outcomes)
    ttft = [o.stamps[0] - o.arrival for o in outcomes if o.stamps]
    gaps = [(o.stamps[-1] - o.stamps[0]) / (len(o.stamps) - 1) for o in outcomes if len(o.stamps) > 1]
    tokens = sum(min(len(o.stamps), o.wanted) for o in outcomes)
    return {"tokens_s": tokens / (done - first), "ttft50": quantile(ttft, 0.5), "ttft99": quantile(ttft, 0.99),
            "tpot50": quantile(gaps, 0.5), "tpot99": quantile(gaps, 0.99), "tokens": tokens}


class Profile:
    """Where the engine's time goes: wall time inside prefill, decode, the LoRA kernel (inside both),
    sampling / emitting, and the rest of each step (Python scheduling)."""

    def __init__(self, engine: Engine):
        self.engine, self.totals, self.saved = engine, defaultdict(float), {}
        self._wrap(engine, "step", "step")
        self._wrap(engine, "_prefill", "prefill")
        self._wrap(engine, "_prefill_piece", "prefill")  # chunked prefill: one piece of a long prompt
        self._wrap(engine, "_decode", "decode")
        self._wrap(engine, "_emit", "sampling")
        self._wrap(engine, "kernel", "lora kernel", call=True)

    def _wrap(self, owner, attr: str, key: str, call: bool = False):
        target = getattr(owner, attr)
        original = target.__call__ if call else target

        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - began

        if call:
            kernel_cls = type(target)
            self.saved["kernel_cls"] = (kernel_cls, kernel_cls.__call__)
            kernel_cls.__call__ = lambda _self, *a, **k: timed(*a, **k)
        else:
            self.saved[attr] = target
            setattr(owner, attr, timed)

    def close(self):
        for attr in ("step", "_prefill", "_prefill_piece", "_decode", "_emit"):
            setattr(self.engine, attr, self.saved[attr])
        kernel_cls, call = self.saved["kernel_cls"]
        kernel_cls.__call__ = call

    def rows(self) -> list[tuple[str, float, float]]:
        t, step = self.totals, self.totals["step"] or 1e-9
        forward = t["prefill"] + t["decode"] - t["sampling"]  # _emit runs inside prefill and decode
        parts = [("prefill + decode forward, without the LoRA kernel", forward - t["lora kernel"]),
                 ("LoRA kernel", t["lora kernel"]), ("sampling and emitting", t["sampling"]),
                 ("scheduling and the rest of the step", step - t["prefill"] - t["decode"])]
        return [(name, seconds, seconds / step) for name, seconds in parts]


# --- the run -------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--median-prompt", type=int, default=96)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--median-new", type=int, default=32)
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=512)
    p.add_argument("--adapters", default="1,8,64,256")
    p.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of adapter popularity (0: uniform)")
    p.add_argument("--max-loaded", type=int, default=64, help="the engine's adapter slots (LRU beyond)")
    p.add_argument("--batch", type=int, default=16, help="engine max batch and HF static batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny trace, to check the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rate, args.adapters, args.max_prompt, args.max_new = 8, 8.0, "1,4", 64, 12
        args.median_prompt, args.median_new, args.max_loaded = 24, 6, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    counts = [int(c) for c in args.adapters.split(",")]
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, max(counts), 8, Path(tmp))
        names = [p.name for p in paths]
        engine = Engine(model, tokenizer, AdapterRegistry(tmp), max_batch=args.batch,
                        max_loaded=min(args.max_loaded, max(counts)), max_queue=args.requests + 1)
        base_trace = make_trace(args, tokenizer, 1)
        replay_engine(engine, base_trace[:2], [None])  # warm-up
        rows.append(("engine, base only", figures(replay_engine(engine, base_trace, [None]))))
        for count in counts:
            trace = make_trace(args, tokenizer, count)
            if count <= engine.kernel.capacity:  # warm: loads are not timed when everything fits
                for name in names[:count]:
                    engine.call(lambda n=name: preload(engine, n)).result()
            profile = Profile(engine)
            rows.append((f"engine, {count} adapter(s)", figures(replay_engine(engine, trace, names[:count]))))
            profile.close()
            profiles[count] = profile
        bare = load_model(args.model, dtype="float32", device="cpu")
        rows.append(("HF static batched generate, bare base",
                     figures(replay_static(bare, base_trace, args.batch, tokenizer.pad_token_id))))
        if not args.skip_peft:
            k = peft_adapters(counts)
            peft = peft_with_adapters(args.model, paths[:k], names[:k])
            rows.append((f"PEFT set_adapter per request, {k} adapters",
                         figures(replay_peft(peft, make_trace(args, tokenizer, k), names[:k],
                                             tokenizer.pad_token_id))))
    print(report(args, rows, profiles, counts))
    return 0


def peft_adapters(counts: list[int]) -> int:
    """How many adapters PEFT switches between (one-at-a-time serving is slow: at most 8)."""
    return min(8, max(counts))


def report(args, rows, profiles, counts) -> str:
    lines = [f"trace: {args.requests} requests, Poisson {args.rate}/s, prompts {args.min_prompt}-{args.max_prompt} "
             f"(median {args.median_prompt}), outputs {args.min_new}-{args.max_new} (median {args.median_new}), "
             f"adapters {'Zipf ' + str(args.zipf) if args.zipf else 'uniform'}, engine slots {args.max_loaded}, "
             f"batch {args.batch}, {torch.get_num_threads()} thread(s), seed {args.seed}\n",
             "| system | completed tokens/s | p50 TTFT s | p99 TTFT s | p50 per-token ms | p99 per-token ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, f in rows:
        lines.append(f"| {name} | {f['tokens_s']:.1f} | {f['ttft50']:.2f} | {f['ttft99']:.2f} | "
                     f"{1000 * f['tpot50']:.1f} | {1000 * f['tpot99']:.1f} |")
    by = dict(rows)
    base, static = by["engine, base only"], by["HF static batched generate, bare base"]
    lines.append("")
    for count in counts:
        f = by[f"engine, {count} adapter(s)"]
        lines.append(f"- {count} adapter(s): {f['tokens_s'] / base['tokens_s']:.2f}x the base-only engine, "
                     f"{f['tokens_s'] / static['tokens_s']:.2f}x HF static (p99 TTFT {f['ttft99']:.2f} vs "
                     f"{static['ttft99']:.2f} s)")
    peft = [(name, f) for name, f in rows if name.startswith("PEFT")]
    if peft:
        name, f = peft[0]
        for count in sorted({peft_adapters(counts), counts[-1]} & set(counts)):
            lines.append(f"- engine with {count} adapters vs {name}: "
                         f"{by[f'engine, {count} adapter(s)']['tokens_s'] / f['tokens_s']:.1f}x")
    for count, profile in profiles.items():
        lines.append(f"\nengine profile, {count} adapter(s):\n\n| part | seconds | share of step time |\n|---|---:|---:|")
        lines += [f"| {name} | {seconds:.2f} | {100 * share:.0f}% |" for name, seconds, share in profile.rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
