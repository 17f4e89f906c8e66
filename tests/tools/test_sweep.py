"""`loraforge sweep`: config parsing, and an end-to-end run of two configurations on a tiny model."""
from __future__ import annotations

import json

import pytest
from factory import save_tiny_llama

from loraforge import LoraError
from loraforge.cli import main
from loraforge.demo.tasks import make_examples
from loraforge.tools.sweep import parse_configs


def test_parse_configs():
    configs = parse_configs("attention:16, all-linear:8,q_proj+v_proj:4")
    assert [(c.targets, c.rank) for c in configs] == [("attention", 16), ("all-linear", 8), ("q_proj,v_proj", 4)]
    assert configs[2].slug == "q_proj+v_proj-r4"
    for bad, needle in [("attention", "targets:rank"), ("attention:0", "rank >= 1"), ("mlp:8,mlp:8", "twice"),
                        ("", "empty")]:
        with pytest.raises(LoraError, match=needle):
            parse_configs(bad)


def _tiny_model_dir(path):
    return save_tiny_llama(path, tied=False, context=256)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_end_to_end(tmp_path, capsys):
    model = _tiny_model_dir(tmp_path / "model")
    data = _jsonl(tmp_path / "train.jsonl", make_examples(16, task="extract", split="train"))
    held_out = _jsonl(tmp_path / "test.jsonl", make_examples(3, task="extract", split="test"))
    out = tmp_path / "sweep"
    rc = main(["sweep", "--data", str(data), "--configs", "attention:4,mlp:2", "--budget-from", "all-linear:2",
               "--steps", "2", "--model", str(model), "--eval-data", str(held_out), "--out", str(out),
               "--batch-size", "2", "--max-tokens", "128"])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    # LoRA adds r x (in + out) per module. Per layer: attention (q 64x64, k and v 32x64, o 64x64) and
    # mlp (gate and up 128x64, down 64x128); two layers.
    assert results["budget_params"] == 2 * 2 * (128 + 96 + 96 + 128 + 3 * 192)  # all-linear:2 = 4096
    rows = {r["config"]: r for r in results["results"]}
    assert rows["attention:4"]["trainable_params"] == 2 * 4 * (128 + 96 + 96 + 128)  # 3584
    assert rows["mlp:2"]["trainable_params"] == 2 * 2 * 3 * 192  # 2304
    assert rows["attention:4"]["budget_ratio"] == pytest.approx(3584 / 4096)
    for row in rows.values():
        assert row["eval_loss"] > 0 and 0 <= row["exact_match"] <= 1 and row["train_seconds"] > 0
        assert (tmp_path / "sweep" / row["adapter"].split("/")[-1] / "adapter_model.safetensors").exists()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "attention:4" in printed and "x all-linear:2" in printed and "0.88" in printed
