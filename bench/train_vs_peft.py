"""Training speed and memory: loraforge against PEFT + transformers' Trainer and against a
hand-tuned PEFT loop, in one run.

All fine-tune the embedded SmolLM2-135M-Instruct on the same chat rows (demo-task sentences,
85-250 tokens), LoRA r=8 on all linear layers, the same number of steps. Each run is its own
subprocess so its peak RSS is its own. tokens/s counts real (non-padding) tokens over the timed
steps (the first steps are warm-up). Tables (--tables):

  trainer: batch 4 (loraforge packs rows of 256 tokens; the Trainer pads each batch)
    identical settings: float32 weights and compute for both
    own settings:       what each recommends on this hardware: loraforge stores the frozen base in
                        bfloat16 and runs bf16 autocast (`--precision bf16-base`); PEFT + Trainer
                        keeps float32 weights with `bf16=True` (autocast), as its docs recommend;
    then loraforge's memory options (--no-lean-memory, --gradient-checkpointing).
  loop: batch --loop-batch (16): loraforge bf16-base against PEFT in a plain loop written for
        speed (bf16 base, bf16 autocast, AdamW, rows padded to the batch's longest, no Trainer).

    python bench/train_vs_peft.py [--steps 8] [--warmup 2] [--tables trainer,loop] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loraforge.models.embedded import DEFAULT_MODEL as MODEL

ENV = dict(os.environ)  # --threads sets OMP_NUM_THREADS for every child run


def run_loraforge(data: Path, out: Path, steps: int, precision: str, extra: tuple = (), batch: int = 4) -> dict:
    cmd = [sys.executable, "-m", "loraforge", "train", "--data", str(data), "--out", str(out),
           "--rank", "8", "--alpha", "16", "--targets", "all-linear", "--batch-size", str(batch),
           "--max-tokens", "256", "--max-len", "256", "--max-steps", str(steps), "--precision", precision,
           "--save-every", "0", "--val-fraction", "0", "--no-progress", "--lr", "1e-4", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "peak_rss_mb": max(r["peak_memory_mb"] for r in records)}


def peft_child(data: str, steps: int, bf16: bool) -> None:
    """Runs inside a subprocess: PEFT + Trainer, the path users take today."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from loraforge import data as D
    from loraforge.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    tokenizer.padding_side = "right"
    pairs = D.encode_examples(D.load_examples(data), tokenizer, max_len=256).pairs
    dataset = [{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)} for ids, labels in pairs]
    model = load_model(MODEL, dtype="float32")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.began)

    class Counting(DataCollatorForSeq2Seq):
        def __call__(self, features, return_tensors=None):
            batch = super().__call__(features, return_tensors)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-4, use_cpu=True, bf16=bf16, report_to=[], save_strategy="no",
                             logging_strategy="no", dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=Counting(tokenizer, padding=True, label_pad_token_id=-100), callbacks=[Clock()])
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "tokens": tokens[:len(times)], "peak_rss_mb": peak}))
    del torch


