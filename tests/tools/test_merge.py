"""`loraforge merge`: onto the weights an adapter was trained over. An adapter trained over NF4 merges
into the dequantized NF4 weights by default (the merged model computes what was trained), or into
the original float weights on request; the KL divergence from the unmerged model says which is
faithful."""
from __future__ import annotations

import pytest
import torch
from cli_helpers import FAST, write_data
from factory import save_tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from loraforge.cli import main
from loraforge.tools.merge import PROBE_TEXTS, merged_model, probe_logprobs

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge")
    model = save_tiny_llama(root / "model", hidden=128)  # NF4 needs rows of >= 64 values
    data = write_data(root / "data", n_train=24, n_test=4)
    runs = {}
    for name, extra in {"nf4": ["--quantize", "nf4"], "plain": []}.items():
        assert main(["train", "--model", str(model), "--data", str(data["train"]), "--out", str(root / name),
                     "--max-steps", "3", "--targets", "q_proj,v_proj", "--save-every", "0", *FAST, *extra,
                     "--lr", "0.05"]) == 0
        runs[name] = root / name
    return {"model": model, **runs}


def test_an_nf4_adapter_merges_onto_the_dequantized_weights_by_default(trained, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(trained["model"]), "--adapter", str(trained["nf4"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged onto the dequantized nf4 weights it was trained over" in printed
    faithful = float(printed.split("KL(unmerged as trained || merged) = ")[1].split(" ")[0])
    assert main(["merge", "--model", str(trained["model"]), "--adapter", str(trained["nf4"]),
                 "--out", str(tmp_path / "orig"), "--base-weights", "original"]) == 0
    printed = capsys.readouterr().out
    assert "merged onto the original float weights (it was trained over nf4)" in printed
    drifted = float(printed.split("KL(unmerged as trained || merged) = ")[1].split(" ")[0])
    assert faithful < drifted / 20, (faithful, drifted)
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain model: no quantized layers, no adapter
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())


def test_the_merged_model_computes_the_unmerged_quantized_one(trained):
    from loraforge.core.io import load_adapter
    from loraforge.tools.merge import training_config, trained_base

    merged, tokenizer, report = merged_model(str(trained["model"]), trained["nf4"])
    assert report["base_weights"] == "dequantized" and report["quantize"] == "nf4"
    unmerged = trained_base(str(trained["model"]), training_config(trained["nf4"]))
    load_adapter(unmerged, trained["nf4"])
    for ref, got in zip(probe_logprobs(unmerged, tokenizer), probe_logprobs(merged, tokenizer)):
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)  # bf16 compute in the 4-bit layers


def test_a_float_adapter_merges_onto_the_original_weights(trained):
    _, _, report = merged_model(str(trained["model"]), trained["plain"])
    assert report == {**report, "base_weights": "original", "quantize": None}
    assert report["kl"] < 1e-8 and report["probe_tokens"] == sum(
        len(tiny_tokenizer()(t)["input_ids"]) for t in PROBE_TEXTS)


def test_dequantized_needs_a_quantized_training_run(trained, tmp_path, capsys):
    assert main(["merge", "--model", str(trained["model"]), "--adapter", str(trained["plain"]),
                 "--out", str(tmp_path / "m"), "--base-weights", "dequantized"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "records no quantized base" in err and not (tmp_path / "m").exists()


def test_export_merged_reports_the_same_choice(trained, tmp_path, capsys):
    pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(trained["model"]), "--adapter", str(trained["nf4"]), "--merged",
                 "--out", str(out)]) == 0
    assert "merged onto the dequantized nf4 weights" in capsys.readouterr().out and out.is_file()
