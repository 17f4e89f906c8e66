"""QLoRA benchmark: LoRA training over a float32, a bfloat16 and an NF4 base (not a test).

On the embedded SmolLM2-135M-Instruct and the demo task (loraforge.demo.tasks "extract"), for each
base it runs `loraforge train` and `loraforge eval` as subprocesses (each run its own process, so
peak memory is per run) and prints a markdown table:

- base weights: bytes held by the frozen base weights after loading (loraforge.core.quant.weight_bytes:
  quantized storage incl. its quantization state), and the RSS right after the model is built and
  the peak RSS while building it (a separate process that builds the model, LoRA attached, exactly
  as `loraforge train` does, and stops there). A float32 base is memory-mapped from the
  checkpoint, so its RSS after building is low until training reads every weight;
- peak RSS training run: the training process's peak resident memory (metrics.jsonl
  `peak_memory_mb`, the process high-water mark: building included, so when it exceeds the build
  peak, training set it);
- tokens/s: mean over the steps after the first (metrics.jsonl);
- exact match of the trained adapter on the demo test split (`loraforge eval`), over the base it
  was trained on; for NF4 also over the float32 base (the adapter moved to full precision).

Runs: fp32 (`--precision fp32`), bf16 (`--precision bf16-base`: base stored in bf16, bf16
autocast) and nf4 (`--quantize nf4 --precision bf16-base`: QLoRA's setup, the Linear weights of
the decoder blocks in NF4, everything else in bf16, bf16 compute).

Peak RSS depends on glibc's allocator, which keeps freed memory and raises its mmap threshold as
it goes; from run to run the same training can peak 30% apart. `--stable-rss` sets
MALLOC_MMAP_THRESHOLD_=131072 for every run, so that large tensors are returned to the system
when freed and the peak follows the memory actually live (at some cost in speed, for all runs).

    python bench/qlora.py                 # the full run: the demo recipe (60 steps), 2000 / 100 examples
    python bench/qlora.py --steps 12 --n-train 200 --n-test 40 --threads 1 --stable-rss   # reduced
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loraforge.models.embedded import DEFAULT_MODEL

RUNS = {  # name: (train flags, eval flags)
    "fp32": (["--precision", "fp32"], []),
    "bf16": (["--precision", "bf16-base"], []),
    "nf4": (["--quantize", "nf4", "--precision", "bf16-base"], ["--quantize", "nf4"]),
}
TARGETS = ("NF4 base weights <= 0.16x float32; NF4 peak training memory < bf16's; "
           "NF4 tokens/s >= 0.7x bf16's; NF4 exact match within 5 points of bf16's")


def rss_mb() -> dict:
    """Current and peak resident memory of this process, in MiB (Linux /proc; else ru_maxrss)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "hwm_mb": int(fields["VmHWM"].split()[0]) / 1024}
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"rss_mb": None, "hwm_mb": peak}


def measure_load(run: str, model: str) -> dict:
    """(In a fresh process.) Build the training model as `loraforge train` does; report memory."""
    import torch

    from loraforge.core.layers import is_quantized
    from loraforge.core.quant import weight_bytes
    from loraforge.train.config import resolve
    from loraforge.train.loop import build_model

    flags = RUNS[run][0]
    options = dict(zip((f.lstrip("-").replace("-", "_") for f in flags[::2]), flags[1::2]))
    cfg = resolve("demo", model=model, **options)
    began = time.perf_counter()
    built = build_model(cfg, torch.device("cpu"))
    seconds = time.perf_counter() - began
    gc.collect()
    info = getattr(built, "loraforge_quantization", None) or {}
    quantized = sum(m.in_features * m.out_features for m in built.modules()
                    if is_quantized(m) and not hasattr(m, "base_layer"))  # the 4-bit layers, not their LoRA wrappers
    return {"weight_bytes": weight_bytes(built), "linear_bytes": info.get("linear_bytes_after"),
            "linear_bytes_float32": 4 * quantized, "build_s": round(seconds, 1), **rss_mb()}


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def loraforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraforge", *args]


def eval_adapter(args, env, adapter: Path, data: Path, extra: list[str], log: Path) -> dict:
    _, out = run(loraforge("eval", "--model", args.model, "--adapter", str(adapter), "--data", str(data),
                           "--json", *extra), env, log)
    return json.loads(out.strip().splitlines()[-1])


