"""The layer math, one wrapper at a time: init, scaling, forward, merge/unmerge, DoRA, PiSSA,
several adapters on one layer."""
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge import LoraError
from loraforge.core.layers import LoraConv1D, LoraEmbedding, LoraLinear, lora_layer_type

IN, OUT, VOCAB, DIM = 32, 24, 50, 16

KINDS = ["linear", "conv1d", "embedding"]
OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "dropout": {"dropout": 0.3},
}
CASES = [(k, o) for k in KINDS for o in OPTIONS if not (k == "embedding" and o in ("dora", "pissa"))]


def make_base(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(IN, OUT)
    if kind == "conv1d":
        base = Conv1D(OUT, IN)  # Conv1D(nf=out, nx=in): weight (in x out)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
        return base
    return nn.Embedding(VOCAB, DIM)


def make_input(kind: str, batch: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if kind == "embedding":
        return torch.randint(0, VOCAB, (batch, 5), generator=gen)
    return torch.randn(batch, 5, IN, generator=gen)


def wrap(kind: str, r: int = 4, alpha: float = 8.0, name: str = "default", seed: int = 0, **opts):
    base = make_base(kind, seed)
    reference = make_base(kind, seed)
    layer = lora_layer_type(base)(base)
    layer.add_adapter(name, r, alpha, **opts)
    layer.active_adapters = [name]
    return layer.eval(), reference.eval()


def randomize(layer, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if "lora_B" in pname or "lora_embedding" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in pname:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def base_matrix(layer) -> torch.Tensor:
    """The layer's base weight as stored (layout of the base layer), detached copy."""
    return layer.base_layer.weight.detach().clone()


def test_dispatch():
    assert lora_layer_type(nn.Linear(2, 2)) is LoraLinear
    assert lora_layer_type(Conv1D(2, 2)) is LoraConv1D
    assert lora_layer_type(nn.Embedding(2, 2)) is LoraEmbedding
    assert lora_layer_type(nn.LayerNorm(2)) is None


@pytest.mark.parametrize("kind, option", CASES)
def test_zero_update_at_init(kind, option):
    layer, reference = wrap(kind, **OPTIONS[option])
    x = make_input(kind)
    with torch.no_grad():
        got, want = layer(x), reference(x)
    if option == "pissa":  # the base weight holds the residual: equal within float tolerance
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_init_distributions(kind):
    layer, _ = wrap(kind, r=4)
    A, B = layer.factors("default")
    out_f, in_f = (DIM, VOCAB) if kind == "embedding" else (OUT, IN)
    assert tuple(A.shape) == (4, in_f) and tuple(B.shape) == (out_f, 4)
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0


def test_gaussian_init_std():
    big = LoraLinear(nn.Linear(4096, 64))
    big.add_adapter("g", 4, 8, init="gaussian")
    assert big.lora_A["g"].weight.std().item() == pytest.approx(1 / 4, rel=0.05)


@pytest.mark.parametrize("use_rslora, expected", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_layer_scaling(use_rslora, expected):
    layer, _ = wrap("linear", r=4, alpha=8, use_rslora=use_rslora)
    assert layer.scaling["default"] == pytest.approx(expected)


@pytest.mark.parametrize("kind, option", [c for c in CASES if c[1] not in ("dora", "pissa")])
def test_forward_matches_dense_update(kind, option):
    """Plain / rsLoRA / gaussian / dropout (in eval): output = base(x) with W + B A * s.
    (DoRA has its own formula test; PiSSA is checked through merge.)"""
    layer, reference = wrap(kind, **OPTIONS[option])
    randomize(layer)
    x = make_input(kind)
    delta = layer.delta_weight("default")
    with torch.no_grad():
        reference.weight += delta.T if kind == "conv1d" else delta
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, option", CASES)
def test_merge_unmerge(kind, option):
    layer, _ = wrap(kind, **OPTIONS[option])
    randomize(layer)
    x = make_input(kind)
    before = base_matrix(layer)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(base_matrix(layer), before)
        merged = layer(x)
        layer.unmerge()
        again = layer(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base_matrix(layer), before, atol=1e-5, rtol=1e-5)
    assert not layer.merged


def test_merge_names_not_on_layer_merges_nothing():
    layer, _ = wrap("linear")
    randomize(layer)
    before = base_matrix(layer)
    layer.merge([])
    assert torch.equal(base_matrix(layer), before) and not layer.merged


def test_dropout_active_in_train_only():
    layer, _ = wrap("linear", dropout=0.5)
    randomize(layer)
    x = make_input("linear")
    with torch.no_grad():
        eval_out = layer(x)
        layer.train()
        torch.manual_seed(0)
        train_out = layer(x)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    assert not torch.allclose(eval_out, train_out)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_magnitude_init_is_row_norm(kind):
    layer, reference = wrap(kind, use_dora=True)
    W = reference.weight.detach()
    W = W.T if kind == "conv1d" else W  # (out x in)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), W.norm(dim=1))
    assert layer.lora_magnitude_vector["default"].shape == (OUT,)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_forward_formula(kind):
    """DoRA: y = m * (W + dW) x / ||W + dW|| + b (row norms over the input dimension)."""
    layer, reference = wrap(kind, use_dora=True)
    randomize(layer)
    x = make_input(kind)
    W = reference.weight.detach()
    W = W.T if kind == "conv1d" else W
    V = W + layer.delta_weight("default")
    m = layer.lora_magnitude_vector["default"].detach()
    expected = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + reference.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_pissa_factors_hold_top_singular_directions():
    layer, reference = wrap("linear", r=4, alpha=8, init="pissa")
    W = reference.weight.detach()
    S = torch.linalg.svdvals(W)
    delta = layer.delta_weight("default")
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], S[:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.base_layer.weight.detach() + delta, W, atol=1e-5, rtol=1e-5)
    # the residual keeps the remaining singular values
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight.detach())[:4], S[4:8],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("option", ["dora", "pissa"])
def test_embedding_refuses_dora_and_pissa(option):
    layer = LoraEmbedding(nn.Embedding(VOCAB, DIM))
    with pytest.raises(LoraError, match="not on embeddings"):
        layer.add_adapter("x", 4, 8, **OPTIONS[option])


@pytest.mark.parametrize("kind, dora", [("linear", False), ("linear", True), ("conv1d", True), ("embedding", False)])
def test_two_active_adapters_add_up(kind, dora):
    """Two active adapters on one layer: the output is base + both increments (each computed
    against the base output), for plain LoRA and DoRA alike."""
    layer, _ = wrap(kind, use_dora=dora)
    layer.add_adapter("second", 2, 4, use_dora=dora)
    randomize(layer)
    x = make_input(kind)
    with torch.no_grad():
        base = layer.base_layer(x)
        layer.active_adapters = ["default"]
        one = layer(x) - base
        layer.active_adapters = ["second"]
        two = layer(x) - base
        layer.active_adapters = ["default", "second"]
        both = layer(x)
    torch.testing.assert_close(both, base + one + two, atol=1e-5, rtol=1e-5)


def test_active_adapter_missing_on_layer_is_skipped():
    layer, reference = wrap("linear")
    randomize(layer)
    layer.active_adapters = ["elsewhere"]
    x = make_input("linear")
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))


def test_disabled_layer_is_base_even_when_merged():
    layer, reference = wrap("linear", use_dora=True)
    randomize(layer)
    layer.merge()
    layer.disabled = True
    x = make_input("linear")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_row_routing(kind):
    layer, reference = wrap(kind)
    layer.add_adapter("other", 2, 4)
    randomize(layer)
    x = make_input(kind)
    with torch.no_grad():
        solo = {}
        for name in ("default", "other"):
            layer.active_adapters = [name]
            solo[name] = layer(x)
        layer.row_adapters = [("default", torch.tensor([0, 2])), ("other", torch.tensor([1]))]
        mixed = layer(x)
    torch.testing.assert_close(mixed[[0, 2]], solo["default"][[0, 2]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], solo["other"][1], atol=1e-6, rtol=1e-6)
    assert torch.equal(mixed[3], reference(x)[3])


def test_row_routing_refuses_merged():
    layer, _ = wrap("linear")
    layer.merge()
    layer.row_adapters = [("default", torch.tensor([0]))]
    with pytest.raises(LoraError, match="unmerge"):
        layer(make_input("linear"))
