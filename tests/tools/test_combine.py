"""`loraforge combine`: cat is exact, svd is Eckart–Young, TIES and DARE follow their papers,
mismatched adapters are refused, and the CLI works end to end."""
from __future__ import annotations

import pytest
import torch
from factory import tiny_llama
from adapter_helpers import dense_deltas, make_adapter, run_cli

from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.core.io import read_adapter, save_adapter
from loraforge.core.ops import attach
from loraforge.tools.combine import combine_adapters, dare_merge, ties_merge, trim


@pytest.fixture
def pair(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=4, alpha=8.0)
    b = make_adapter(tmp_path / "b", seed=2, r=2, alpha=6.0, use_rslora=True)
    return a, b


# --- the rules on hand-made matrices ------------------------------------------------------------
T1 = torch.tensor([[5.0, -1.0, 2.0], [0.5, -4.0, 3.0]])
T2 = torch.tensor([[-2.0, -3.0, 1.0], [6.0, -5.0, -3.5]])


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(trim(T1, 0.5), torch.tensor([[5.0, 0, 0], [0, -4.0, 3.0]]))
    assert torch.equal(trim(T2, 0.5), torch.tensor([[0, 0, 0], [6.0, -5.0, -3.5]]))
    assert torch.equal(trim(torch.tensor([1.0, -1.0, 0.5, 1.0]), 0.25), torch.tensor([1.0, -1.0, 0, 1.0]))  # ties kept
    assert torch.equal(trim(T1, 1.0), T1)


def test_ties_trim_elect_disjoint_mean():
    # trimmed: T1 -> [[5,0,0],[0,-4,3]], T2 -> [[0,0,0],[6,-5,-3.5]]; summed mass [[5,0,0],[6,-9,-0.5]]
    # elected signs [[+,0,0],[+,-,-]]; (1,1): mean(-4,-5); (1,2): only T2 agrees with the sign "-"
    expected = torch.tensor([[5.0, 0.0, 0.0], [6.0, -4.5, -3.5]])
    assert torch.equal(ties_merge([T1, T2], density=0.5), expected)
    assert torch.equal(ties_merge([T1, T2], density=1.0),  # nothing trimmed: per-entry mean of the agreeing
                       torch.tensor([[5.0, -2.0, 1.5], [3.25, -4.5, -3.5]]))
    assert torch.equal(ties_merge([2 * T1], density=1.0), 2 * T1)


