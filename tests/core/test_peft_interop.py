"""PEFT as an oracle, in both directions: our saved adapter loads in PEFT with the same logits,
PEFT's saved adapter loads in loraforge with the same logits, and both write the same keys."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from factory import tiny_gpt2, tiny_llama, logits, randomize_adapters
from loraforge.core.config import LoraConfig
from loraforge.core.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loraforge.core.ops import attach

peft = pytest.importorskip("peft")

QV = ["q_proj", "v_proj"]
# name: (model, loraforge LoraConfig kwargs); the PEFT config is derived by `peft_config`
CASES = {
    "plain": ("llama", {"r": 4, "alpha": 8, "target_modules": QV}),
    "rslora": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "use_rslora": True}),
    "dora": ("llama", {"r": 4, "alpha": 8, "target_modules": QV + ["down_proj"], "use_dora": True}),
    "embedding": ("llama", {"r": 4, "alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "gpt2-conv1d": ("gpt2", {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}),
    "gpt2-dora": ("gpt2", {"r": 4, "alpha": 8, "target_modules": ["c_attn"], "use_dora": True}),
    "rank_pattern": ("llama", {"r": 4, "alpha": 8, "target_modules": QV + ["up_proj"],
                               "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.up_proj": 8},
                               "alpha_pattern": {"q_proj": 2.0}}),
    "modules_to_save": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "modules_to_save": ["lm_head"]}),
    "modules_to_save-suffix": ("llama", {"r": 4, "alpha": 8, "target_modules": QV,
                                         "modules_to_save": ["embed_tokens", "lm_head"]}),
}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def peft_config(kind: str, kwargs: dict):
    return peft.LoraConfig(
        task_type="CAUSAL_LM", r=kwargs["r"], lora_alpha=kwargs["alpha"], target_modules=kwargs["target_modules"],
        use_rslora=kwargs.get("use_rslora", False), use_dora=kwargs.get("use_dora", False),
        rank_pattern=kwargs.get("rank_pattern", {}), alpha_pattern=kwargs.get("alpha_pattern", {}),
        modules_to_save=kwargs.get("modules_to_save"), fan_in_fan_out=kind == "gpt2")


def peft_keys(path) -> set[str]:
    """PEFT also stores the full base embedding when an embedding is targeted (its
    save_embedding_layers='auto'); that is a copy of the base weight, not part of the adapter."""
    return {k for k in load_file(path / WEIGHTS_NAME) if not k.endswith(".base_layer.weight")}


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("case", CASES)
def test_ours_loads_in_peft(case, ids, tmp_path):
    kind, kwargs = CASES[case]
    ours = randomize_adapters(attach(BUILD[kind](), LoraConfig(**kwargs)))
    expected = logits(ours, ids)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(BUILD[kind](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits(BUILD[kind](), ids), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_in_ours(case, ids, tmp_path):
    kind, kwargs = CASES[case]
    theirs = peft.get_peft_model(BUILD[kind](), peft_config(kind, kwargs)).eval()
    randomize_adapters(theirs, seed=2)
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours = BUILD[kind]()
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits(BUILD[kind](), ids), atol=1e-3)


@pytest.mark.parametrize("case", CASES)
def test_same_keys_shapes_and_config(case, tmp_path):
    kind, kwargs = CASES[case]
    ours = attach(BUILD[kind](), LoraConfig(**kwargs))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(BUILD[kind](), peft_config(kind, kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ours_tensors = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    peft_tensors = load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert set(ours_tensors) == peft_keys(tmp_path / "peft")
    for key, tensor in ours_tensors.items():
        assert tensor.shape == peft_tensors[key].shape and tensor.dtype == peft_tensors[key].dtype, key
    ours_json = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    peft_json = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                  "fan_in_fan_out", "modules_to_save", "bias"):
        assert ours_json[field] == peft_json[field], field
    assert sorted(ours_json["target_modules"]) == sorted(peft_json["target_modules"])


def test_key_examples(tmp_path):
    model = attach(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]))
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.lm_head.weight" in keys


def test_combined_and_pissa_adapters_load_in_peft(ids, tmp_path):
    """Adapters whose config we write ourselves (escaped per-module rank/alpha patterns from
    combine; PiSSA converted to a rank-2r LoRA on the original base) mean the same to PEFT."""
    from loraforge.core.ops import combine, set_adapter

    model = tiny_llama()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=QV), "a")
    attach(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj"], use_rslora=True), "b")
    randomize_adapters(model)
    combine(model, ["a", "b"], [0.7, -1.3], "ab")
    set_adapter(model, "ab")
    save_adapter(model, tmp_path / "ab", name="ab")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab").eval()
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=1e-5)

    pissa = randomize_adapters(attach(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=QV, init="pissa")))
    save_adapter(pissa, tmp_path / "pissa")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "pissa").eval()
    torch.testing.assert_close(logits(theirs, ids), logits(pissa, ids), atol=1e-5, rtol=1e-4)
