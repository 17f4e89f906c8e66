"""Helpers the tools tests share: adapters written in code (ours and PEFT's), dense reference
deltas, a CLI runner."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from factory import tiny_llama, randomize_adapters

from loraforge.core.config import LoraConfig
from loraforge.core.io import load_adapter, save_adapter
from loraforge.core.ops import attach, lora_layers

ROOT = Path(__file__).resolve().parents[2]
BASE = "tiny-llama"


def make_adapter(path: Path, seed: int = 1, std: float = 0.2, **config) -> Path:
    """A random adapter on the tiny Llama of conftest, saved by loraforge (PEFT format)."""
    model = tiny_llama()
    options = {"r": 4, "alpha": 8.0, "target_modules": "all-linear", "base_model_name_or_path": BASE, **config}
    torch.manual_seed(seed)
    attach(model, LoraConfig(**options))
    randomize_adapters(model, seed=seed, std=std)
    return save_adapter(model, path)


def make_peft_adapter(path: Path, seed: int = 1, r: int = 4, **config):
    """An adapter made and saved by PEFT itself; returns the PEFT model (adapter active)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    options = {"r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **config}
    model = get_peft_model(tiny_llama(), PeftLoraConfig(**options))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(path)
    return model.eval()


def loaded(path: Path):
    """The tiny Llama with the adapter at `path` loaded by loraforge's own loader."""
    model = tiny_llama()
    load_adapter(model, path)
    return model


def dense_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Reference dW per module, from the core layers (float32, out x in)."""
    return {name: layer.delta_weight("default") for name, layer in lora_layers(loaded(path))}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraforge", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
