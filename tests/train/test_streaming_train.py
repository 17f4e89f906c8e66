"""`loraforge train --streaming`: a run over a stream of packed rows, killed and resumed on the
same rows (the reader position is in the checkpoint), from the CLI and from a recipe."""
from __future__ import annotations

import pytest
from cli_helpers import FAST, assert_same_adapter, kill_at_first_checkpoint, metrics, one_line_error

from loraforge.cli import main
from loraforge.train.checkpoint import data_stream_state, find_latest
from loraforge.train.config import resolve

STEPS = 30


def args(base, data, out, *extra) -> list[str]:
    return ["train", "--model", str(base), "--data", str(data), "--out", str(out), "--streaming", "on",
            "--max-steps", str(STEPS), "--shuffle-buffer", "4", *FAST, *map(str, extra)]


def test_kill_9_then_resume_gives_the_uninterrupted_streamed_adapter(base, data, tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(args(base, data["train"], reference)) == 0
    assert "streaming" in capsys.readouterr().err
    stopped_at = kill_at_first_checkpoint(args(base, data["train"], out, "--save-every", 2), out)
    assert 2 <= stopped_at < STEPS
    state = data_stream_state(find_latest(out))
    assert state["step"] == stopped_at and state["cursor"]  # the reader position, kept in the checkpoint
    assert main(args(base, data["train"], out, "--save-every", 2, "--resume")) == 0
    assert_same_adapter(reference, out)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(reference)]
    assert "val_loss" in metrics(out)[-1]


def test_a_streaming_checkpoint_resumed_in_memory_is_a_one_line_error(base, data, tmp_path, capsys):
    out = tmp_path / "run"
    kill_at_first_checkpoint(args(base, data["train"], out, "--save-every", 2), out)
    argv = [a for a in args(base, data["train"], out, "--resume") if a not in ("--streaming", "on")]
    assert main(argv) == 2
    assert "was written by a streaming run; resume with --streaming on" in one_line_error(capsys.readouterr().err)


def test_a_recipe_turns_streaming_on(tmp_path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("streaming: 'on'\nshuffle_buffer: 256\nmax_steps: 100\n")
    cfg = resolve(str(recipe))
    assert (cfg.streaming, cfg.shuffle_buffer) == ("on", 256)


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", 0], "pass --max-steps (a stream's length is not known up front) or --streaming off"),
    (["--shuffle-buffer", 0], "shuffle_buffer must be >= 1, got 0"),
    (["--method", "dpo"], "streaming reads sft rows only"),
])
def test_bad_streaming_settings_are_one_line_errors(base, data, tmp_path, capsys, extra, message):
    assert main(args(base, data["train"], tmp_path / "o", *extra)) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_streaming_a_csv_is_a_one_line_error(base, tmp_path, capsys):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\na,b\n")
    assert main(args(base, csv, tmp_path / "o")) == 2
    assert "is not a .jsonl or .parquet file" in one_line_error(capsys.readouterr().err)
