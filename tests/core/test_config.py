"""LoraConfig: validation (one collected message), per-module rank/alpha/scaling, target matching,
PEFT JSON in and out."""
import math

import pytest

from loraforge import LoraError
from loraforge.core.config import LoraConfig, name_matches


@pytest.mark.parametrize("kwargs, needles", [
    ({"r": 0}, ["r must be a positive integer, got 0"]),
    ({"r": -3}, ["r must be a positive integer, got -3"]),
    ({"r": 2.5}, ["r must be a positive integer"]),
    ({"alpha": 0}, ["alpha must be > 0, got 0"]),
    ({"alpha": -1.0}, ["alpha must be > 0"]),
    ({"alpha": float("nan")}, ["alpha must be > 0"]),
    ({"dropout": 1.0}, ["dropout must be in [0, 1), got 1.0"]),
    ({"dropout": -0.1}, ["dropout must be in [0, 1)"]),
    ({"init": "olora"}, ["init must be one of default, gaussian, pissa"]),
    ({"target_modules": []}, ["target_modules is empty"]),
    ({"rank_pattern": {"q_proj": 0}}, ["rank_pattern['q_proj'] must be a positive integer"]),
    ({"alpha_pattern": {"q_proj": -2}}, ["alpha_pattern['q_proj'] must be > 0"]),
    ({"rank_pattern": {"(": 4}}, ["is not a valid regex"]),
    # several wrong fields: all collected in one message
    ({"r": 0, "alpha": -1, "dropout": 1.5}, ["r must be", "alpha must be", "dropout must be"]),
])
def test_invalid_config_one_line_error(kwargs, needles):
    with pytest.raises(LoraError) as info:
        LoraConfig(**kwargs)
    message = str(info.value)
    assert message.startswith("invalid LoraConfig: ")
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_problems_collects_everything():
    config = LoraConfig()
    config.r, config.alpha, config.dropout = 0, 0, 2
    assert len(config.problems()) == 3


@pytest.mark.parametrize("use_rslora, r, alpha, expected", [
    (False, 8, 16, 2.0),
    (False, 4, 8, 2.0),
    (False, 16, 8, 0.5),
    (True, 16, 8, 8 / 4),
    (True, 8, 16, 16 / math.sqrt(8)),
])
def test_scaling(use_rslora, r, alpha, expected):
    config = LoraConfig(r=r, alpha=alpha, use_rslora=use_rslora)
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(expected)


def test_rank_and_alpha_patterns():
    config = LoraConfig(r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
                        alpha_pattern={"q_proj": 4})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 4
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 1.0
    assert config.rank_for("model.layers.1.mlp.down_proj") == 2
    assert config.rank_for("model.layers.0.mlp.down_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.k_proj") == 8
    # a pattern matches whole name parts from the end, not inside a name
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8


@pytest.mark.parametrize("name, targets, expected", [
    ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
    ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
    ("model.layers.0.self_attn.q_proj", ["proj"], False),
    ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], True),
    ("model.layers.0.self_attn.q_proj", "attention", True),
    ("model.layers.0.mlp.up_proj", "attention", False),
    ("model.layers.0.mlp.up_proj", ["mlp"], True),
    ("transformer.h.0.attn.c_attn", ["attention"], True),
    ("transformer.h.0.mlp.c_proj", ["attention"], False),
    ("transformer.h.0.mlp.c_proj", ["mlp"], True),
    ("model.layers.0.self_attn.q_proj", r".*layers\.0\..*q_proj", True),
    ("model.layers.1.self_attn.q_proj", r".*layers\.0\..*q_proj", False),
    ("model.layers.0.self_attn.q_proj", r"q_proj", False),  # a regex string must match the whole name
])
def test_name_matches(name, targets, expected):
    assert name_matches(name, targets) is expected


def test_peft_json_round_trip():
    config = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                        use_dora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0},
                        modules_to_save=["lm_head"], init="gaussian", base_model_name_or_path="tiny")
    data = config.to_peft()
    assert data["peft_type"] == "LORA" and data["lora_alpha"] == 8 and data["r"] == 4
    assert data["init_lora_weights"] == "gaussian"
    assert data["modules_to_save"] == ["lm_head"]
    back = LoraConfig.from_peft(data)
    assert back == config


def test_to_peft_replaces_presets_by_concrete_names():
    data = LoraConfig(target_modules="attention").to_peft(["k_proj", "q_proj", "q_proj"])
    assert data["target_modules"] == ["k_proj", "q_proj"]
    assert LoraConfig().to_peft()["init_lora_weights"] is True
    assert LoraConfig(target_modules=r".*q_proj").to_peft(["q_proj"])["target_modules"] == r".*q_proj"


@pytest.mark.parametrize("data, needle", [
    ({"peft_type": "IA3"}, "only LORA adapters are supported"),
    ({"layers_to_transform": [0]}, "layers_to_transform is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"lora_bias": True}, "lora_bias"),
    ({"r": 0, "target_modules": ["q_proj"]}, "r must be a positive integer"),
])
def test_from_peft_errors(data, needle):
    with pytest.raises(LoraError, match="adapter_config.json") as info:
        LoraConfig.from_peft({"target_modules": ["q_proj"], **data})
    assert needle in str(info.value)


def test_from_peft_reads_peft_defaults():
    config = LoraConfig.from_peft({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4,
                                   "init_lora_weights": "pissa_niter_4", "rank_pattern": None})
    assert config.r == 4 and config.alpha == 8 and config.init == "pissa" and config.rank_pattern == {}


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(LoraError, match="unknown LoRA option.*lora_rank"):
        LoraConfig.from_dict({"lora_rank": 8}, where="recipe.lora")
    assert LoraConfig.from_dict({"r": 4, "rank_pattern": None}).rank_pattern == {}
