"""The unmerged inference fast path (the B product added in place into the base output): the same
floats as the plain path (the gradient-enabled forward, which allocates a new output), and only
where nothing else reads the base output. With one plain adapter and no gradients, LoraLinear's
own short forward (`_inference_forward`) does it without the general routing code; every other
case (DoRA, live dropout, autocast to another dtype, two adapters, merged, disabled) takes the
general path."""
from __future__ import annotations

import pytest
import torch
from factory import randomize_adapters, tiny_arch, tiny_llama

from loraforge.core.config import LoraConfig
from loraforge.core.layers import LoraLinear
from loraforge.core.ops import attach, disabled, merge, set_adapter


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


def general_calls(monkeypatch) -> list:
    """Count LoraLinear.add_lora calls: the general path's increment (the short forward never calls it)."""
    calls, real = [], LoraLinear.add_lora
    monkeypatch.setattr(LoraLinear, "add_lora", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def test_one_plain_adapter_takes_the_short_forward_with_the_same_floats(monkeypatch):
    model, ids = adapted(), torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(5))
    want = plain_logits(model, ids)
    calls = general_calls(monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
    assert calls == [] and torch.equal(got, want)
    with torch.no_grad():  # batch 1, one token: the decode shape
        model(ids[:1, :1])
    assert calls == []


@pytest.mark.parametrize("case", ["dora", "dropout in training mode", "autocast", "adapter not on every layer"])
def test_other_cases_take_the_general_path(case, monkeypatch):
    config = LoraConfig(r=4, target_modules="all-linear", use_dora=case == "dora",
                        dropout=0.1 if case == "dropout in training mode" else 0.0)
    if case == "adapter not on every layer":
        config = LoraConfig(r=4, target_modules=["q_proj"])
    model = randomize_adapters(attach(tiny_llama(), config))
    if case == "dropout in training mode":
        model.train()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(6))
    calls = general_calls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = model(ids).logits
    if case == "adapter not on every layer":  # the layers without it return their base output
        assert len(calls) == 0
        with torch.no_grad(), disabled(model):
            assert not torch.equal(got, model(ids).logits)
        return
    assert len(calls) > 0
    if case != "dropout in training mode":  # (dropout draws random masks)
        monkeypatch.undo()
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            assert torch.equal(got, model(ids).logits.detach())


def test_merged_and_disabled_adapters_give_the_merged_and_base_outputs():
    model, ids = adapted(), torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with disabled(model):
            base = model(ids).logits
        unmerged = model(ids).logits
        merge(model)
        merged = model(ids).logits
        with disabled(model):  # disabling a merged adapter unmerges it first
            assert torch.allclose(model(ids).logits, base, atol=1e-5)
        again = model(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5) and not torch.allclose(unmerged, base, atol=1e-3)
    assert torch.allclose(again, unmerged, atol=1e-5)


def test_short_forward_under_autocast_of_its_own_dtype_equals_the_general_path(monkeypatch):
    """A bfloat16 model under bfloat16 autocast (how validation runs in training) keeps the short
    forward; its floats are the general path's."""
    from loraforge.core.layers import LoraLayer

    model = adapted().to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(8))
    calls = general_calls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        short = model(ids).logits
        assert calls == []
        monkeypatch.setattr(LoraLinear, "forward", LoraLayer.forward)
        general = model(ids).logits
    assert len(calls) > 0 and torch.equal(short, general)


@pytest.mark.parametrize("hook", ["none", "forward hook on the base layer", "global forward hook", "patched forward"])
def test_short_forward_calls_a_bare_linear_directly_and_honours_hooks(hook, monkeypatch):
    """A bare nn.Linear base is computed as F.linear (the same floats as its module call); a base
    layer with a hook or a patched forward (accelerate's offload does that) is still called."""
    model, ids = adapted(), torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(9))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        before = model(ids).logits
    seen = []

    def scale(module, args, output):
        seen.append(1)
        return output * 2

    handles = []
    if hook == "forward hook on the base layer":
        handles.append(layer.base_layer.register_forward_hook(scale))
    elif hook == "global forward hook":
        handles.append(torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: scale(m, a, o) if m is layer.base_layer else None))
    elif hook == "patched forward":
        real = layer.base_layer.forward
        layer.base_layer.forward = lambda x: scale(None, None, real(x))
    calls = general_calls(monkeypatch)
    try:
        with torch.no_grad():
            got = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
        layer.base_layer.__dict__.pop("forward", None)
    assert calls == []
    if hook == "none":
        assert torch.equal(got, before) and torch.equal(got, plain_logits(model, ids))
    else:
        assert seen == [1] and not torch.allclose(got, before, atol=1e-3)
