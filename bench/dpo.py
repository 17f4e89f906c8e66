"""DPO on the embedded SmolLM2-135M-Instruct: does the adapter learn to prefer a style, and what does
a DPO step cost against a supervised one?

The demo pairs (loraforge.demo.tasks, ``--pairs``): the extract prompt; chosen = the JSON on one
line, rejected = the same JSON pretty-printed. Held-out pairs use names the training pairs never do.

Measured on the held-out pairs, before (the base model) and after DPO:
  - reward accuracy: pairs whose implicit reward margin beta * ((log pi - log ref)(chosen) -
    (log pi - log ref)(rejected)) is > 0 (0 before training: the policy is the reference);
  - log-prob accuracy: pairs where log pi(chosen) > log pi(rejected) outright;
  - style: held-out prompts whose greedy answer opens in the chosen style ('{"name": ...' on the
    first line), and those whose answer begins with a complete JSON object on one line.
Then tokens/s and peak RSS of `loraforge train --method dpo` against `--method sft` on the same
machine, items and batch size (each its own subprocess, so its peak RSS is its own).

    OMP_NUM_THREADS=2 python bench/dpo.py [--steps 40] [--batch-size 4] [--n-test 40]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraforge import data as D
from loraforge.core.ops import disabled
from loraforge.data.pairs import encode_pairs, load_pairs, pair_rows
from loraforge.demo.tasks import write_pair_splits
from loraforge.models import generate_text
from loraforge.models.embedded import DEFAULT_MODEL as MODEL
from loraforge.models.loading import load_for_inference
from loraforge.train.preference import sequence_logps


def train(method: str, data: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "loraforge", "train", "--method", method, "--data", str(data), "--out", str(out),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--max-len", "256",
           "--max-tokens", "256", "--lr", str(args.lr), "--beta", str(args.beta), "--precision", "fp32",
           "--save-every", "0", "--val-fraction", "0", "--no-progress", "--seed", "0"]
    began = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:] or records  # the first steps warm up
    return {"records": records, "wall_s": time.perf_counter() - began,
            "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed),
            "peak_rss_mb": max(r["peak_memory_mb"] for r in records)}


@torch.no_grad()
def pair_accuracy(model, rows: list[dict], pad_id: int, batch_size: int = 4) -> dict:
    """Held-out reward accuracy (against the adapter-off reference) and log-prob accuracy."""
    wins = beats = 0
    for start in range(0, len(rows), batch_size):
        batch = D.collate(pair_rows(rows[start:start + batch_size]), pad_id)
        pi_c, pi_r = sequence_logps(model, batch)[0].chunk(2)
        with disabled(model):
            ref_c, ref_r = sequence_logps(model, batch)[0].chunk(2)
        wins += int(((pi_c - ref_c) - (pi_r - ref_r) > 0).sum())
        beats += int((pi_c > pi_r).sum())
    return {"reward_accuracy": wins / len(rows), "logp_accuracy": beats / len(rows)}


def one_line_json(text: str) -> bool:
    """The answer begins with a complete JSON object written on one line (what follows it aside)."""
    try:
        _, end = json.JSONDecoder().raw_decode(text.strip())
    except json.JSONDecodeError:
        return False
    return "\n" not in text.strip()[:end]


def compact_start(text: str) -> bool:
    """The answer opens in the chosen style: '{"key": ' on its first line, not '{' and a newline."""
    first = text.strip().split("\n")[0]
    return first.startswith('{"') and '":' in first


def greedy_style(model, tokenizer, prompts: list[str], batch_size: int = 8) -> dict:
    outputs = []
    for start in range(0, len(prompts), batch_size):
        outputs += generate_text(model, tokenizer, prompts[start:start + batch_size], max_new_tokens=60, chat=True)
    return {"compact": sum(map(compact_start, outputs)) / len(outputs),
            "one_line": sum(map(one_line_json, outputs)) / len(outputs), "sample": outputs[0]}


def held_out(adapter: Path | None, test: Path, n_greedy: int) -> dict:
    model, tokenizer = load_for_inference(MODEL, str(adapter) if adapter else None)
    model.eval()
    pairs = load_pairs(test)
    rows = encode_pairs(pairs, tokenizer, 256)[0]
    style = greedy_style(model, tokenizer, [p.messages[0]["content"] for p in pairs[:n_greedy]])
    return {**pair_accuracy(model, rows, tokenizer.pad_token_id), **style}


def sft_data(pairs_file: Path, out: Path) -> Path:
    """The same prompts with the chosen answers, as supervised chat rows."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    out.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["chosen"]}]}) + "\n"
                           for r in rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (dpo); rows per step (sft)")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--n-greedy", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    splits = write_pair_splits(work / "data", args.n_train, args.n_test)
    before = held_out(None, splits["test"], args.n_greedy)
    dpo = train("dpo", splits["train"], work / "dpo", args)
    after = held_out(work / "dpo", splits["test"], args.n_greedy)
    sft = train("sft", sft_data(splits["train"], work / "sft.jsonl"), work / "sft", args)
    last = dpo["records"][-1]
    print(f"SmolLM2-135M-Instruct, LoRA r=8 all-linear, {args.steps} steps of {args.batch_size}, lr {args.lr}, "
          f"beta {args.beta}, fp32; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.n_test} held-out pairs\n")
    print("| held-out | base model | after DPO |\n|---|---|---|")
    for key, name in (("reward_accuracy", "reward accuracy (margin > 0 vs the reference)"),
                      ("logp_accuracy", "log-prob accuracy (log pi(chosen) > log pi(rejected))"),
                      ("compact", f"greedy answer opens in the chosen style ({args.n_greedy} prompts)"),
                      ("one_line", "greedy answer begins with a complete one-line JSON object")):
        print(f"| {name} | {before[key]:.2f} | {after[key]:.2f} |")
    print(f"\nlast DPO step: loss {last['loss']:.4f}, reward margin {last['reward_margin']:.3f}, "
          f"train accuracy {last['pref_accuracy']:.2f}")
    print("\n| training | tokens/s | peak RSS (MB) | wall (s) |\n|---|---|---|---|")
    for name, run in (("sft", sft), ("dpo", dpo)):
        print(f"| {name} | {run['tokens_per_s']:.0f} | {run['peak_rss_mb']:.0f} | {run['wall_s']:.0f} |")
    print(f"\ngreedy sample before: {before['sample']!r}\ngreedy sample after:  {after['sample']!r}")


if __name__ == "__main__":
    main()
