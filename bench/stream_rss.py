"""Peak RSS against data-file size: does `loraforge train --streaming on` stay flat while the file grows?

For each size a JSONL file of demo-task chats (loraforge.demo.tasks, rows varied by an index) is
written, then measured in fresh subprocesses (so each peak RSS is its own, from getrusage):

  - train:      `loraforge train --streaming on --max-steps STEPS` (peak_memory_mb of metrics.jsonl)
  - full pass:  the data path alone (data.stream: read, tokenize, pack, shuffle) over the whole
                file, every row, no model: the memory of a whole pass, not just the first steps
  - in memory:  `--streaming off` for sizes up to --in-memory-up-to MB, the path streaming replaces

    OMP_NUM_THREADS=2 python bench/stream_rss.py [--sizes 50,200,1000] [--steps 5] [--model tiny]
    python bench/stream_rss.py --quick          # a smoke run: 2 and 8 MB, tiny model, 2 steps

`--model tiny` is a random 2-layer Llama (hidden 64) with the embedded model's tokenizer: the
figures then show the data path's memory, not a 135M-parameter model's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_PASS = """
import resource, sys
from loraforge.data.stream import open_stream
from loraforge.models import load_tokenizer
tok = load_tokenizer(sys.argv[2])
stream, _, _ = open_stream(sys.argv[1], tok, {}, False, 256, 256, 1024, 0.05, 0)
rows = 0
while stream.epoch == 0:
    stream.next_row()
    rows += 1
print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_file(path: Path, megabytes: float) -> int:
    """Demo chats, each row made distinct by its index, until the file has `megabytes` MB."""
    from loraforge.demo.tasks import make_examples

    base = make_examples(500, seed=0, task="extract")
    target, written, n = int(megabytes * 2 ** 20), 0, 0
    with open(path, "w") as f:
        while written < target:
            row = base[n % len(base)]
            msgs = [{**m, "content": m["content"] + (f" (#{n})" if m["role"] == "user" else "")}
                    for m in row["messages"]]
            line = json.dumps({"messages": msgs}) + "\n"
            f.write(line)
            written, n = written + len(line.encode()), n + 1
    return n


def tiny_model(out: Path) -> Path:
    """A random 2-layer Llama with the embedded model's tokenizer, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.models import load_tokenizer
    from loraforge.models.embedded import DEFAULT_MODEL

    tok = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_rss(model: str, data: Path, out: Path, steps: int, streaming: str) -> tuple[float, float]:
    """(peak RSS MB, wall s) of one `loraforge train` subprocess."""
    cmd = [sys.executable, "-m", "loraforge", "train", "--model", model, "--data", str(data), "--out", str(out),
           "--streaming", streaming, "--max-steps", str(steps), "--batch-size", "4", "--max-len", "256",
           "--max-tokens", "256", "--precision", "fp32", "--save-every", "0", "--no-progress", "--patience", "0"]
    began = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_memory_mb"] for r in records), time.perf_counter() - began


def full_pass_rss(model: str, data: Path) -> tuple[int, float]:
    done = subprocess.run([sys.executable, "-c", FULL_PASS, str(data), model], check=True, capture_output=True,
                          text=True, env=os.environ)
    rows, rss = done.stdout.split()
    return int(rows), float(rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,200,1000", help="file sizes in MB, comma list")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default="tiny", help="'tiny' or a model (default of loraforge train: embedded)")
    parser.add_argument("--in-memory-up-to", type=float, default=200, help="also train --streaming off up to this MB")
    parser.add_argument("--no-full-pass", action="store_true", help="skip the whole-file pass of the data path")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 and 8 MB, 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.steps, args.in_memory_up_to = "2,8", 2, 8
    sizes = [float(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(tiny_model(tmp / "tiny")) if args.model == "tiny" else args.model
        print("| file (MB) | rows | train --streaming on: peak RSS (MB) | full pass, data only: peak RSS (MB) "
              "| train --streaming off: peak RSS (MB) |\n|---|---|---|---|---|")
        for size in sizes:
            data = tmp / f"data-{size:g}.jsonl"
            n = write_file(data, size)
            streamed, _ = train_rss(model, data, tmp / f"s-{size:g}", args.steps, "on")
            full = "-" if args.no_full_pass else f"{full_pass_rss(model, data)[1]:.0f}"
            in_memory = f"{train_rss(model, data, tmp / f'm-{size:g}', args.steps, 'off')[0]:.0f}" \
                if size <= args.in_memory_up_to else "-"
            print(f"| {size:g} | {n} | {streamed:.0f} | {full} | {in_memory} |", flush=True)
            data.unlink()


if __name__ == "__main__":
    main()
