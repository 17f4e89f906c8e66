"""Early stopping on the validation loss, keeping the best adapter (on by default).

A run evaluates every ``eval_every`` steps (or, when that is 0, about twelve times over the run)
and stops once ``patience`` evaluations in a row failed to improve: an evaluation improves when
its loss is more than ``min_delta`` below the loss of the last one that improved (Keras'
``EarlyStopping`` rule, so a slow steady decline still counts once it adds up to min_delta). The
adapter it writes is the one of the lowest validation loss, small improvements included (what
transformers' ``load_best_model_at_end`` keeps; its threshold too only governs the patience).

Everything survives ``kill -9`` and ``--resume``: the history is read back from metrics.jsonl
(already truncated to the resumed step), and the best adapter's weights sit in
``checkpoints/best-step-NNNNNN.safetensors``; each checkpoint prunes the files its step no
longer needs, so a resume from checkpoint step c always finds the best of steps <= c (the newest
one stays after the run, beside the checkpoints, for a later --resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loraforge import LoraError, one_line
from loraforge.core.io import atomic_save_safetensors
from loraforge.core.ops import adapter_params

EVALUATIONS = 12  # evaluations over a run when eval_every is 0 and early stopping is on
PREFIX = "best-step-"


@dataclass
class EarlyStopping:
    patience: int  # evaluations without improvement before stopping (0: never stop early)
    min_delta: float  # an improvement lowers the reference loss by more than this
    best: float = math.inf  # the lowest validation loss so far...
    best_step: int = 0  # ...and its step: the adapter kept
    reference: float = math.inf  # the loss of the last evaluation that improved
    bad: int = 0  # evaluations in a row that did not improve

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def update(self, step: int, val_loss: float | None) -> bool:
        """Take the validation loss of step `step`; True when it is the lowest so far."""
        if val_loss is None or not math.isfinite(val_loss):
            return False
        if val_loss < self.reference - self.min_delta:
            self.reference, self.bad = val_loss, 0
        else:
            self.bad += 1
        if val_loss < self.best:
            self.best, self.best_step = val_loss, step
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.bad >= self.patience

    def replay(self, records: list[dict]) -> "EarlyStopping":
        """The state after the validation records of an earlier (resumed) part of this run."""
        for record in records:
            if "val_loss" in record:
                self.update(int(record["step"]), record["val_loss"])
        return self

    def reason(self, step: int) -> str:
        return (f"early stopping at step {step}: the validation loss did not improve by more than "
                f"{self.min_delta:g} for {self.patience} evaluation(s); keeping the adapter of step "
                f"{self.best_step}, the lowest validation loss ({self.best:.4f}); --patience 0 trains every step")


def eval_interval(eval_every: int, total: int, early: bool) -> int:
    """Steps between validations: the configured interval, or ~EVALUATIONS per run for early
    stopping, or 0 (at the end only)."""
    if eval_every or not early:
        return eval_every
    return max(1, total // EVALUATIONS)


# --- the best adapter on disk ------------------------------------------------------------------
def best_path(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"{PREFIX}{step:06d}.safetensors"


def save_best(out: Path, step: int, model) -> Path:
    """The adapter parameters of step `step`, as the best so far (atomic)."""
    path = best_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().contiguous() for k, p in adapter_params(model).items()}
    atomic_save_safetensors(tensors, path, metadata={"step": str(step)})
    return path


def restore_best(out: Path, step: int, model):
    """Load the parameters saved by `save_best(out, step, ...)` back into the model."""
    path = best_path(out, step)
    try:
        with safe_open(str(path), framework="pt") as f:
            saved_step = (f.metadata() or {}).get("step")
        tensors = load_file(path)
    except (OSError, ValueError) as err:
        raise LoraError(f"early stopping: the best adapter {path} is unreadable ({one_line(err)}); "
                        f"rerun with --patience 0 to keep the last step's adapter") from None
    params = adapter_params(model)
    if saved_step != str(step) or tensors.keys() != params.keys():
        raise LoraError(f"early stopping: {path} does not hold this run's adapter of step {step}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


def prune_best(out: Path, upto: int):
    """At checkpoint step `upto`: keep only the newest best file with step <= upto (a resume from
    this checkpoint needs it) and any later ones."""
    files = sorted((Path(out) / "checkpoints").glob(f"{PREFIX}*.safetensors"))
    older = [p for p in files if _step(p) <= upto]
    for path in older[:-1]:
        path.unlink(missing_ok=True)


def _step(path: Path) -> int:
    return int(path.stem[len(PREFIX):])
