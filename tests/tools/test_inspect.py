"""`loraforge inspect`: its numbers against dense computations, PEFT adapters, errors, the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from factory import tiny_gpt2, tiny_llama
from adapter_helpers import dense_deltas, make_adapter, make_peft_adapter, run_cli

from loraforge import LoraError
from loraforge.cli import main
from loraforge.tools.inspect import format_report, inspect_adapter, split_name


def test_numbers_match_a_dense_computation(tmp_path):
    path = make_adapter(tmp_path / "a", r=4, use_rslora=True, alpha_pattern={"v_proj": 3.0})
    report = inspect_adapter(path, tiny_llama())
    deltas, base = dense_deltas(path), dict(tiny_llama().named_modules())
    assert [m["module"] for m in report["modules"]] == sorted(deltas)
    for row in report["modules"]:
        dense = deltas[row["module"]].double()
        S = torch.linalg.svdvals(dense)
        energy = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        assert row["norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
        values = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(values, S[:4], rtol=1e-5, atol=1e-6)
        assert row["effective_rank_90"] == int((energy < 0.9).sum()) + 1
        assert row["effective_rank_99"] == int((energy < 0.99).sum()) + 1
        W = base[row["module"]].weight.detach().double()
        assert row["relative"] == pytest.approx(float(dense.norm() / W.norm()), rel=1e-5)
    v = next(m for m in report["modules"] if m["type"] == "self_attn.v_proj")
    assert v["scaling"] == pytest.approx(3.0 / 2.0)  # alpha_pattern, rsLoRA: 3 / sqrt(4)


def test_summaries_by_layer_and_type(tmp_path):
    report = inspect_adapter(make_adapter(tmp_path / "a"))
    rows = report["modules"]
    assert [g["layer"] for g in report["by_layer"]] == [0, 1]
    assert {g["type"] for g in report["by_type"]} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "mlp.down_proj"}
    layer0 = math.sqrt(sum(r["norm"] ** 2 for r in rows if r["layer"] == 0))
    assert report["by_layer"][0]["norm"] == pytest.approx(layer0)
    assert sum(g["share"] for g in report["by_type"]) == pytest.approx(1.0)
    assert report["total_norm"] == pytest.approx(math.sqrt(sum(r["norm"] ** 2 for r in rows)))
    assert rows[0]["relative"] is None  # no base model given
    text = format_report(report)
    assert "by layer:" in text and "model.layers.1.mlp.up_proj" in text and "/||W||" not in text


def test_split_name():
    assert split_name("model.layers.11.self_attn.q_proj") == (11, "self_attn.q_proj")
    assert split_name("transformer.h.0.attn.c_attn") == (0, "attn.c_attn")
    assert split_name("lm_head") == (None, "lm_head")


def test_untrained_adapter_is_reported_as_zero(tmp_path):
    path = make_adapter(tmp_path / "a", std=0.0)
    report = inspect_adapter(path)
    assert all(r["norm"] == 0 and r["effective_rank_90"] == 0 for r in report["modules"])
    assert any("dW = 0" in n for n in report["notes"])


def test_peft_made_adapter(tmp_path):
    peft_model = make_peft_adapter(tmp_path / "p")
    report = inspect_adapter(tmp_path / "p", tiny_llama())
    assert len(report["modules"]) == 6  # q, v, down in 2 layers
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "get_delta_weight")}
    for row in report["modules"]:
        dense = layers[row["module"]].get_delta_weight("default").double()
        assert row["norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
        values = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(values, torch.linalg.svdvals(dense)[:4], rtol=1e-5, atol=1e-6)


def test_errors(tmp_path):
    path = make_adapter(tmp_path / "a")
    with pytest.raises(LoraError, match="has no module 'model.layers.0.mlp.down_proj'"):
        inspect_adapter(path, tiny_gpt2())
    with pytest.raises(LoraError, match="does not exist"):
        inspect_adapter(tmp_path / "missing")


def test_cli_json_and_plot(tmp_path):
    path = make_adapter(tmp_path / "a")
    png = tmp_path / "plots" / "norms.png"
    result = run_cli("inspect", path, "--json", "--plot", png)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert len(report["modules"]) == 14 and report["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraforge inspect: error:") and err.count("\n") == 1