def peft_loop_child(data: str, steps: int, batch: int) -> None:
    """Runs inside a subprocess: PEFT in a hand-written loop, as someone tuning for speed writes
    it: the base loaded in bf16 (PEFT keeps the adapters float32), bf16 autocast, AdamW over the
    adapters, `batch` chat rows a step padded to the longest, no Trainer, no per-step logging."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model

    from loraforge import data as D
    from loraforge.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    pairs = D.encode_examples(D.load_examples(data), tokenizer, max_len=256).pairs
    random.Random(0).shuffle(pairs)
    model = load_model(MODEL, dtype="bfloat16")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    times, tokens = [], []
    for step in range(steps):
        rows = [pairs[(step * batch + i) % len(pairs)] for i in range(batch)]
        width = max(len(row_ids) for row_ids, _ in rows)
        ids = torch.tensor([row_ids + [pad] * (width - len(row_ids)) for row_ids, _ in rows])
        labels = torch.tensor([row_labels + [-100] * (width - len(row_labels)) for _, row_labels in rows])
        mask = torch.tensor([[1] * len(row_ids) + [0] * (width - len(row_ids)) for row_ids, _ in rows])
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        tokens.append(int(mask.sum()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "tokens": tokens, "peak_rss_mb": peak}))


def run_peft(data: Path, steps: int, *flags: str) -> dict:
    """A PEFT child run (peft_child, or peft_loop_child with --peft-loop-child N): its figures."""
    out = subprocess.run([sys.executable, __file__, "--peft-child", str(data), "--steps", str(steps), *flags],
                         check=True, capture_output=True, text=True, env=ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_loraforge(result: dict, warmup: int) -> float:
    timed = result["records"][warmup:]
    return sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed)


def speed_peft(result: dict, warmup: int) -> float:
    tokens, times = result["tokens"][warmup:], result["times"][warmup:]
    return sum(tokens) / sum(times)


def _sentence(prompt: str) -> str:
    """The demo prompt without its instruction line."""
    return prompt.split("\n", 1)[1] if "\n" in prompt else prompt.split(": ", 1)[1]


def long_examples(path: Path, n: int, seed: int = 0) -> Path:
    """Chat rows of 1 to 3 demo-task sentences each (about 85 to 250 tokens with the template):
    lengths vary as in real data, so batches of 4 are padded for the Trainer and packed by us."""
    import random

    from loraforge.demo.tasks import make_examples

    rng, items = random.Random(seed), make_examples(n * 5, seed=seed)
    rows, at = [], 0
    for _ in range(n):
        k = rng.randint(1, 3)
        group, at = items[at:at + k], at + k
        prompt = "Extract every person as JSON, one per line:\n" + "\n".join(
            _sentence(m["messages"][0]["content"]) for m in group)
        answer = "\n".join(m["messages"][1]["content"] for m in group)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--peft-child")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--peft-loop-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help="threads per run (0: torch's default)")
    parser.add_argument("--tables", default="trainer,loop",
                        help="comma list: trainer (PEFT + Trainer, and loraforge's memory options), "
                             "loop (a hand-tuned PEFT loop, batch --loop-batch rows)")
    parser.add_argument("--loop-batch", type=int, default=16)
    args = parser.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    if args.peft_child and args.peft_loop_child:
        return peft_loop_child(args.peft_child, args.steps, args.peft_loop_child)
    if args.peft_child:
        return peft_child(args.peft_child, args.steps, args.bf16)
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    if not tables or tables - {"trainer", "loop"}:
        parser.error(f"--tables: expected a comma list of trainer, loop; got {args.tables!r}")
    if args.loop_batch < 1:
        parser.error(f"--loop-batch: expected a positive number of rows, got {args.loop_batch}")
    from loraforge.models.embedded import ensure_default_model

    ensure_default_model("bfloat16")  # made once, outside the measured runs (their peak RSS is their own)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = long_examples(work / "train.jsonl", args.n_train)
    print(f"SmolLM2-135M-Instruct, LoRA r=8 all-linear, {args.steps} steps ({args.warmup} warm-up), "
          f"{os.cpu_count()} CPU cores, {args.threads or 'default'} thread(s) per run, runs back to back\n")
    if "trainer" in tables:
        trainer_tables(data, work, args)
    if "loop" in tables:
        loop_table(data, work, args)


def loop_table(data: Path, work: Path, args) -> None:
    """loraforge (own settings, `--loop-batch` packed rows of 256) against the hand-tuned PEFT
    loop (`--loop-batch` chat rows padded to the longest)."""
    ours = run_loraforge(data, work / "lf-loop", args.steps, "bf16-base", batch=args.loop_batch)
    peft = run_peft(data, args.steps, "--peft-loop-child", str(args.loop_batch))
    lf_speed, p_speed = speed_loraforge(ours, args.warmup), speed_peft(peft, args.warmup)
    lf_mem, p_mem = ours["peak_rss_mb"], peft["peak_rss_mb"]
    print(f"\nagainst a hand-tuned PEFT loop (bf16 base, bf16 autocast, AdamW, no Trainer), "
          f"batch {args.loop_batch}:\n")
    print("| run | tokens/s | peak RSS MB |")
    print("|---|---:|---:|")
    print(f"| loraforge, bf16-base, {args.loop_batch} packed rows of 256 | {lf_speed:.0f} | {lf_mem:.0f} |")
    print(f"| PEFT hand-tuned loop, {args.loop_batch} rows padded | {p_speed:.0f} | {p_mem:.0f} |")
    print(f"| ratio | {lf_speed / p_speed:.2f}x | {lf_mem / p_mem:.2f}x |")


def trainer_tables(data: Path, work: Path, args) -> None:
    rows = []
    for label, precision, bf16 in (("identical: float32", "fp32", False), ("own settings", "bf16-base", True)):
        ours = run_loraforge(data, work / f"lf-{precision}", args.steps, precision)
        peft = run_peft(data, args.steps, *(["--bf16"] if bf16 else []))
        rows.append((label, speed_loraforge(ours, args.warmup), ours["peak_rss_mb"],
                     speed_peft(peft, args.warmup), peft["peak_rss_mb"]))
    print("against PEFT + transformers' Trainer, batch 4 (packed rows of 256 / rows padded):\n")
    print("| settings | loraforge tokens/s | PEFT+Trainer tokens/s | speed ratio | loraforge peak RSS MB "
          "| PEFT peak RSS MB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, lf_speed, lf_mem, p_speed, p_mem in rows:
        print(f"| {label} | {lf_speed:.0f} | {p_speed:.0f} | {lf_speed / p_speed:.2f}x | {lf_mem:.0f} | {p_mem:.0f} "
              f"| {lf_mem / p_mem:.2f}x |")
    lf_own, p_fp32 = rows[1], rows[0]
    print(f"\nown settings vs PEFT float32: {lf_own[1] / p_fp32[3]:.2f}x tokens/s, "
          f"{lf_own[2] / p_fp32[4]:.2f}x peak memory")
    print("\nloraforge's memory options at its own settings (bf16-base), against PEFT + Trainer's own row:\n")
    print("| loraforge | tokens/s | peak RSS MB | vs PEFT tokens/s | vs PEFT memory |")
    print("|---|---:|---:|---:|---:|")
    variants = (("default (lean RMSNorm / SwiGLU / loss)", ()), ("--no-lean-memory", ("--no-lean-memory",)),
                ("--gradient-checkpointing", ("--gradient-checkpointing",)))
    for label, extra in variants:
        result = run_loraforge(data, work / f"lf-{len(extra)}-{extra[:1]}", args.steps, "bf16-base", extra) \
            if extra else None
        speed, mem = (speed_loraforge(result, args.warmup), result["peak_rss_mb"]) if result else lf_own[1:3]
        print(f"| {label} | {speed:.0f} | {mem:.0f} | {speed / lf_own[3]:.2f}x | {mem / lf_own[4]:.2f}x |")


if __name__ == "__main__":
    main()
