"""Adapter files: round trips (every option), names, several adapters, PiSSA conversion, the
pickle refusal, broken files, adapters that do not fit (model left untouched), atomic writes."""
import json

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from factory import tiny_gpt2, tiny_llama, logits, randomize_adapters
from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.core.io import (CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter, read_adapter,
                          save_adapter)
from loraforge.core.layers import LoraLayer
from loraforge.core.ops import ModulesToSave, attach, merge, set_adapter
from test_ops import BUILD, CASES, adapted


def untouched(model) -> bool:
    return (not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())
            and not getattr(model, "lora_configs", {}))


@pytest.mark.parametrize("case", CASES)
def test_round_trip(case, ids, tmp_path):
    kind, _ = CASES[case]
    model = adapted(case)
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = BUILD[kind]()
    config = load_adapter(fresh, tmp_path / "a")
    got = logits(fresh, ids)
    if case == "pissa":  # saved as a rank-2r LoRA on the original base
        assert config.r == 8 and config.init == "default"
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    else:
        assert torch.equal(got, expected)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference by default


def test_round_trip_after_merge_and_as_other_name(ids, tmp_path):
    model = adapted("dora")
    expected = logits(model, ids)
    merge(model)  # saving reads the factors, not the merged weights
    save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a", name="tenant_7", trainable=True)
    assert list(fresh.lora_configs) == ["tenant_7"]
    assert all(".tenant_7" in n for n, p in fresh.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-5, rtol=1e-5)


def test_several_named_adapters_from_files(ids, tmp_path):
    outs = {}
    for i, case in enumerate(["plain", "embedding", "patterns"]):
        model = randomize_adapters(adapted(case, randomize=False), seed=10 + i)
        outs[case] = logits(model, ids)
        save_adapter(model, tmp_path / case)
    model = tiny_llama()
    for case in outs:
        load_adapter(model, tmp_path / case, name=case)
    for case in ["patterns", "plain", "embedding"]:
        set_adapter(model, case)
        assert torch.equal(logits(model, ids), outs[case])
    with pytest.raises(LoraError, match="already has an adapter named 'plain'"):
        load_adapter(model, tmp_path / "plain", name="plain")


def test_saved_keys_and_config(tmp_path):
    model = tiny_llama()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=False,
                             modules_to_save=["lm_head"]), "x")
    attach(model, LoraConfig(r=2, target_modules="attention", use_dora=True), "y")
    save_adapter(model, tmp_path / "x", name="x")
    save_adapter(model, tmp_path / "y", name="y")
    keys = set(load_file(tmp_path / "x" / WEIGHTS_NAME))
    assert keys == {"base_model.model.lm_head.weight",
                    "base_model.model.model.embed_tokens.lora_embedding_A",
                    "base_model.model.model.embed_tokens.lora_embedding_B",
                    *(f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
                      for i in range(2) for ab in "AB")}
    y = load_file(tmp_path / "y" / WEIGHTS_NAME)
    assert y["base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector"].shape == (32,)
    assert len(y) == 2 * 4 * 3
    config = json.loads((tmp_path / "y" / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # preset made concrete
    assert config["use_dora"] is True and config["peft_type"] == "LORA" and config["r"] == 2
    assert adapter_state_dict(model, "x").keys() == keys


def test_target_names_fall_back_to_full_paths(tmp_path):
    model = attach(tiny_gpt2(), LoraConfig(r=2, target_modules=["attn.c_proj"]))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    # `c_proj` alone would also select mlp.c_proj
    assert config["target_modules"] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D stores weights (in x out), as PEFT writes


def test_read_adapter(tmp_path):
    model = adapted("patterns")
    save_adapter(model, tmp_path / "a")
    config, tensors = read_adapter(tmp_path / "a")
    assert config.rank_pattern == {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}
    assert config.alpha_pattern == {"q_proj": 3.0}
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (6, 128)


def test_save_unknown_adapter(tmp_path):
    model = adapted("plain")
    with pytest.raises(LoraError, match="cannot save adapter 'other': the model has default"):
        save_adapter(model, tmp_path / "a", name="other")


# --- refusing and reporting broken files -------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = adapted("plain")
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _one_line_error(path, needles, model=None):
    model = tiny_llama() if model is None else model
    with pytest.raises(LoraError) as info:
        load_adapter(model, path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert untouched(model)
    return message


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_file_refused_as_path(tmp_path, suffix):
    path = tmp_path / f"adapter_model{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    _one_line_error(path, ["refusing to load", "pickle", "safetensors"])


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_in_dir_refused(saved, suffix):
    (saved / WEIGHTS_NAME).unlink()
    torch.save({"x": torch.zeros(1)}, saved / f"adapter_model{suffix}")
    _one_line_error(saved, ["refusing to load", f"adapter_model{suffix}", "pickle"])


@pytest.mark.parametrize("damage, needles", [
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
     [WEIGHTS_NAME, "not a readable safetensors file"]),
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:200]),
     [WEIGHTS_NAME, "not a readable safetensors file"]),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b""), [WEIGHTS_NAME, "not a readable safetensors file"]),
    (lambda d: (d / CONFIG_NAME).unlink(), ["has no adapter_config.json"]),
    (lambda d: (d / WEIGHTS_NAME).unlink(), ["has no adapter_model.safetensors"]),
    (lambda d: (d / CONFIG_NAME).write_text("{oops"), [CONFIG_NAME, "not valid JSON"]),
    (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), [CONFIG_NAME, "expected a JSON object"]),
    (lambda d: (d / CONFIG_NAME).write_text('{"r": 0, "target_modules": ["q_proj"]}'),
     [CONFIG_NAME, "r must be a positive integer"]),
    (lambda d: save_file({"foo": torch.zeros(2)}, d / WEIGHTS_NAME), ["holds no LoRA weights"]),
])
def test_broken_files(saved, damage, needles):
    damage(saved)
    _one_line_error(saved, needles)