def bench(args) -> dict:
    from loraforge.demo.tasks import write_splits

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_splits(out / "data", args.n_train, args.n_test, seed=args.seed, task="extract")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.stable_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    results = {}
    for name in args.runs:
        train_flags, eval_flags = RUNS[name]
        print(f"[{name}] measuring the built model ...", file=sys.stderr, flush=True)
        _, load_out = run([sys.executable, __file__, "--measure-load", name, "--model", args.model],
                          env, out / f"{name}-load.log")
        load = json.loads(load_out.strip().splitlines()[-1])
        run_dir = out / name
        steps = ["--max-steps", str(args.steps)] if args.steps else []
        print(f"[{name}] training ...", file=sys.stderr, flush=True)
        train_s, _ = run(loraforge("train", "--config", "demo", "--model", args.model, "--data", str(data["train"]),
                                   "--out", str(run_dir), "--no-progress", "--save-every", "0",
                                   "--seed", str(args.seed), *steps, *train_flags), env, out / f"{name}-train.log")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        speeds = [r["tokens_per_s"] for r in records[1:] or records]
        row = {"load": load, "train_s": round(train_s, 1), "steps": len(records),
               "tokens_per_s": sum(speeds) / len(speeds), "peak_mb": max(r["peak_memory_mb"] for r in records),
               "final_loss": records[-1]["loss"], "val_loss": records[-1].get("val_loss")}
        print(f"[{name}] evaluating ...", file=sys.stderr, flush=True)
        row["eval"] = eval_adapter(args, env, run_dir, data["test"], eval_flags, out / f"{name}-eval.log")
        if name == "nf4" and not args.no_float_eval:
            row["eval_on_float32"] = eval_adapter(args, env, run_dir, data["test"], [], out / f"{name}-eval-fp32.log")
        results[name] = row
        print(f"[{name}] {json.dumps(row)}", file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def mib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.1f}"


def table(results: dict) -> str:
    fp32 = results.get("fp32", {}).get("load", {}).get("weight_bytes")
    bf16 = results.get("bf16")
    header = ("| base | base weights MiB (x fp32) | quantized Linear weights MiB (x fp32) | RSS after build MiB "
              "| peak RSS building MiB | peak RSS training run MiB | tokens/s (x bf16) | final loss | exact match % |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        load = r["load"]
        ratio = f" ({load['weight_bytes'] / fp32:.3f}x)" if fp32 else ""
        linear = "-" if not load.get("linear_bytes") else (
            f"{mib(load['linear_bytes'])} ({load['linear_bytes'] / load['linear_bytes_float32']:.3f}x)")
        speed = f"{r['tokens_per_s']:,.0f}" + (f" ({r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x)" if bf16 else "")
        em = f"{100 * r['eval']['exact_match']:.1f}"
        if "eval_on_float32" in r:
            em += f" (adapter on fp32 base: {100 * r['eval_on_float32']['exact_match']:.1f})"
        lines.append(f"| {name} | {mib(load['weight_bytes'])}{ratio} | {linear} | {load['rss_mb']:,.0f} | "
                     f"{load['hwm_mb']:,.0f} | {r['peak_mb']:,.0f} | {speed} | {r['final_loss']:.4f} | {em} |")
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    if not {"fp32", "bf16", "nf4"} <= set(results):
        return []
    fp32, bf16, nf4 = results["fp32"], results["bf16"], results["nf4"]
    base = nf4["load"]["weight_bytes"] / fp32["load"]["weight_bytes"]
    linear = nf4["load"]["linear_bytes"] / nf4["load"]["linear_bytes_float32"]
    speed = nf4["tokens_per_s"] / bf16["tokens_per_s"]
    points = 100 * (nf4["eval"]["exact_match"] - bf16["eval"]["exact_match"])

    def mark(ok):
        return "met" if ok else "MISSED"

    return [(f"- NF4 base weights <= 0.16x float32: all base weights {base:.3f}x ({mark(base <= 0.16)}); "
             f"the quantized Linear weights alone {linear:.3f}x ({mark(linear <= 0.16)})"),
            (f"- NF4 peak RSS below bf16's: {nf4['peak_mb']:,.0f} vs {bf16['peak_mb']:,.0f} MiB "
             f"({mark(nf4['peak_mb'] < bf16['peak_mb'])})"),
            f"- NF4 tokens/s >= 0.7x bf16: {speed:.2f}x ({mark(speed >= 0.7)})",
            f"- NF4 exact match within 5 points of bf16: {points:+.1f} points ({mark(abs(points) <= 5)})"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the demo recipe's, 60)")
    parser.add_argument("--n-train", dest="n_train", type=int, default=2000)
    parser.add_argument("--n-test", dest="n_test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="fp32,bf16,nf4", help="comma list of fp32, bf16, nf4")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every run (0: leave as is)")
    parser.add_argument("--stable-rss", dest="stable_rss", action="store_true",
                        help="MALLOC_MMAP_THRESHOLD_=131072 for every run: peak RSS follows live memory")
    parser.add_argument("--no-float-eval", dest="no_float_eval", action="store_true",
                        help="skip evaluating the NF4-trained adapter on the float32 base")
    parser.add_argument("--out", default="out/bench-qlora")
    parser.add_argument("--measure-load", dest="measure_load", choices=sorted(RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.model)))
        return 0
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    results = bench(args)
    print(f"QLoRA benchmark: {args.model}, demo task 'extract' ({args.n_train} train / {args.n_test} test examples), "
          f"steps: {args.steps or 'the demo recipe'}"
          + (f", OMP_NUM_THREADS={args.threads}" if args.threads else "")
          + (", MALLOC_MMAP_THRESHOLD_=131072" if args.stable_rss else "") + "\n")
    print(table(results))
    lines = verdicts(results)
    if lines:
        print("\nTargets: " + TARGETS)
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
