"""`loraforge estimate`: golden counts, agreement with a real attached model, bytes, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from loraforge import LoraError
from loraforge.cli import main
from loraforge.tools.estimate import estimate, nf4_bytes

ROOT = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=None)
def cached(model: str, rank: int, targets: str, **kw) -> dict:
    return estimate(model, rank, targets, **kw)


# --- golden numbers ---------------------------------------------------------------------------
def test_llama_7b_all_linear_r8():
    r = cached("llama-7b", 8, "all-linear")
    assert r["trainable_params"] == 19_988_480  # 624,640 per layer x 32 layers (docs/estimate.md)
    assert r["base_params"] == 6_738_415_616  # Llama-2-7b's real parameter count
    assert r["per_type"]["q_proj"] == 32 * 8 * (4096 + 4096)
    assert r["per_type"]["down_proj"] == 32 * 8 * (11008 + 4096)
    assert r["percent"] == pytest.approx(100 * 19_988_480 / 6_738_415_616)


def test_llama_7b_attention_r16():
    assert cached("llama-7b", 16, "attention")["trainable_params"] == 16_777_216


def test_presets_gqa_and_tied_embeddings():
    big = cached("llama-70b", 8, "k_proj")
    assert big["per_type"] == {"k_proj": 80 * 8 * (8192 + 1024)}  # 8 kv heads x 128 = 1024
    mistral = cached("mistral-7b", 8, "mlp")
    assert mistral["per_type"]["up_proj"] == 32 * 8 * (4096 + 14336)
    small = cached("smollm2-135m", 8, "all-linear")
    assert small["base_params"] == 134_515_008  # embeddings tied to the head: counted once
    assert cached("smollm2-135m-instruct", 8, "all-linear")["trainable_params"] == small["trainable_params"]


# --- bytes --------------------------------------------------------------------------------------
def test_lora_and_full_finetune_bytes():
    r = cached("llama-7b", 8, "all-linear")
    n, t = r["base_params"], r["trainable_params"]
    assert r["base_weight_bytes"] == 2 * n  # bfloat16
    assert r["gradient_bytes"] == 4 * t and r["optimizer_bytes"] == 8 * t  # float32 adapters, AdamW
    assert r["total_training_bytes"] == 2 * n + 16 * t
    assert r["full_finetune"]["bytes_per_param"] == 16
    assert r["full_finetune"]["total_training_bytes"] == 16 * n
    assert cached("llama-7b", 8, "all-linear", optimizer="adamw8bit")["optimizer_bytes"] == 2 * t
    assert cached("llama-7b", 8, "all-linear", optimizer="sgd")["optimizer_bytes"] == 0


def test_nf4_is_4_127_bits_per_weight():
    assert nf4_bytes(4096 * 4096) * 8 / (4096 * 4096) == pytest.approx(4.127, abs=1e-3)
    plain = cached("llama-7b", 8, "all-linear")
    for dtype, ratio in (("bfloat16", 4.127 / 16), ("float32", 4.127 / 32)):
        q = cached("llama-7b", 8, "all-linear", dtype=dtype, quantize="nf4")
        elem = 2 if dtype == "bfloat16" else 4
        unquantized = (q["base_params"] - q["quantized_params"]) * elem
        assert (q["base_weight_bytes"] - unquantized) / (q["quantized_params"] * elem) == pytest.approx(ratio, rel=1e-3)
    assert q["quantized_params"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # decoder Linear layers only
    assert q["total_training_bytes"] < plain["total_training_bytes"]


def test_int8_and_memory_verdict():
    q = cached("llama-7b", 8, "all-linear", quantize="int8", memory_gb=24.0)
    rows = 32 * (4 * 4096 + 2 * 11008 + 4096)  # one fp32 scale per output row
    assert q["base_weight_bytes"] == (q["base_params"] - q["quantized_params"]) * 2 + q["quantized_params"] + 4 * rows
    assert q["memory"]["fits"] and q["memory"]["margin_bytes"] == 24 * 2**30 - q["total_training_bytes"]
    assert not q["full_finetune"]["memory"]["fits"]
    assert not cached("llama-70b", 8, "all-linear", memory_gb=80.0)["memory"]["fits"]


# --- agreement with the trainer on a real tiny model -----------------------------------------
def test_local_dir_matches_attach(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraforge.core.config import LoraConfig
    from loraforge.core.io import WEIGHTS_NAME, save_adapter
    from loraforge.core.ops import attach, parameter_report

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    config.save_pretrained(tmp_path)
    targets = "q_proj,v_proj,down_proj,embed_tokens"
    planned = estimate(str(tmp_path), 4, targets)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    attach(model, LoraConfig(r=4, target_modules=targets.split(",")))
    report = parameter_report(model)
    assert planned["trainable_params"] == report["trainable_params"]
    assert planned["base_params"] == report["base_params"]
    assert planned["per_type"] == report["per_type"]
    save_adapter(model, tmp_path / "adapter")
    assert planned["adapter_file_bytes"] == (tmp_path / "adapter" / WEIGHTS_NAME).stat().st_size


# --- CLI --------------------------------------------------------------------------------------
def test_cli_json_end_to_end():
    out = subprocess.run([sys.executable, "-m", "loraforge", "estimate", "--model", "llama-7b", "--rank", "8",
                          "--targets", "all-linear", "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["trainable_params"] == 19_988_480
    assert result["full_finetune"]["bytes_per_param"] == 16
    assert result["settings"]["rank"] == 8


def test_cli_text_and_error(capsys):
    assert main(["estimate", "--model", "smollm2-135m", "--quantize", "nf4", "--memory-gb", "8"]) == 0
    text = capsys.readouterr().out
    assert "not counted: activations" in text and "16 B/param" in text and "FITS in 8.00 GiB" in text
    assert main(["estimate", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama-70b" in err and "smollm2-135m" in err


# --- errors -------------------------------------------------------------------------------------
def test_errors(tmp_path):
    with pytest.raises(LoraError, match="presets: llama-7b"):
        estimate("llama-8b")
    with pytest.raises(LoraError, match="presets: llama-7b"):
        estimate(str(tmp_path / "missing"))
    with pytest.raises(LoraError, match="no config.json"):
        estimate(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoraError, match="cannot read it as JSON"):
        estimate(str(tmp_path))
    with pytest.raises(LoraError, match="r must be a positive integer"):
        estimate("smollm2-135m", 0)
    assert "exceeds the smaller side" in estimate("smollm2-135m", 1000)["notes"][0]  # allowed, as in PEFT
    with pytest.raises(LoraError, match="match no adaptable module"):
        estimate("smollm2-135m", 8, "qkv_nope")
    with pytest.raises(LoraError, match="unknown optimizer"):
        estimate("smollm2-135m", optimizer="lion")
    with pytest.raises(LoraError, match="unknown dtype"):
        estimate("smollm2-135m", dtype="int3")
