"""`loraforge resize`: exact at full rank, Eckart–Young below it, per-module ranks, DoRA, PEFT, CLI."""
from __future__ import annotations

import json
import re

import pytest
import torch
from factory import tiny_gpt2, tiny_llama, logits, randomize_adapters
from adapter_helpers import dense_deltas, loaded, make_adapter, make_peft_adapter, run_cli

from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.core.io import load_adapter, read_adapter, save_adapter
from loraforge.core.ops import attach
from loraforge.tools.resize import resize_adapter

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def test_full_rank_reproduces_the_outputs(tmp_path):
    path = make_adapter(tmp_path / "a", r=4, use_rslora=True, alpha_pattern={"q_proj": 2.0})
    report = resize_adapter(path, tmp_path / "b", rank=4)
    assert all(r["new_rank"] == 4 and r["energy_kept"] == pytest.approx(1.0) for r in report["modules"])
    torch.testing.assert_close(logits(loaded(tmp_path / "b"), IDS), logits(loaded(path), IDS), atol=1e-5, rtol=1e-5)
    capped = resize_adapter(path, tmp_path / "c", rank=100)  # above the adapter's rank: capped, still exact
    assert {r["new_rank"] for r in capped["modules"]} == {4}


def test_gpt2_conv1d_and_embedding_modules(tmp_path):
    model = tiny_gpt2()
    attach(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"]))
    randomize_adapters(model)
    path = save_adapter(model, tmp_path / "g")
    resize_adapter(path, tmp_path / "g4", rank=4)
    before, after = tiny_gpt2(), tiny_gpt2()
    load_adapter(before, path)
    load_adapter(after, tmp_path / "g4")
    torch.testing.assert_close(logits(after, IDS), logits(before, IDS), atol=1e-5, rtol=1e-5)
    _, tensors = read_adapter(tmp_path / "g4")
    assert tensors["base_model.model.transformer.wte.lora_embedding_A"].shape == (4, 128)


def test_truncation_is_the_best_approximation_and_energy_matches(tmp_path):
    path = make_adapter(tmp_path / "a", r=6, alpha=12.0)
    report = resize_adapter(path, tmp_path / "b", rank=2)
    before, after = dense_deltas(path), dense_deltas(tmp_path / "b")
    total_kept = total = 0.0
    for row in report["modules"]:
        U, S, Vh = torch.linalg.svd(before[row["module"]].double(), full_matrices=False)
        best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]  # Eckart–Young from the dense matrix
        torch.testing.assert_close(after[row["module"]].double(), best, atol=1e-5, rtol=1e-5)
        assert row["energy_kept"] == pytest.approx(float((S[:2] ** 2).sum() / (S ** 2).sum()), rel=1e-6)
        total_kept, total = total_kept + float((S[:2] ** 2).sum()), total + float((S ** 2).sum())
    assert report["energy_kept"] == pytest.approx(total_kept / total, rel=1e-6)
    assert report["bytes_after"] < report["bytes_before"]
    config, tensors = read_adapter(tmp_path / "b")
    assert config.r == 2 and config.alpha == 12.0 and not config.rank_pattern
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)


def test_energy_gives_per_module_ranks(tmp_path):
    path = make_adapter(tmp_path / "a", r=8)
    report = resize_adapter(path, tmp_path / "b", energy=0.9)
    deltas = dense_deltas(path)
    for row in report["modules"]:
        S = torch.linalg.svdvals(deltas[row["module"]].double())
        energy = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        assert row["new_rank"] == int((energy < 0.9).sum()) + 1 and row["energy_kept"] >= 0.9
    ranks = {row["module"]: row["new_rank"] for row in report["modules"]}
    assert len(set(ranks.values())) > 1  # random adapters: the 90% rank varies by module
    raw = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert raw["r"] in ranks.values() and raw["lora_alpha"] == 8.0  # alpha kept
    for pattern, k in raw["rank_pattern"].items():
        assert ranks[re.sub(r"\\(.)", r"\1", pattern)] == k
    model = loaded(tmp_path / "b")  # loads, with the per-module shapes
    assert model.model.layers[0].mlp.up_proj.r["default"] == ranks["model.layers.0.mlp.up_proj"]


def test_dora_keeps_magnitude_vectors(tmp_path):
    path = make_adapter(tmp_path / "a", use_dora=True)
    report = resize_adapter(path, tmp_path / "b", rank=4)
    assert any("DoRA" in n for n in report["notes"])
    _, old = read_adapter(path)
    _, new = read_adapter(tmp_path / "b")
    magnitudes = [k for k in old if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 14 and all(torch.equal(old[k], new[k]) for k in magnitudes)
    torch.testing.assert_close(logits(loaded(tmp_path / "b"), IDS), logits(loaded(path), IDS), atol=1e-5, rtol=1e-5)


def test_peft_made_adapter_resized_and_read_back_by_peft(tmp_path):
    from peft import PeftModel

    original = make_peft_adapter(tmp_path / "p", r=4)
    resize_adapter(tmp_path / "p", tmp_path / "full", rank=4)
    full = PeftModel.from_pretrained(tiny_llama(), tmp_path / "full").eval()
    torch.testing.assert_close(logits(full, IDS), logits(original, IDS), atol=1e-5, rtol=1e-5)
    resize_adapter(tmp_path / "p", tmp_path / "small", energy=0.8)  # per-module ranks via rank_pattern
    by_peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "small").eval()
    torch.testing.assert_close(logits(by_peft, IDS), logits(loaded(tmp_path / "small"), IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, needle", [({}, "needs --rank R or --energy"), ({"energy": 99}, "fraction in"),
                                            ({"rank": 0}, "must be >= 1")])
def test_errors(tmp_path, kwargs, needle):
    path = make_adapter(tmp_path / "a")
    with pytest.raises(LoraError, match=needle):
        resize_adapter(path, tmp_path / "b", **kwargs)


def test_refuses_to_overwrite_its_input(tmp_path):
    path = make_adapter(tmp_path / "a")
    with pytest.raises(LoraError, match="is the input"):
        resize_adapter(path, tmp_path / "a" / ".." / "a", rank=2)


def test_cli(tmp_path):
    path = make_adapter(tmp_path / "a", r=8)
    result = run_cli("resize", path, "--energy", "0.95", "--rank", "6", "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert "overall energy kept:" in result.stdout and "adapter_model.safetensors:" in result.stdout
    assert re.search(r"model\.layers\.0\.mlp\.up_proj +8 -> [1-6] ", result.stdout)
    config, _ = read_adapter(tmp_path / "b")
    assert config.r <= 6
