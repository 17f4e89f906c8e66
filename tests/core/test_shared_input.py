"""Unmerged inference fast paths (core.layers.SharedInput, in-place addmm): the same outputs as
the plain path (the gradient-enabled forward, which uses neither), and no stale reuse."""
from __future__ import annotations

import pytest
import torch
from factory import randomize_adapters, tiny_arch, tiny_llama

from loraforge.core.config import LoraConfig
from loraforge.core.ops import attach, lora_layers, set_adapter


def adapted(name: str = "llama", **config):
    model = tiny_llama() if name == "llama" else tiny_arch(name)
    attach(model, LoraConfig(r=4, target_modules="all-linear", **config))
    return randomize_adapters(model)


def plain_logits(model, ids) -> torch.Tensor:
    """The path without the fast paths: autograd on (no sharing, no in-place)."""
    with torch.enable_grad():
        return model(ids).logits.detach()


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "gemma2", "opt"])
def test_shared_A_products_equal_the_plain_path(name):
    model, ids = adapted(name), torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    groups = {id(layer.shared_input) for _, layer in lora_layers(model) if layer.shared_input is not None}
    assert len(groups) == (2 if name == "opt" else 4)  # q/k/v per layer, and gate/up where the MLP has them
    with torch.no_grad():
        fast = model(ids).logits
    torch.testing.assert_close(fast, plain_logits(model, ids), rtol=1e-5, atol=1e-5)  # float rounding only


def test_a_different_input_or_a_changed_A_is_never_served_from_the_cache():
    model = adapted()
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(1)
    h1, h2 = torch.randn(1, 5, 64, generator=gen), torch.randn(1, 5, 64, generator=gen)
    with torch.no_grad():
        attn.q_proj(h1)  # computes the group's product for h1
        k_after_q = attn.k_proj(h2)  # another tensor: computed afresh
        attn.k_proj.lora_A["default"].weight.mul_(2.0)
        attn.q_proj(h2)
        k_new_A = attn.k_proj(h2)  # A changed: the stacked A is rebuilt
    with torch.enable_grad():
        k_plain = attn.k_proj(h2).detach()
        attn.k_proj.lora_A["default"].weight.data.div_(2.0)
        k_plain_old = attn.k_proj(h2).detach()
    torch.testing.assert_close(k_new_A, k_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_after_q, k_plain_old, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(k_new_A, k_after_q)


def test_two_active_adapters_add_both_increments():
    """In place only for a single adapter: with two, each increment is taken against the base output."""
    model = adapted()
    attach(model, LoraConfig(r=2, target_modules="all-linear"), "second")
    randomize_adapters(model, seed=7)
    set_adapter(model, ["default", "second"])
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model(ids).logits
    torch.testing.assert_close(fast, plain_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_training_gradients_reach_every_A():
    model = adapted().train()
    model(torch.randint(3, 100, (1, 7))).logits.sum().backward()
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, p).lora_A["default"].weight.grad is not None for p in ("q_proj", "k_proj", "v_proj"))


def test_under_inference_mode():
    """Tensors made under torch.inference_mode keep no version counter; the fast paths still apply."""
    model, ids = adapted(), torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        fast = model(ids).logits.clone()
    torch.testing.assert_close(fast, plain_logits(model, ids), rtol=1e-5, atol=1e-5)
