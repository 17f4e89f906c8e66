"""Early stopping (on by default): the stop decision read back from metrics.jsonl, the adapter of
the best evaluation kept, exact resume after kill -9 in the middle of it, and its bad settings."""
from __future__ import annotations

import math

import pytest
import torch
from cli_helpers import FAST, adapter_tensors, kill_at_first_checkpoint, metrics, one_line_error, run_cli

from loraforge.core.ops import adapter_params
from loraforge.train import early_stop
from loraforge.train import loop as T
from loraforge.train.config import resolve
from loraforge.train.early_stop import EarlyStopping, eval_interval

assert FAST[-2:] == ["--patience", "0"]
EARLY = FAST[:-2]  # the test settings with early stopping on
STEPS = 30


def expected_stop(records: list[dict], patience: int, min_delta: float) -> tuple[int | None, int]:
    """An independent reading of the rule: (the step it stops at or None, the lowest loss's step)."""
    losses = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    reference, bad, stop = math.inf, 0, None
    for step, loss in losses:
        bad = 0 if loss < reference - min_delta else bad + 1
        reference = loss if bad == 0 else reference
        if bad >= patience:
            stop = step
            break
    seen = [(loss, step) for step, loss in losses if stop is None or step <= stop]
    return stop, min(seen)[1]


def test_the_rule():
    early = EarlyStopping(patience=2, min_delta=0.1)
    # 2.95 is no improvement (not 0.1 below 3.0) but the lowest loss yet: its adapter is the one kept
    assert [early.update(s, v) for s, v in [(1, 3.0), (2, 2.95), (3, 2.5), (4, 2.45)]] == [True, True, True, True]
    assert (early.best_step, early.reference, early.bad, early.should_stop) == (4, 2.5, 1, False)
    early.update(5, float("nan"))  # not an evaluation
    assert not early.update(6, 2.47)  # neither an improvement nor the lowest
    assert early.should_stop and (early.best, early.best_step) == (2.45, 4)
    # small steps add up: 2.0 -> 1.95 -> 1.89 improves on the reference 2.0 by more than 0.1
    slow = EarlyStopping(patience=2, min_delta=0.1)
    for step, loss in [(1, 2.0), (2, 1.95), (3, 1.89), (4, 1.85)]:
        slow.update(step, loss)
    assert (slow.reference, slow.bad, slow.best_step, slow.should_stop) == (1.89, 1, 4, False)
    replayed = EarlyStopping(2, 0.1).replay([{"step": s, "val_loss": v} for s, v in [(1, 3.0), (2, 2.95), (3, 2.5)]]
                                            + [{"step": 4, "loss": 1.0}])
    assert (replayed.best_step, replayed.bad) == (3, 0)
    assert not EarlyStopping(0, 0.0).enabled and not EarlyStopping(0, 0.0).replay([{"step": 1, "val_loss": 1}]).should_stop


def test_eval_interval():
    assert eval_interval(0, 60, early=True) == 5  # about twelve validations a run
    assert eval_interval(0, 5, early=True) == 1
    assert eval_interval(7, 60, early=True) == 7
    assert eval_interval(0, 60, early=False) == 0  # at the end only


def test_stops_and_keeps_the_best_adapter(base, data, tmp_path, monkeypatch):
    """In process, with a spy on the best-adapter file: the stop step follows the rule over the
    logged validation losses, and the adapter written is the best step's, not the last."""
    snapshots = {}
    save = early_stop.save_best

    def spy(out, step, model):
        snapshots[step] = {k: p.detach().clone() for k, p in adapter_params(model).items()}
        return save(out, step, model)

    monkeypatch.setattr(early_stop, "save_best", spy)
    out = tmp_path / "run"
    cfg = resolve(None, model=str(base), data=str(data["train"]), out=str(out), max_steps=STEPS, precision="fp32",
                  lr=0.02, batch_size=2, progress=False, eval_every=1, patience=2, min_delta=0.05)
    summary = T.train(cfg)
    records = metrics(out)
    stop, best = expected_stop(records, patience=2, min_delta=0.05)
    assert stop is not None and stop < STEPS, "pick settings under which the run stops early"
    assert summary["steps"] == stop == records[-1]["step"] and summary["stopped_early"]
    assert summary["best_step"] == best and best < stop and set(snapshots) >= {best}

    from transformers import AutoModelForCausalLM

    from loraforge.core.io import load_adapter

    model = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(model, out)
    kept = adapter_params(model)
    assert kept.keys() == snapshots[best].keys()
    assert all(torch.equal(kept[k], snapshots[best][k]) for k in kept)
    assert [p.name for p in out.glob("checkpoints/best-step-*")] == [f"best-step-{best:06d}.safetensors"]


