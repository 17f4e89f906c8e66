"""`loraforge demo` end to end on the tiny model: score, train, score, merge check, GGUF export."""
from __future__ import annotations

import json

import pytest
from factory import save_tiny_llama

from loraforge.cli import main


def test_the_demo_runs_and_ends_with_the_llama_cpp_commands(tmp_path, capsys):
    pytest.importorskip("gguf")
    model = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(model), "--out", str(out), "--n-train", "40", "--n-test", "4",
                 "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| exact match  |" in printed and "merged vs unmerged logits max diff" in printed
    assert f"llama-cli -m {out / 'gguf' / 'demo.base.gguf'} --lora {out / 'gguf' / 'demo.gguf'}" in printed
    assert "ollama create demo -f Modelfile" in printed
    for name in ("demo.gguf", "demo.base.gguf", "Modelfile"):
        assert (out / "gguf" / name).is_file()
    results = json.loads((out / "demo_results.json").read_text())
    assert results["train"]["steps"] == 2 and results["gguf"]["kind"] == "adapter"
