"""serve.adapters.read_factors: the direct read (factors taken from the file once every module is
wrapped) gives exactly what the attach-and-delete path gives, on every architecture, with rsLoRA,
per-module ranks and alphas, and a low-precision base; and it checks what it reads."""
from __future__ import annotations

import copy

import pytest
import torch
from factory import ARCHITECTURES, randomize_adapters, tiny_arch, tiny_llama
from safetensors.torch import load_file, save_file

from loraforge import LoraError
from loraforge.core import io
from loraforge.core.config import LoraConfig
from loraforge.core.io import WEIGHTS_NAME, save_adapter
from loraforge.core.ops import attach, lora_layers
from loraforge.serve import adapters

MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}


def _saved(model, tmp_path, config, name="a"):
    trained = randomize_adapters(attach(copy.deepcopy(model), config, name), seed=3)
    return save_adapter(trained, tmp_path / name, name)


def _by_layer(named: dict | None) -> dict | None:
    return None if named is None else {layer: (A, B, s) for layer, A, B, s in named.values()}


def _attached(model, path) -> dict:
    return _by_layer(adapters._attached_factors(model, adapters.check_adapter(model, path)))


def _direct(model, path) -> dict | None:
    return _by_layer(adapters._direct_factors(model, adapters.check_adapter(model, path)))


def _assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for layer, (A, B, scaling) in want.items():
        gA, gB, gs = got[layer]
        assert gA.dtype == A.dtype and gB.dtype == B.dtype and gA.device == A.device
        assert torch.equal(gA, A) and torch.equal(gB, B), layer
        assert gs == scaling


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_direct_read_equals_the_attach_path(arch, tmp_path):
    model = tiny_arch(arch)
    path = _saved(model, tmp_path, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    first = adapters.read_factors(model, path)  # the first read wraps the modules
    assert not [n for n in getattr(model, "lora_configs", {})], "the scratch adapter is removed"
    attached = _attached(model, path)
    _assert_same(first, attached)
    direct = _direct(model, path)
    if arch in MOE:
        return  # expert parameters are not Linear wrappers: the attach path serves them
    assert direct is not None, "every module is a Linear wrapper: the direct path applies"
    _assert_same(direct, attached)
    _assert_same(adapters.read_factors(model, path), attached)


def test_direct_read_keeps_rslora_patterns_and_a_bf16_base(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    config = LoraConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True,
                        rank_pattern={"v_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 3.0})
    path = _saved(model, tmp_path, config)
    adapters.read_factors(model, path)
    attached = _attached(model, path)
    direct = _direct(model, path)
    assert direct is not None
    _assert_same(direct, attached)
    ranks = {A.shape[0] for A, _, _ in direct.values()}
    assert ranks == {2, 4, 6}
    assert {A.dtype for A, _, _ in direct.values()} == {torch.bfloat16}
    assert len({s for _, _, s in direct.values()}) == 4  # rsLoRA: alpha/sqrt(r) over ranks 2/4/6 and alpha 3


def test_an_adapter_with_a_module_not_yet_wrapped_takes_the_attach_path(tmp_path):
    model = tiny_llama()
    first = _saved(model, tmp_path, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), "first")
    wider = _saved(model, tmp_path, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "wider")
    adapters.read_factors(model, first)
    assert _direct(model, wider) is None
    factors = adapters.read_factors(model, wider)
    names = {layer: name for name, layer in lora_layers(model)}
    assert sorted({names[layer].rsplit(".", 1)[-1] for layer in factors}) == ["q_proj", "v_proj"]
    _assert_same(adapters.read_factors(model, wider), _attached(model, wider))


def test_the_direct_read_checks_the_factors_it_reads(tmp_path, monkeypatch):
    """Its own finite check, also when core.io's is not there (as test_hostile checks the cache)."""
    monkeypatch.setattr(io, "check_finite", lambda *args, **kwargs: None)
    model = tiny_llama()
    path = _saved(model, tmp_path, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    adapters.read_factors(model, path)
    tensors = load_file(path / WEIGHTS_NAME)
    key = next(k for k in tensors if "lora_B" in k and "v_proj" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path / WEIGHTS_NAME)
    assert _direct(model, path) is not None
    with pytest.raises(LoraError, match=r"v_proj.*lora_B holds NaN or infinite"):
        adapters.read_factors(model, path)


def test_a_wrong_shape_is_refused_before_any_factor_is_read(tmp_path):
    model = tiny_llama()
    path = _saved(model, tmp_path, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    adapters.read_factors(model, path)
    tensors = load_file(path / WEIGHTS_NAME)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(4, 7)
    save_file(tensors, path / WEIGHTS_NAME)
    with pytest.raises(LoraError, match="q_proj"):
        adapters.read_factors(model, path)
    assert not getattr(model, "lora_configs", {}), "nothing attached is left behind"
