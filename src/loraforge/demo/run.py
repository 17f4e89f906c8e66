"""`make demo`: teach the embedded SmolLM2-135M-Instruct a skill it lacks, and show before/after.

The skill is the project's own demo task (loraforge.demo.tasks "extract": a sentence about a
person -> a one-line JSON record). The demo scores the base model, trains an adapter with the
bundled `demo` recipe, scores the adapter, checks that merging it changes nothing, and prints a
table. Everything lands in --out (data, adapter, metrics.jsonl, loss.png, demo_results.json).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loraforge import data as D
from loraforge.demo.tasks import write_splits
from loraforge.eval.score import evaluate
from loraforge.core.io import atomic_write_json, load_adapter
from loraforge.core.ops import merge, unmerge
from loraforge.models import DEFAULT_MODEL, load_model, load_tokenizer
from loraforge.train.config import resolve
from loraforge.train.loop import train


def score(model, tokenizer, test: list[D.Example], label: str) -> dict:
    began = time.perf_counter()
    result = evaluate(model, tokenizer, test)
    result["seconds"] = round(time.perf_counter() - began, 1)
    print(f"{label}: exact match {100 * result['exact_match']:.1f}%, loss {result['loss']:.4f} "
          f"({result['seconds']} s)")
    for sample in result["samples"][:2]:
        print(f"  expected: {sample['expected']}\n  got:      {sample['got']}")
    return result


@torch.no_grad()
def merge_check(model, tokenizer, example: D.Example) -> float:
    """Max |logits(merged) - logits(unmerged)| on one prompt: merging must change nothing."""
    ids = tokenizer(D.prompt_text(example, tokenizer), return_tensors="pt")["input_ids"]
    unmerged = model(ids).logits
    merge(model)
    merged = model(ids).logits
    unmerge(model)
    return float((merged - unmerged).abs().max())


def run_demo(out: Path, model_name: str, n_train: int, n_test: int, task: str, max_steps: int) -> dict:
    splits = write_splits(out / "data", n_train=n_train, n_test=n_test, task=task)
    test = D.load_examples(splits["test"])
    tokenizer, model = load_tokenizer(model_name), load_model(model_name)
    before = score(model, tokenizer, test, "base model")
    began = time.perf_counter()
    cfg = resolve("demo", model=model_name, data=str(splits["train"]), out=str(out / "adapter"),
                  max_steps=max_steps or None)
    summary = train(cfg)
    train_seconds = round(time.perf_counter() - began, 1)
    load_adapter(model, out / "adapter")
    after = score(model, tokenizer, test, "with adapter")
    results = {"task": task, "n_train": n_train, "n_test": len(test), "base": before, "adapter": after,
               "train_seconds": train_seconds, "train": summary,
               "merge_max_abs_diff": merge_check(model, tokenizer, test[0]),
               "gguf": export_for_llama_cpp(out, model_name)}
    atomic_write_json(out / "demo_results.json", results)
    return results


def export_for_llama_cpp(out: Path, model_name: str) -> dict:
    """The demo adapter as GGUF beside an f16 base GGUF and an Ollama Modelfile (out/gguf/)."""
    from loraforge.tools.export import export_gguf

    began = time.perf_counter()
    result = export_gguf(out / "gguf" / "demo.gguf", model_name, out / "adapter", dtype="f16", ollama=True,
                         force=True)
    return {**result, "seconds": round(time.perf_counter() - began, 1)}


def table(results: dict) -> str:
    b, a = results["base"], results["adapter"]
    rows = [("", "base model", "with adapter"),
            ("exact match", f"{100 * b['exact_match']:.1f}%", f"{100 * a['exact_match']:.1f}%"),
            ("answer loss", f"{b['loss']:.4f}", f"{a['loss']:.4f}"),
            ("perplexity", f"{b['perplexity']:.3f}", f"{a['perplexity']:.3f}")]
    lines = [f"| {x:<12} | {y:>12} | {z:>12} |" for x, y, z in rows]
    lines.insert(1, "|" + "-" * 14 + "|" + "-" * 14 + "|" + "-" * 14 + "|")
    train = results["train"]
    lines.append(f"\ntrained {train['steps']} steps in {results['train_seconds']} s "
                 f"({train.get('mean_tokens_per_s')} tokens/s, peak {train.get('peak_memory_mb')} MB); "
                 f"merged vs unmerged logits max diff {results['merge_max_abs_diff']:.2e}")
    return "\n".join(lines)


def cli_demo(args) -> int:
    began = time.perf_counter()
    results = run_demo(Path(args.out), args.model, args.n_train, args.n_test, args.task, args.max_steps)
    print()
    print(table(results))
    gguf = results["gguf"]
    print(f"\nexported for llama.cpp / Ollama in {gguf['seconds']} s: {', '.join(gguf['files'])}")
    for note in gguf["notes"]:
        print(f"note: {note}")
    for command in gguf["commands"]:
        print(f"  {command}")
    print(f"demo finished in {time.perf_counter() - began:.0f} s; files in {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_demo(Path("out/demo"), DEFAULT_MODEL, 2000, 100, "extract", 0)))
