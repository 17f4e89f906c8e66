"""Serving adapters that reach MoE experts and routers (LoRA on fused 3-D parameters,
core.layers.LoraParameter): in a mixed batch each row's tokens get their own adapter's expert
update, so every row's greedy text equals transformers' `generate` on the model with that
row's adapter merged (or the base model)."""
from __future__ import annotations

import pytest
from factory import randomize_adapters, tiny_arch
from test_architectures_serve import drive, generate_text, greedy, prompt_ids, word_tokenizer

from loraforge.core.config import LoraConfig
from loraforge.core.io import load_adapter, save_adapter
from loraforge.core.ops import attach, merge_and_unload
from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.engine import Engine

ADAPTERS = {"a": (4, "all-linear", 3), "b": (2, "mlp", 7)}  # name: (rank, targets, seed)


def save_adapters(arch: str, root):
    for name, (r, targets, seed) in ADAPTERS.items():
        model = attach(tiny_arch(arch), LoraConfig(r=r, alpha=2 * r, target_modules=targets), name)
        save_adapter(randomize_adapters(model, seed=seed), root / name, name)


def merged(arch: str, path):
    model = tiny_arch(arch)
    load_adapter(model, path)
    return merge_and_unload(model).eval()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_mixed_batch_of_expert_adapters_equals_each_row_alone_merged(arch, tmp_path):
    save_adapters(arch, tmp_path)
    prompts = prompt_ids(seed=2)
    names = ["a", "b", None, "a"]
    oracles = {None: tiny_arch(arch), **{n: merged(arch, tmp_path / n) for n in ADAPTERS}}
    expected = [generate_text(oracles[n], p) for n, p in zip(names, prompts)]
    base_texts = [generate_text(oracles[None], p) for p in prompts]
    assert all(e != b for e, b, n in zip(expected, base_texts, names) if n)  # the adapters change the output
    engine = Engine(tiny_arch(arch), word_tokenizer(), AdapterRegistry(tmp_path), max_batch=8, max_loaded=2,
                    prefill_tokens=4096)
    requests = [greedy(p, n) for n, p in zip(names, prompts)]
    assert drive(engine, requests, stagger=0) == expected  # one batch: three adapters' rows mixed
    assert drive(engine, requests, stagger=2) == expected  # rows joining between decode steps
    alone = [drive(engine, [request], stagger=0)[0] for request in requests[:2]]  # one adapter per batch
    assert alone == expected[:2]
