"""Shared fixtures for the core suite: tiny random models built in code (no downloads).

`llama()` / `gpt2()` build a fresh, seeded model in eval mode; building the same one twice gives
identical weights, so a "fresh base" for a round trip is just another call. `randomize_adapters`
makes freshly attached adapters non-zero (B starts at zero, so the update would be zero).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from train_fixture import save_tiny_llama, write_data
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)

VOCAB = 128


def build_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def build_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": build_llama, "gpt2": build_gpt2}


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> torch.nn.Module:
    """Give every adapter a non-zero update: random lora_B / embedding factors, a DoRA magnitude
    perturbed away from the row norms, noise on modules_to_save copies. Works on loraforge and
    on PEFT models (whose embedding init zeroes lora_embedding_A instead of B)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save." in name:  # the per-adapter copy, never the original
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def llama():
    return build_llama()


@pytest.fixture
def gpt2():
    return build_gpt2()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))


# Saved tiny model directory and demo-task data, for the CLI tests (one per test module).
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("data"))
