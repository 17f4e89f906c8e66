"""YAML recipes: a file sets options, command-line flags override it, and mistakes are one-line
errors that name the key. `loraforge.train.train` is replaced by a recorder where only the
resolved settings matter; one test trains for real from a recipe."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from cli_helpers import FAST, metrics, one_line_error, write_data
from factory import save_tiny_llama

from loraforge import LoraError
from loraforge.train import loop as T
from loraforge.cli import main
from loraforge.train.config import RECIPE_DIR, TrainConfig, dump, load_recipe, resolve


@pytest.fixture
def recorded(monkeypatch) -> list[TrainConfig]:
    """`loraforge train` runs resolve the settings and hand them here instead of training."""
    seen: list[TrainConfig] = []

    def fake_train(cfg):
        seen.append(cfg)
        return {"out": cfg.out, "steps": cfg.max_steps, "final_loss": 1.0}

    monkeypatch.setattr(T, "train", fake_train)
    return seen


def recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_recipe_sets_options_and_flags_override_it(tmp_path, recorded):
    path = recipe(tmp_path, "rank: 4\nalpha: 8\nlr: 0.005\ntargets: attention\nmax_steps: 7\nuse_dora: true\n")
    assert main(["train", "--config", path, "--data", "d.jsonl", "--out", "o", "--lr", "0.1", "--rank", "2"]) == 0
    cfg = recorded[-1]
    assert (cfg.rank, cfg.lr) == (2, 0.1)  # flags win
    assert (cfg.alpha, cfg.targets, cfg.max_steps, cfg.use_dora) == (8.0, "attention", 7, True)  # from the file
    assert cfg.batch_size == TrainConfig.batch_size  # neither: the default
    assert isinstance(cfg.alpha, float)


def test_a_flag_that_is_not_given_does_not_reset_the_recipe(tmp_path, recorded):
    path = recipe(tmp_path, "progress: false\ngradient_checkpointing: true\nseed: 5\n")
    assert main(["train", "--config", path, "--data", "d.jsonl", "--out", "o"]) == 0
    assert (recorded[-1].progress, recorded[-1].gradient_checkpointing, recorded[-1].seed) == (False, True, 5)


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; a recipe means the number."""
    cfg = resolve(recipe(tmp_path, "lr: 1e-4\nweight_decay: 1E-2\nwarmup_ratio: .1\n"))
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_ratio) == (1e-4, 1e-2, 0.1)


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "unknown key 'lrr' (did you mean 'lr'?)"),
    ("frobnicate: 3\n", "unknown key 'frobnicate'"),
    ("rank: eight\n", "rank must be int, got str 'eight'"),
    ("rank: 8.5\n", "rank must be int, got float 8.5"),
    ("rank: true\n", "rank must be int, got bool True"),
    ("lr: fast\n", "lr must be float, got str 'fast'"),
    ("use_dora: 1\n", "use_dora must be bool, got int 1"),
    ("targets: [q_proj, v_proj]\n", "targets must be str, got list"),
    ("- rank: 8\n", "a recipe is a mapping of option: value"),
    ("rank: [8\n", "not valid YAML"),
])
def test_recipe_mistakes_are_one_line_errors_naming_the_key(tmp_path, capsys, text, message):
    path = recipe(tmp_path, text)
    with pytest.raises(LoraError) as err:
        resolve(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["train", "--config", path, "--data", "d.jsonl", "--out", "o"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("loraforge train: error: ") and message in line


def test_every_mistake_is_reported_at_once(tmp_path):
    with pytest.raises(LoraError) as err:
        resolve(recipe(tmp_path, "rank: x\nbogus: 1\nlr: y\n"))
    assert all(part in str(err.value) for part in ("unknown key 'bogus'", "rank must be int", "lr must be float"))


@pytest.mark.parametrize("settings, message", [
    ({"rank": 0}, "rank must be >= 1, got 0"),
    ({"lr": -1.0}, "lr must be > 0"),
    ({"max_steps": -3}, "max_steps must be >= 0"),
    ({"dropout": 1.5}, "dropout must be in [0, 1)"),
    ({"warmup_ratio": 2.0}, "warmup_ratio must be in [0, 1]"),
    ({"precision": "fp8"}, "precision must be auto, fp32, bf16 or bf16-base"),
    ({"max_len": 512, "max_tokens": 256}, "max_len (512) must not exceed max_tokens (256)"),
])
def test_out_of_range_settings_are_errors(settings, message):
    with pytest.raises(LoraError) as err:
        resolve(**settings)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_command_line_values_are_checked_too(recorded, capsys):
    assert main(["train", "--data", "d.jsonl", "--out", "o", "--rank", "0"]) == 2
    assert "rank must be >= 1" in one_line_error(capsys.readouterr().err)
    assert not recorded


def test_the_bundled_demo_recipe_loads():
    bundled = yaml.safe_load((RECIPE_DIR / "demo.yaml").read_text())
    cfg = resolve("demo", data="d.jsonl", out="o")
    assert {k: getattr(cfg, k) for k in bundled} == bundled
    assert load_recipe("demo") == load_recipe(str(RECIPE_DIR / "demo.yaml"))


def test_an_unknown_recipe_lists_the_bundled_ones():
    with pytest.raises(LoraError, match=r"recipe 'nope' not found \(bundled recipes: demo\)"):
        resolve("nope")


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(LoraError, match="is unreadable"):
        resolve(str(tmp_path))


def test_train_config_yaml_is_a_recipe_for_the_same_run(tmp_path):
    cfg = resolve("demo", data="d.jsonl", out="o", lr=3e-4, rank=4, quantize="nf4", resume=True)
    assert resolve(recipe(tmp_path, dump(cfg))) == cfg
    assert dataclasses.asdict(resolve(recipe(tmp_path, dump(TrainConfig()), "defaults.yaml"))) == \
        dataclasses.asdict(TrainConfig())


def test_training_from_a_recipe(tmp_path, capsys):
    """The real thing, once: recipe + flag -> an adapter of the recipe's rank, the flag's step count."""
    base = save_tiny_llama(tmp_path / "base")
    splits = write_data(tmp_path / "data", n_train=8, n_test=2)
    path = recipe(tmp_path, "rank: 2\nalpha: 4\ntargets: q_proj,v_proj\nmax_steps: 9\nval_fraction: 0\n")
    out = tmp_path / "out"
    assert main(["train", "--config", path, "--model", str(base), "--data", str(splits["train"]),
                 "--out", str(out), "--max-steps", "2", *FAST]) == 0
    assert "validation split disabled" in capsys.readouterr().err
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (saved["rank"], saved["targets"], saved["max_steps"], saved["lr"]) == (2, "q_proj,v_proj", 2, 0.02)
    adapter = yaml.safe_load((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert len(metrics(out)) == 2


def _other_value(f: dataclasses.Field):
    """A valid value for field `f` that is not its default."""
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c and c != f.default)
    special = {"max_len": 128, "dropout": 0.25, "val_fraction": 0.25, "warmup_ratio": 0.5, "init": "gaussian",
               "targets": "q_proj,v_proj", "exclude": "o_proj", "device": "cpu", "nproc": 2}
    if f.name in special:
        return special[f.name]
    if f.type == "bool":
        return not f.default
    return {"int": lambda: f.default + 3, "float": lambda: f.default + 0.5, "str": lambda: f"x-{f.name}"}[f.type]()


def _flag_args(f: dataclasses.Field, value) -> list[str]:
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    return [flag] if f.type == "bool" else [flag, str(value)]


def test_every_train_config_field_has_a_flag_with_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert flag in text, f"{f.name}: {flag} missing from `loraforge train --help`"


@pytest.mark.parametrize("f", dataclasses.fields(TrainConfig), ids=lambda f: f.name)
def test_every_field_is_settable_from_a_flag_and_from_a_recipe(tmp_path, recorded, f):
    value = _other_value(f)
    base = ["train", "--data", "d.jsonl", "--out", "o"] if f.name not in ("data", "out") else ["train"]
    fill = {"data": ["--data", "d.jsonl"], "out": ["--out", "o"]}
    extra = [a for name, args in fill.items() if name != f.name and f.name in ("data", "out") for a in args]
    if f.name == "nproc":  # more than one process relaunches under torchrun: resolve only
        assert resolve(**{f.name: value}).nproc == value
    else:
        assert main(base + extra + _flag_args(f, value)) == 0
        assert getattr(recorded[-1], f.name) == value
    path = recipe(tmp_path, yaml.safe_dump({f.name: value}))
    assert getattr(resolve(path), f.name) == value


def test_an_unknown_recipe_key_is_a_one_line_error_from_the_command_line(tmp_path, capsys):
    path = recipe(tmp_path, "rank: 4\nlearning_rate: 0.1\n")
    assert main(["train", "--config", path, "--data", "d.jsonl", "--out", "o"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "unknown key 'learning_rate'" in line and path in line