def test_dare_drops_and_rescales_with_the_seeded_draw():
    merged = dare_merge([T1, T2], 0.5, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    keep1, keep2 = torch.rand(T1.shape, generator=gen) < 0.5, torch.rand(T2.shape, generator=gen) < 0.5
    assert torch.equal(merged, torch.where(keep1, T1 * 2, 0.0) + torch.where(keep2, T2 * 2, 0.0))
    assert torch.equal(dare_merge([T1, T2], 1.0, torch.Generator()), T1 + T2)  # density 1: plain sum
    draws = torch.stack([dare_merge([T1], 0.3, torch.Generator().manual_seed(s)) for s in range(4000)])
    assert set(draws.unique().tolist()) <= {0.0, *(T1 / 0.3).flatten().tolist()}
    torch.testing.assert_close(draws.mean(0), T1, atol=0.25, rtol=0.05)  # unbiased: E = T1


# --- whole adapters ---------------------------------------------------------------------------
def test_cat_is_the_weighted_sum(pair, tmp_path):
    a, b = pair
    report = combine_adapters([a, b], tmp_path / "c", [1.0, -0.5], "cat")
    assert {r["rank"] for r in report["modules"]} == {6}
    da, db, dc = dense_deltas(a), dense_deltas(b), dense_deltas(tmp_path / "c")
    for name in da:
        torch.testing.assert_close(dc[name], da[name] - 0.5 * db[name], atol=1e-5, rtol=1e-5)
    config, _ = read_adapter(tmp_path / "c")
    assert config.r == 6 and config.alpha == 6.0 and not config.use_rslora


def test_svd_is_the_best_approximation_of_the_sum(pair, tmp_path):
    a, b = pair
    report = combine_adapters([a, b], tmp_path / "c", [0.7, 1.3], "svd", rank=3)
    da, db, dc = dense_deltas(a), dense_deltas(b), dense_deltas(tmp_path / "c")
    for row in report["modules"]:
        U, S, Vh = torch.linalg.svd((0.7 * da[row["module"]] + 1.3 * db[row["module"]]).double())
        torch.testing.assert_close(dc[row["module"]].double(), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3],
                                   atol=1e-5, rtol=1e-5)
        assert row["energy_kept"] == pytest.approx(float((S[:3] ** 2).sum() / (S ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_on_adapters_at_full_rank(pair, tmp_path, method):
    a, b = pair
    combine_adapters([a, b], tmp_path / "c", [1.0, 0.5], method, rank=1000, density=0.4, seed=3)
    da, db, dc = dense_deltas(a), dense_deltas(b), dense_deltas(tmp_path / "c")
    gen = torch.Generator().manual_seed(3)
    for name in sorted(da):  # modules are combined in sorted order (the DARE draws follow it)
        parts = [da[name], 0.5 * db[name]]
        expected = ties_merge(parts, 0.4) if method == "ties" else dare_merge(parts, 0.4, gen)
        torch.testing.assert_close(dc[name], expected, atol=1e-4, rtol=1e-4)  # rank capped at min(out, in): exact


# --- refusals -----------------------------------------------------------------------------------
def test_refuses_different_bases(tmp_path):
    a = make_adapter(tmp_path / "a", base_model_name_or_path="org/model-a")
    b = make_adapter(tmp_path / "b", base_model_name_or_path="org/model-b")
    with pytest.raises(LoraError, match="different base models: .*'org/model-a'.*'org/model-b'"):
        combine_adapters([a, b], tmp_path / "c")


def test_refuses_different_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=128))
    attach(small, LoraConfig(r=4, base_model_name_or_path="tiny-llama"))
    b = save_adapter(small, tmp_path / "b")
    a = make_adapter(tmp_path / "a")
    with pytest.raises(LoraError, match=r"module model.layers.0.mlp.down_proj has dW of shape \(64, 128\) in "
                                        r".* but \(32, 64\) in .*different base models"):
        combine_adapters([a, b], tmp_path / "c")


def test_different_targets_refused_unless_allowed(tmp_path):
    a = make_adapter(tmp_path / "a", target_modules="attention")
    b = make_adapter(tmp_path / "b", seed=2, target_modules="mlp")
    with pytest.raises(LoraError, match="adapt different modules .*--allow-different-targets"):
        combine_adapters([a, b], tmp_path / "c")
    combine_adapters([a, b], tmp_path / "c", method="cat", allow_different_targets=True)
    da, db, dc = dense_deltas(a), dense_deltas(b), dense_deltas(tmp_path / "c")
    assert set(dc) == set(da) | set(db)
    for name, delta in {**da, **db}.items():  # a missing module counts as dW = 0
        torch.testing.assert_close(dc[name], delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, needle", [
    ({"weights": [1.0]}, "2 adapters but 1 weights"),
    ({"method": "cat", "rank": 2}, "cat is exact"),
    ({"method": "ties", "density": 0.0}, "density must be in"),
    ({"method": "mean"}, "--method must be one of"),
])
def test_bad_requests(pair, tmp_path, kwargs, needle):
    with pytest.raises(LoraError, match=needle):
        combine_adapters(list(pair), tmp_path / "c", **kwargs)


def test_refuses_dora(tmp_path):
    a = make_adapter(tmp_path / "a", use_dora=True)
    b = make_adapter(tmp_path / "b")
    with pytest.raises(LoraError, match="DoRA adapter"):
        combine_adapters([a, b], tmp_path / "c")


def test_cli(pair, tmp_path):
    a, b = pair
    result = run_cli("combine", a, b, "--weights", "1", "0.5", "--method", "ties", "--rank", "4",
                     "--density", "0.5", "--out", tmp_path / "c")
    assert result.returncode == 0, result.stderr
    assert "combined 2 adapter(s) by ties (density 0.5)" in result.stdout and "rank per module: 4" in result.stdout
    config, tensors = read_adapter(tmp_path / "c")
    assert config.r == 4 and len(tensors) == 28
    model = tiny_llama()
    from loraforge.core.io import load_adapter

    load_adapter(model, tmp_path / "c")  # a valid adapter for the base it came from