def test_resuming_a_finished_early_stopped_run_gives_the_same_adapter(base, data, tmp_path):
    """--resume after the run ended (its stop step a checkpoint step): nothing to redo, no error."""
    out = tmp_path / "run"
    args = ["train", "--model", base, "--data", data["train"], "--out", out, "--max-steps", STEPS, *EARLY,
            "--eval-every", 2, "--save-every", 2, "--patience", 1, "--min-delta", 100]  # stops at step 4
    assert run_cli(*args).returncode == 0
    first = adapter_tensors(out)
    again = run_cli(*args, "--resume")
    assert again.returncode == 0, again.stderr
    kept = expected_stop(metrics(out), patience=1, min_delta=100)[1]
    assert f"kept step {kept}'s adapter" in again.stdout
    second = adapter_tensors(out)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cli_run_notes_the_stop(base, data, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--model", base, "--data", data["train"], "--out", out, "--max-steps", STEPS, *EARLY,
                   "--eval-every", 1, "--patience", 1, "--min-delta", 100)  # nothing improves by 100 nats
    assert done.returncode == 0, done.stderr
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    kept = expected_stop(records, patience=1, min_delta=100)[1]  # the lower of the two losses
    assert "early stopping at step 2" in done.stderr and f"keeping the adapter of step {kept}, the lowest" in done.stderr
    assert "(2 steps, final loss" in done.stdout and f"kept step {kept}'s adapter" in done.stdout


def test_patience_running_out_at_the_last_step_is_no_early_stop(base, data, tmp_path):
    """At the run's last step the patience may run out too; the run ended, nothing stopped it."""
    out = tmp_path / "run"
    cfg = resolve(None, model=str(base), data=str(data["train"]), out=str(out), max_steps=2, precision="fp32",
                  batch_size=2, progress=False, eval_every=1, patience=1, min_delta=100)
    summary = T.train(cfg)
    assert summary["steps"] == 2 and not summary["stopped_early"]
    assert summary["best_step"] == expected_stop(metrics(out), patience=1, min_delta=100)[1]
    done = run_cli("train", "--model", base, "--data", data["train"], "--out", tmp_path / "cli", "--max-steps", 2,
                   *EARLY, "--eval-every", 1, "--patience", 1, "--min-delta", 100)
    assert done.returncode == 0, done.stderr
    assert "early stopping" not in done.stderr and "(2 steps, final loss" in done.stdout


def test_kill_and_resume_equal_an_uninterrupted_run(base, data, tmp_path):
    args = ["--max-steps", STEPS, *EARLY, "--eval-every", 1, "--patience", 2, "--min-delta", 0.05, "--save-every", 2]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    done = run_cli("train", "--model", base, "--data", data["train"], "--out", whole, *args)
    assert done.returncode == 0, done.stderr
    assert "early stopping at step" in done.stderr, "pick settings under which the run stops early"
    argv = ["train", "--model", base, "--data", data["train"], "--out", parts, *args]
    kill_at_first_checkpoint(argv, parts)
    resumed = run_cli(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in metrics(whole)] == [r["step"] for r in metrics(parts)]
    ta, tb = adapter_tensors(whole), adapter_tensors(parts)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_without_validation_rows_every_step_runs(base, data, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--model", base, "--data", data["train"], "--out", out, "--max-steps", 4, *EARLY,
                   "--val-fraction", 0, "--eval-every", 1, "--min-delta", 100)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("flag, value, message", [("--patience", -1, "patience must be >= 0"),
                                                  ("--min-delta", -0.5, "min_delta must be >= 0"),
                                                  ("--min-delta", "nan", "min_delta must be a finite number")])
def test_bad_settings_are_one_line_errors(base, data, tmp_path, flag, value, message):
    done = run_cli("train", "--model", base, "--data", data["train"], "--out", tmp_path / "run", *EARLY, flag, value)
    assert done.returncode != 0
    assert message in one_line_error(done.stderr)
    assert not (tmp_path / "run").exists()
