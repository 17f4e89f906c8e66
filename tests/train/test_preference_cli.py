"""`loraforge train --method dpo|orpo` end to end on a tiny random Llama and the demo pairs: the
adapter and the preference metrics it writes, TRL's conversational rows, a YAML recipe, kill -9
and --resume, and bad pair rows as one-line errors naming the file and line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import (
    FAST,
    adapter_tensors,
    assert_same_adapter,
    kill_at_first_checkpoint,
    metrics,
    one_line_error,
    run_cli,
)

from loraforge.cli import main
from loraforge.demo.tasks import write_pair_splits

STEPS = 30  # long enough that a run can be killed between its first checkpoint and its end
PREFERENCE_KEYS = {"loss", "reward_margin", "pref_accuracy", "logps_chosen", "logps_rejected", "lr", "tokens_per_s",
                   "peak_memory_mb"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    return write_pair_splits(tmp_path_factory.mktemp("pairs"), n_train=40, n_test=4)


def dpo_args(base: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--method", "dpo", "--model", str(base), "--data", str(data), "--out", str(out),
            "--max-steps", str(STEPS), *FAST, *map(str, extra)]


@pytest.fixture(scope="module")
def reference(base, pairs, tmp_path_factory) -> Path:
    """An uninterrupted DPO run, as a user would start it."""
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    done = run_cli(*dpo_args(base, pairs["train"], out))
    assert done.returncode == 0, done.stderr
    assert f"adapter written to {out} ({STEPS} steps" in done.stdout
    assert "dpo pairs" in done.stderr
    return out


def test_dpo_writes_an_adapter_and_preference_metrics(reference):
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png"} <= {
        p.name for p in reference.iterdir()}
    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert PREFERENCE_KEYS <= r.keys()
        assert 0 <= r["pref_accuracy"] <= 1 and r["logps_chosen"] < 0 and r["logps_rejected"] < 0
    # step 1 starts at the reference (B = 0): every margin is 0 and the loss is log 2
    assert records[0]["loss"] == pytest.approx(0.69315, abs=1e-4) and records[0]["reward_margin"] == 0
    assert records[-1]["loss"] < 0.5 and records[-1]["reward_margin"] > 0.5 and records[-1]["pref_accuracy"] == 1
    assert records[-1]["val_pref_accuracy"] == 1 and records[-1]["val_loss"] < 0.5


def test_kill_9_then_resume_gives_the_uninterrupted_dpo_adapter(reference, base, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    stopped_at = kill_at_first_checkpoint(dpo_args(base, pairs["train"], out, "--save-every", 2), out)
    assert 2 <= stopped_at < STEPS

    assert main(dpo_args(base, pairs["train"], out, "--save-every", 2, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().err
    assert_same_adapter(reference, out, atol=1e-6)
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    for key in ("loss", "reward_margin", "logps_chosen"):
        assert [r[key] for r in metrics(out)] == pytest.approx([r[key] for r in metrics(reference)], abs=1e-4)


def test_orpo_trains_from_a_recipe_on_conversational_rows(base, pairs, tmp_path):
    rows = [json.loads(line) for line in pairs["train"].read_text().splitlines()]
    conversational = tmp_path / "conv.jsonl"
    conversational.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n" for r in rows))
    recipe = tmp_path / "orpo.yaml"
    recipe.write_text("method: orpo\norpo_lambda: 0.5\nmax_steps: 8\n")
    out = tmp_path / "orpo"
    assert main(["train", "--config", str(recipe), "--model", str(base), "--data", str(conversational),
                 "--out", str(out), *FAST]) == 0
    records = metrics(out)
    assert len(records) == 8 and adapter_tensors(out)
    assert PREFERENCE_KEYS <= records[-1].keys()
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2  # mostly the NLL of the chosen answers
    assert records[-1]["reward_margin"] > 0 and records[-1]["val_pref_accuracy"] is not None
    assert -20 < records[-1]["logps_chosen"] < 0  # ORPO reports the per-token mean, as TRL does


def test_standard_and_conversational_rows_encode_alike(pairs, tmp_path):
    from factory import tiny_tokenizer

    from loraforge.data.pairs import encode_pairs, parse_pair

    row = json.loads(pairs["train"].read_text().splitlines()[0])
    conv = {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}
    a, b = (encode_pairs([parse_pair(r)], tiny_tokenizer(), 256)[0] for r in (row, conv))
    assert a == b
    text = tiny_tokenizer().decode(a[0]["chosen"]["input_ids"])
    assert text.endswith(row["chosen"] + "<|im_end|>") and "<|im_start|>user\n" + row["prompt"] in text


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "line 2: a preference row needs 'prompt', 'chosen' and 'rejected'; missing 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "line 2: 'chosen' must be a string or a list of one assistant message, got a number"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "line 2: 'prompt' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "line 2: 'rejected' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 2: 'chosen' and 'rejected' are the same answer"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "line 2: 'chosen' must be the assistant's message, got role 'user'"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "line 2: 'chosen' must hold exactly one assistant message, got 0"),
    ({"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"}, "line 2: 'prompt' must be a string or a non-empty list"),
    ({"prompt": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "line 2: the prompt's last message is the assistant's"),
])
def test_bad_pair_rows_are_one_line_errors_naming_file_and_line(base, pairs, tmp_path, capsys, row, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(pairs["train"].read_text().splitlines()[0] + "\n" + json.dumps(row) + "\n")
    assert main(dpo_args(base, data, tmp_path / "out")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("loraforge train: error: ") and f"{data} {message}" in line
    assert not (tmp_path / "out").exists()


def test_pairs_given_to_sft_and_chat_rows_given_to_dpo_say_what_to_do(base, pairs, data, tmp_path, capsys):
    assert main(["train", "--model", str(base), "--data", str(pairs["train"]), "--out", str(tmp_path / "a"), *FAST]) == 2
    assert "line 1: a preference row (prompt, chosen, rejected): train on it with --method dpo" in \
        one_line_error(capsys.readouterr().err)
    assert main(dpo_args(base, data["train"], tmp_path / "b")) == 2
    assert "line 1: a preference row needs 'prompt', 'chosen' and 'rejected'" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "beta must be > 0"),
    (["--orpo-lambda", "-1"], "orpo_lambda must be >= 0"),
    (["--train-on-prompt"], "train_on_prompt applies to sft only"),
])
def test_bad_preference_settings_are_one_line_errors(base, pairs, tmp_path, capsys, flags, message):
    assert main(dpo_args(base, pairs["train"], tmp_path / "out", *flags)) == 2
    assert message in one_line_error(capsys.readouterr().err)