def test_missing_directory(tmp_path):
    _one_line_error(tmp_path / "nope", ["does not exist"])


def test_adapter_for_another_architecture(saved):
    _one_line_error(saved, ["has weights for module 'model.layers.0.self_attn.q_proj'",
                            "which this model does not have"], model=tiny_gpt2())


def test_module_the_model_lacks(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, saved / WEIGHTS_NAME)
    _one_line_error(saved, ["'model.layers.5.self_attn.q_proj'", "does not have"])


@pytest.mark.parametrize("key, shape, needles", [
    ("model.layers.1.self_attn.v_proj.lora_A.weight", (4, 48),
     ["model.layers.1.self_attn.v_proj.lora_A", "(4, 48)", "(4, 64)"]),
    ("model.layers.0.self_attn.q_proj.lora_B.weight", (32, 4),
     ["model.layers.0.self_attn.q_proj.lora_B", "(32, 4)", "(64, 4)"]),
])
def test_shape_mismatch_names_module_and_shapes(saved, key, shape, needles):
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors["base_model.model." + key] = torch.zeros(shape)
    save_file(tensors, saved / WEIGHTS_NAME)
    _one_line_error(saved, needles + ["has shape", "needs"])


def test_dora_magnitude_shape_mismatch(tmp_path):
    save_adapter(adapted("dora"), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(10)
    save_file(tensors, tmp_path / "a" / WEIGHTS_NAME)
    _one_line_error(tmp_path / "a", ["model.layers.0.self_attn.q_proj.lora_magnitude_vector", "(10,)", "(64,)"])


def test_dora_magnitude_missing(tmp_path):
    save_adapter(adapted("dora"), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    save_file(tensors, tmp_path / "a" / WEIGHTS_NAME)
    _one_line_error(tmp_path / "a", ["model.layers.0.self_attn.q_proj", "lora_magnitude_vector"])


def test_modules_to_save_weights_missing(tmp_path):
    save_adapter(adapted("modules_to_save"), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    del tensors["base_model.model.lm_head.weight"]
    save_file(tensors, tmp_path / "a" / WEIGHTS_NAME)
    _one_line_error(tmp_path / "a", ["lm_head", "modules_to_save", "stores no weights"])


def test_modules_to_save_module_missing(tmp_path):
    save_adapter(adapted("modules_to_save"), tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    config["modules_to_save"] = ["lm_head", "score"]
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config))
    _one_line_error(tmp_path / "a", ["score"])


def test_rank_too_large_for_model(tmp_path):
    tensors = {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(40, 64),
               "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(32, 40)}
    (tmp_path / "a").mkdir()
    save_file(tensors, tmp_path / "a" / WEIGHTS_NAME)
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({"r": 40, "target_modules": ["k_proj"]}))
    model = tiny_llama()  # a rank above the smaller side loads, as in PEFT (a warning says so)
    load_adapter(model, tmp_path / "a")
    assert model.get_submodule("model.layers.0.self_attn.k_proj").r["default"] == 40


# --- atomic writes ------------------------------------------------------------------------------
def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    model = adapted("plain")
    save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    randomize_adapters(model, seed=99)
    model.lora_configs["default"].alpha = 32.0

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    after = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert after == before  # same names (no temp files left) and same bytes


def test_failed_config_write_leaves_no_temp_files(tmp_path, monkeypatch):
    import loraforge.core.io as io

    model = adapted("plain")
    save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    randomize_adapters(model, seed=99)

    def broken(*args, **kwargs):
        raise OSError("no space")

    monkeypatch.setattr(io.os, "fsync", broken)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_saved_files_get_ordinary_permissions(tmp_path):
    save_adapter(adapted("plain"), tmp_path / "a")
    (tmp_path / "plain.txt").write_text("x")  # what open() gives under the current umask
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == expected
