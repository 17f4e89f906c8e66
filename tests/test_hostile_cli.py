"""Bad and hostile input to the commands: each is exit status 2 with one line that says what is wrong
and where (never a traceback), and nothing already written is lost. The server's own hostile-input
suite is tests/serve/test_hostile.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import FAST
from factory import save_tiny_llama
from safetensors.torch import load_file, save_file

from loraforge.cli import main
from loraforge.core.config import LoraConfig
from loraforge.core.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter, save_adapter
from loraforge.core.ops import attach
from loraforge.train.checkpoint import find_latest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("hostile") / "model")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_dir) -> Path:
    from factory import randomize_adapters, tiny_llama

    model = tiny_llama(text=True, context=512, tied=True)
    attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "good")


def fails(capsys, *argv) -> str:
    """Run the CLI in-process; it must exit 2 with one error line, last on stderr, after any status
    lines the command printed before it failed (never a traceback). Returns the error line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"loraforge {argv[0]}: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def write_lines(path: Path, *lines: str | bytes) -> Path:
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def copy_adapter(src: Path, dst: Path, config=None, tensors=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / CONFIG_NAME).read_text())
    (dst / CONFIG_NAME).write_text(json.dumps({**raw, **(config or {})}))
    weights = load_file(src / WEIGHTS_NAME)
    save_file({**weights, **(tensors or {})}, dst / WEIGHTS_NAME)
    return dst


def first_key(path: Path, part: str = "lora_B") -> str:
    return next(k for k in load_file(path / WEIGHTS_NAME) if part in k)


# --- training data ------------------------------------------------------------------------------
BAD_DATA = [
    ("deep", ['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"], "JSON nested too deeply"),
    ("surrogate-text", ['{"text": "a\\ud800b"}'], "unpaired surrogate (\\ud800)"),
    ("surrogate-chat", ['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
                        '"content": "\\udfff"}]}'], "unpaired surrogate (\\udfff)"),
    ("not-utf8", [b'{"text": "\xff\xfe"}'], "not UTF-8 text"),
    ("not-object", ["[1, 2]"], "expected a JSON object, got"),
    ("not-json", ["{text: 1}"], "not valid JSON"),
    ("nul", ['{"text": 5}'], "'text' must be a string"),
    ("unknown-format", ['{"question": "a", "answer": "b"}'], "line 1"),
    ("empty", [""], "has no examples"),
]


@pytest.mark.parametrize("name, lines, message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_training_data(tmp_path, capsys, model_dir, name, lines, message):
    data = write_lines(tmp_path / f"{name}.jsonl", *lines)
    line = fails(capsys, "train", "--model", model_dir, "--data", data, "--out", tmp_path / "out", *FAST)
    assert message in line and str(data) in line
    assert not (tmp_path / "out").exists(), "a failed run left its output directory behind"


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_data_that_is_not_a_file(tmp_path, capsys, model_dir, where):
    data = tmp_path / "d"
    if where == "directory":
        data.mkdir()
    line = fails(capsys, "train", "--model", model_dir, "--data", data, "--out", tmp_path / "out", *FAST)
    assert ("no such data file" if where == "missing" else "not a dataset saved with save_to_disk") in line


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--alpha", "nan"), ("--alpha=-inf", None),
                                         ("--warmup-ratio", "nan"), ("--max-grad-norm", "inf"),
                                         ("--weight-decay", "nan"), ("--loraplus-ratio", "inf")])
def test_non_finite_settings_are_refused(tmp_path, capsys, flag, value):
    line = fails(capsys, "train", "--data", "d.jsonl", "--out", tmp_path / "out", *[a for a in (flag, value) if a])
    name = flag[2:].split("=")[0].replace("-", "_")
    assert f"{name} must be a finite number" in line


def test_a_diverging_run_stops_at_the_first_non_finite_step(tmp_path, capsys, model_dir, data):
    out = tmp_path / "run"
    line = fails(capsys, "train", "--model", model_dir, "--data", data["train"], "--out", out, "--max-steps", 6,
                 "--save-every", 1, "--precision", "fp32", "--lr", "1e30", "--batch-size", 2, "--no-progress")
    step = int(line.split("step ")[1].split(":")[0])
    assert "training stopped before that update" in line and f"step-{step - 1:06d}" in line
    assert find_latest(out).name == f"step-{step - 1:06d}"  # the last good checkpoint is kept
    assert not (out / WEIGHTS_NAME).exists()  # no broken adapter written
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, step)) and all(math.isfinite(r["loss"]) for r in records)


def test_resume_from_a_truncated_checkpoint(tmp_path, capsys, model_dir, data):
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data["train"]), "--out", str(out),
                 "--max-steps", "2", "--save-every", "1", *FAST]) == 0
    state = find_latest(out) / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    line = fails(capsys, "train", "--model", model_dir, "--data", data["train"], "--out", out, "--max-steps", 4,
                 "--resume", *FAST)
    assert "is unreadable" in line and "delete it to start over" in line
    assert (out / WEIGHTS_NAME).is_file()  # the finished run's adapter is still there


def test_a_model_with_pickle_weights_is_refused(tmp_path, capsys, model_dir, data):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, pickled / "pytorch_model.bin")
    line = fails(capsys, "eval", "--model", pickled, "--data", data["test"])
    assert "refusing to load" in line and "pytorch_model.bin" in line and "pickle" in line


