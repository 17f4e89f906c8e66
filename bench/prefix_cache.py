"""Benchmark the prefix cache (not a test): time to first token with and without a cached prefix.

Two requests on the same adapter share a long prefix (a system prompt of `--prefix-tokens`
tokens, 1,000 by default) and differ in a short question. The first prefills the whole prompt
and fills the prefix cache; the second reads the prefix's KV blocks and prefills only its
question. Both are timed in one run, one request at a time on an idle engine, after a warm-up
request on the same adapter (adapter loading is not timed); each round uses a new prefix, and
the median over `--rounds` is printed with the ratio second / first (target: below 0.5). The
same requests on an engine without the cache are the control (its ratio stays near 1).

    .venv/bin/python bench/prefix_cache.py                  # embedded SmolLM2-135M-Instruct
    .venv/bin/python bench/prefix_cache.py --tiny --rounds 1 --prefix-tokens 200   # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from loraforge.core.config import LoraConfig
from loraforge.core.io import save_adapter
from loraforge.core.ops import attach, unload
from loraforge.models import DEFAULT_MODEL, load_model, load_tokenizer
from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.engine import Engine, GenerationRequest, SamplingParams

TEXT = ("You are a helpful assistant for a travel company. Answer politely, cite the booking rules, and keep "
        "every answer short. Rule {i}: refunds are possible up to {i} days before departure. ")
ADAPTER = "bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama (hidden 64) instead of the model")
    p.add_argument("--prefix-tokens", dest="prefix_tokens", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5, help="prefix pairs; the median is reported")
    p.add_argument("--cache-mb", dest="cache_mb", type=float, default=512.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def save_random_adapter(model, out: Path) -> Path:
    """A random rank-8 adapter on every linear layer (B random), saved; the model is left bare."""
    attach(model, LoraConfig(r=8, alpha=16.0, target_modules="all-linear"), ADAPTER, activate=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".lora_B.{ADAPTER}" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    path = save_adapter(model, out / ADAPTER, ADAPTER)
    unload(model)
    return path


def prefix_ids(tokenizer, round_: int, length: int) -> list[int]:
    text = "".join(TEXT.format(i=round_ * 1000 + i) for i in range(length // 20 + 2))
    return tokenizer(text)["input_ids"][:length]


def time_to_first_token(engine: Engine, prompt: list[int]) -> float:
    """Seconds from submit to the first sampled token, the engine stepped here (no thread)."""
    first: list[float] = []
    engine.on_token = lambda seq, now: first.append(now) if not first else None
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seq = engine.submit(GenerationRequest(prompt, ADAPTER, params), lambda ev: None)
    while engine.busy:
        engine.step()
    engine.on_token = None
    return first[0] - seq.arrival


def measure(engine: Engine, tokenizer, args) -> tuple[float, float]:
    """Median TTFT of the first and the second request of each prefix pair."""
    time_to_first_token(engine, tokenizer("Warm-up: hello there.")["input_ids"])
    firsts, seconds = [], []
    for round_ in range(args.rounds):
        prefix = prefix_ids(tokenizer, round_, args.prefix_tokens)
        firsts.append(time_to_first_token(engine, prefix + tokenizer(" Question: can I cancel?")["input_ids"]))
        seconds.append(time_to_first_token(engine, prefix + tokenizer(" Question: is lunch included?")["input_ids"]))
    return statistics.median(firsts), statistics.median(seconds)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    tokenizer = load_tokenizer(DEFAULT_MODEL if args.tiny else args.model)
    name = "tiny random Llama" if args.tiny else str(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, mb in (("prefix cache", args.cache_mb), ("no cache (control)", 0.0)):
            model = tiny_model(len(tokenizer)) if args.tiny else load_model(args.model)
            save_random_adapter(model, Path(tmp))
            engine = Engine(model, tokenizer, AdapterRegistry(tmp), max_batch=4, prefix_cache_mb=mb)
            first, second = measure(engine, tokenizer, args)
            rows.append((label, first, second))
    print(f"{name}, {args.prefix_tokens}-token shared prefix, median of {args.rounds} round(s), "
          f"device {next(model.parameters()).device}, {torch.get_num_threads()} thread(s)\n")
    print("| engine | TTFT 1st request | TTFT 2nd request | 2nd / 1st |")
    print("|---|---|---|---|")
    for label, first, second in rows:
        print(f"| {label} | {first * 1000:.1f} ms | {second * 1000:.1f} ms | {second / first:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
