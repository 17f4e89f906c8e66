"""The unmerged inference fast path (the B product added in place into the base output): the same
floats as the plain path (the gradient-enabled forward, which allocates a new output), and only
where nothing else reads the base output."""
from __future__ import annotations

import pytest
import torch
from factory import randomize_adapters, tiny_arch, tiny_llama

from loraforge.core.config import LoraConfig
from loraforge.core.ops import attach, set_adapter


def adapted(name: str = "llama"):
    model = tiny_llama() if name == "llama" else tiny_arch(name)
    attach(model, LoraConfig(r=4, target_modules="all-linear"))
    return randomize_adapters(model)


def plain_logits(model, ids) -> torch.Tensor:
    """The path without the fast path: autograd on (a new output tensor per LoRA layer)."""
    with torch.enable_grad():
        return model(ids).logits.detach()


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "gemma2", "opt"])
def test_in_place_increments_equal_the_plain_path_bit_for_bit(name, monkeypatch):
    model, ids = adapted(name), torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    copies, real_addmm = [], torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: copies.append(1) or real_addmm(*a, **k))
    with torch.no_grad():
        fast = model(ids).logits
    monkeypatch.undo()
    assert copies == []  # every increment was added in place
    assert torch.equal(fast, plain_logits(model, ids))


def test_two_active_adapters_add_both_increments():
    """In place only for a single adapter: with two, each increment is taken against the base output."""
    model = adapted()
    attach(model, LoraConfig(r=2, target_modules="all-linear"), "second")
    randomize_adapters(model, seed=7)
    set_adapter(model, ["default", "second"])
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model(ids).logits
    assert torch.equal(fast, plain_logits(model, ids))


def test_under_inference_mode():
    model, ids = adapted(), torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        fast = model(ids).logits.clone()
    assert torch.equal(fast, plain_logits(model, ids))


def test_training_gradients_reach_every_A():
    model = adapted().train()
    model(torch.randint(3, 100, (1, 7))).logits.sum().backward()
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, p).lora_A["default"].weight.grad is not None for p in ("q_proj", "k_proj", "v_proj"))