# --- adapter files ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")])
@pytest.mark.parametrize("command", ["eval", "merge", "inspect", "resize", "generate"])
def test_non_finite_adapters_are_refused_everywhere(tmp_path, capsys, model_dir, adapter, data, command, bad, word):
    key = first_key(adapter)
    tensor = load_file(adapter / WEIGHTS_NAME)[key].clone()
    tensor[0, 0] = bad
    broken = copy_adapter(adapter, tmp_path / "broken", tensors={key: tensor})
    argv = {"eval": ["eval", "--model", model_dir, "--adapter", broken, "--data", data["test"]],
            "merge": ["merge", "--model", model_dir, "--adapter", broken, "--out", tmp_path / "m"],
            "inspect": ["inspect", broken],
            "resize": ["resize", broken, "--rank", 1, "--out", tmp_path / "r"],
            "generate": ["generate", "--model", model_dir, "--adapter", broken, "--prompt", "hi"]}[command]
    line = fails(capsys, *argv)
    assert f"tensor {key} holds {word} values" in line
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


BAD_CONFIGS = [
    ("dict-targets", {"target_modules": {"q_proj": 1}}, "target_modules must be a string or a list of strings"),
    ("int-targets", {"target_modules": 5}, "target_modules must be a string or a list of strings"),
    ("list-of-ints", {"target_modules": [1, 2]}, "target_modules must be a string or a list of strings"),
    ("list-rank-pattern", {"rank_pattern": ["q_proj"]}, "rank_pattern must be a mapping"),
    ("str-modules-to-save", {"modules_to_save": "lm_head"}, "modules_to_save must be a string or a list"),
    ("nan-alpha", {"lora_alpha": float("nan")}, "alpha must be > 0 and finite"),
    ("inf-alpha-pattern", {"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern['q_proj'] must be > 0 and finite"),
    ("zero-r", {"r": 0}, "r must be a positive integer"),
    ("bool-r", {"r": True}, "r must be a positive integer"),
    ("other-peft-type", {"peft_type": "IA3"}, "only LORA adapters are supported"),
]


@pytest.mark.parametrize("name, change, message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_adapter_configs(tmp_path, capsys, adapter, name, change, message):
    broken = copy_adapter(adapter, tmp_path / name, config=change)
    line = fails(capsys, "inspect", broken)
    assert message in line and CONFIG_NAME in line


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (b"\xff\xfe\x00", "not valid JSON"),
])
def test_unreadable_adapter_configs(tmp_path, capsys, adapter, content, message):
    broken = copy_adapter(adapter, tmp_path / "broken")
    (broken / CONFIG_NAME).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert message in fails(capsys, "inspect", broken)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:50]), "not a readable safetensors file"),
    (lambda p: p.write_bytes(b"\x00" * 16), "not a readable safetensors file"),
    (lambda p: p.unlink(), f"has no {WEIGHTS_NAME}"),
])
def test_broken_adapter_weights(tmp_path, capsys, adapter, damage, message):
    broken = copy_adapter(adapter, tmp_path / "broken")
    damage(broken / WEIGHTS_NAME)
    assert message in fails(capsys, "inspect", broken)


def test_pickle_adapters_are_refused_without_being_opened(tmp_path, capsys, adapter):
    broken = copy_adapter(adapter, tmp_path / "broken")
    (broken / WEIGHTS_NAME).unlink()
    (broken / "adapter_model.bin").write_bytes(b"\x80\x04 this would be unpickled")
    line = fails(capsys, "inspect", broken)
    assert "refusing to load" in line and "adapter_model.bin" in line


def test_read_adapter_names_the_non_finite_tensor(tmp_path, adapter):
    key = first_key(adapter, "lora_A")
    broken = copy_adapter(adapter, tmp_path / "b", tensors={key: torch.full_like(load_file(adapter / WEIGHTS_NAME)[key],
                                                                                   float("nan"))})
    with pytest.raises(Exception, match=f"tensor {key} holds NaN"):
        read_adapter(broken)


# --- outputs that would destroy inputs ----------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_merge_never_overwrites_its_input(tmp_path, capsys, model_dir, adapter, where):
    mine = copy_adapter(adapter, tmp_path / "work" / "adapter")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    out = {"same": mine, "inside": mine / "merged", "parent": mine.parent}[where]
    line = fails(capsys, "merge", "--model", model_dir, "--adapter", mine, "--out", out, "--force")
    assert {"same": "is the input", "inside": "lies inside the input", "parent": "contains the input"}[where] in line
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_merge_into_the_model_directory_is_refused(tmp_path, capsys, model_dir, adapter):
    line = fails(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--out", model_dir / "merged")
    assert "lies inside the input" in line


def test_merge_to_an_unwritable_place(tmp_path, capsys, model_dir, adapter):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = fails(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--out", blocker / "merged")
    assert line.startswith("loraforge merge: error: cannot write") and blocker.read_text() == "x"


def test_merge_keeps_a_non_empty_output_without_force(tmp_path, capsys, model_dir, adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "is not empty" in fails(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--out", out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["resize", "combine"])
def test_tools_never_write_inside_their_input(tmp_path, capsys, adapter, command):
    mine = copy_adapter(adapter, tmp_path / "adapter")
    before = (mine / WEIGHTS_NAME).read_bytes()
    argv = ["resize", mine, "--rank", 1] if command == "resize" else ["combine", mine, adapter]
    assert "lies inside the input" in fails(capsys, *argv, "--out", mine / "sub")
    assert (mine / WEIGHTS_NAME).read_bytes() == before and not (mine / "sub").exists()


@pytest.mark.parametrize("value", ["0", "-5"])
def test_serve_refuses_a_body_limit_below_one_byte(capsys, model_dir, value):
    line = fails(capsys, "serve", "--model", model_dir, "--max-body-bytes", value)
    assert "--max-body-bytes must be at least 1" in line
