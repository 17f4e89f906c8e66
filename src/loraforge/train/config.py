"""Typed training settings: a dataclass, YAML recipes, and command-line overrides.

One place validates: unknown keys and wrong types are errors that name the key and the source.
"""
from __future__ import annotations

import dataclasses
import difflib
import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from loraforge import LoraError, one_line
from loraforge.core.config import INITS
from loraforge.models.embedded import DEFAULT_MODEL

RECIPE_DIR = Path(__file__).parent / "recipes"
PRECISIONS = ("auto", "fp32", "bf16", "bf16-base")
QUANTIZE = ("", "nf4", "int8")
METHODS = ("sft", "dpo", "orpo")
STREAMING = ("auto", "on", "off")
ARG_TYPES = {"int": int, "float": float, "str": str}


def setting(default, help: str, flag: str | None = None, choices: tuple | None = None):
    """A TrainConfig field: its default, the help text of its flag, and (optionally) the flag's
    name when it is not ``--field-name`` and the values it accepts."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass
class TrainConfig:
    """Everything `loraforge train` needs, declared once: each field is a YAML recipe key and a
    command-line flag (``add_arguments``). Defaults were chosen by experiment (README, "Defaults")."""

    model: str = setting(DEFAULT_MODEL, "base model: local transformers directory, hub id, or the embedded default")
    data: str = setting("", "data file (JSONL, JSON array, CSV, Parquet) or a datasets save_to_disk directory: chat, "
                            "alpaca, prompt/completion or text rows; prompt/chosen/rejected for dpo, orpo")
    split: str = setting("", "split of a save_to_disk DatasetDict (default: train)")
    columns: str = setting("", "read other column names as the formats' keys, e.g. prompt=question,completion=answer")
    streaming: str = setting("auto", "read, tokenize and pack the data as training goes, in bounded memory: on, off, "
                                     "or auto (on for a JSONL or Parquet file over 256 MB); needs --max-steps",
                             choices=STREAMING)
    shuffle_buffer: int = setting(1024, "streaming: packed rows held in the shuffle buffer (no global shuffle)")
    add_tokens: str = setting("", "new tokens for the tokenizer, comma list (e.g. '<|tool|>,<|end_tool|>'): only "
                                  "their embedding and head rows train (PEFT's trainable tokens)")
    out: str = setting("", "output directory (adapter, metrics.jsonl, loss.png, checkpoints)")
    # adapter
    rank: int = setting(8, "LoRA rank r")
    alpha: float = setting(16.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = setting(0.0, "dropout on the adapter input")
    targets: str = setting("all-linear", "all-linear | attention | mlp | comma list of module names")
    exclude: str = setting("", "comma list of module names (or suffixes) never to adapt")
    use_rslora: bool = setting(False, "rsLoRA: scaling = alpha / sqrt(r)", flag="--rslora")
    use_dora: bool = setting(False, "DoRA: a learned magnitude per output row", flag="--dora")
    init: str = setting("default", "adapter init", choices=INITS)
    # optimisation
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    loraplus_ratio: float = setting(1.0, "LoRA+ (Hayou et al. 2024): lr of B = lr x ratio")
    weight_decay: float = setting(0.0, "AdamW weight decay on the adapter")
    warmup_ratio: float = setting(0.05, "fraction of the steps spent warming the lr up (then cosine decay)")
    max_grad_norm: float = setting(1.0, "clip the adapter gradients' global norm to this")
    epochs: float = setting(1.0, "passes over the training rows")
    max_steps: int = setting(0, "optimizer steps (0: run `epochs` epochs)")
    batch_size: int = setting(8, "packed rows per optimizer step (the global batch, across processes)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_tokens: int = setting(256, "tokens in one packed row")
    max_len: int = setting(256, "an example is cut to this many tokens")
    train_on_prompt: bool = setting(False, "learn the prompt tokens too (default: the answer only)")
    group_by_length: bool = setting(True, "batch rows of similar length together (less padding; batches still come "
                                          "in shuffled order)", flag="--no-group-by-length")
    method: str = setting("sft", "objective: sft (answer NLL), dpo (Rafailov et al. 2023) or orpo (Hong et al. 2024)",
                          choices=METHODS)
    beta: float = setting(0.1, "DPO: beta, how far the policy may move from the reference (the adapter off)")
    orpo_lambda: float = setting(0.1, "ORPO: lambda, the weight of the odds-ratio term (TRL's ORPOConfig.beta)")
    seed: int = setting(0, "seed of the adapter init, the data order and the validation split")
    # runtime
    precision: str = setting("auto", "auto | fp32 | bf16 (autocast) | bf16-base (frozen base stored in bf16)",
                             choices=PRECISIONS)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward (less memory, slower)")
    lean_memory: bool = setting(True, "recompute RMSNorm and SwiGLU intermediates in backward instead of keeping them "
                                      "(bit-identical gradients, less memory)", flag="--no-lean-memory")
    quantize: str = setting("", "4-bit / 8-bit frozen base (QLoRA)", choices=QUANTIZE)
    save_every: int = setting(50, "checkpoint every N steps (0: only at the end)")
    eval_every: int = setting(0, "validation loss every N steps (0: at the end, and ~12 times a run for early stopping)")
    patience: int = setting(3, "early stopping: stop after this many validations without improvement and keep the "
                               "adapter of the lowest validation loss (0: off, train every step)")
    min_delta: float = setting(0.001, "early stopping: a validation improves when its loss is more than this below "
                                      "that of the last one that improved")
    val_fraction: float = setting(0.05, "fraction of the rows held out for validation")
    resume: bool = setting(False, "continue from the last checkpoint in --out")
    nproc: int = setting(1, "data-parallel processes (torch.distributed)")
    fsdp: bool = setting(False, "FSDP2 (fully_shard per decoder block) on CUDA, with --nproc > 1")
    progress: bool = setting(True, "progress bar", flag="--no-progress")
    report_to: str = setting("none", "dashboards besides metrics.jsonl and loss.png: none, or a comma list of "
                                     "tensorboard, wandb (offline), mlflow (local store)")

    def problems(self) -> list[str]:
        errors = [f"{f.name} must be a finite number, got {getattr(self, f.name)}" for f in fields(self)
                  if f.type == "float" and not math.isfinite(getattr(self, f.name))]
        for name in ("rank", "batch_size", "grad_accum", "max_tokens", "max_len", "nproc"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "alpha", "epochs"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be > 0, got {getattr(self, name)}")
        for f in fields(self):
            allowed = f.metadata["choices"]
            if allowed and getattr(self, f.name) not in allowed:
                errors.append(f"{f.name} must be {_one_of(allowed)}, got {getattr(self, f.name)!r}")
        for name in ("max_steps", "save_every", "eval_every", "patience", "min_delta"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            errors.append(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.beta <= 0:
            errors.append(f"beta must be > 0, got {self.beta}")
        if self.orpo_lambda < 0:
            errors.append(f"orpo_lambda must be >= 0, got {self.orpo_lambda}")
        if self.method != "sft" and self.train_on_prompt:
            errors.append(f"train_on_prompt applies to sft only: {self.method} compares the answers' log-probabilities")
        errors += self._data_problems()
        if self.max_len > self.max_tokens:
            errors.append(f"max_len ({self.max_len}) must not exceed max_tokens ({self.max_tokens})")
        return errors

    def _data_problems(self) -> list[str]:
        errors = []
        if self.shuffle_buffer < 1:
            errors.append(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.add_tokens and self.quantize:
            errors.append(f"add_tokens trains embedding rows, which a quantized base ({self.quantize}) cannot "
                          f"give: drop --quantize or --add-tokens")
        if self.streaming == "on" and self.method != "sft":
            errors.append(f"streaming reads sft rows only; {self.method} pairs are read in memory")
        if self.streaming == "on" and self.nproc > 1:
            errors.append("streaming runs in one process: pass --nproc 1 or --streaming off")
        return errors


def _one_of(choices: tuple) -> str:
    named = [c for c in choices if c]  # "" (none) is the default, not a value to suggest
    return ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else named[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--max-steps`` for ``max_steps``); a flag that is not
    given stays None, so the recipe's value or the default holds."""
    for f in fields(TrainConfig):
        flag, help_text = f.metadata["flag"] or "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_const", const=not f.default, help=help_text)
            continue
        choices = [c for c in f.metadata["choices"] or () if c] or None
        parser.add_argument(flag, dest=f.name, type=ARG_TYPES[f.type], choices=choices, help=help_text)


def _type_ok(value, annotation) -> bool:
    hint = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_overrides(data: dict, where: str) -> dict:
    """Reject unknown keys and wrong types; ints are accepted where floats are expected."""
    known = {f.name: f.type for f in fields(TrainConfig)}
    errors = [f"unknown key {k!r}{_did_you_mean(k, known)}" for k in data if k not in known]
    errors += [f"{k} must be {known[k]}, got {type(v).__name__} {v!r}" for k, v in data.items()
               if k in known and not _type_ok(v, known[k])]
    if errors:
        raise LoraError(f"{where}: " + "; ".join(errors))
    return {k: float(v) if known[k] == "float" else v for k, v in data.items()}


def _did_you_mean(key, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _yaml_floats(data: dict) -> dict:
    """YAML 1.1 reads `lr: 1e-4` (no dot) as a string: take it as the number it spells."""
    floats = {f.name for f in fields(TrainConfig) if f.type == "float"}
    return {k: _as_float(v) if k in floats and isinstance(v, str) else v for k, v in data.items()}


def _as_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def load_recipe(path_or_name: str) -> dict:
    """A YAML recipe file, or the name of a bundled one (src/loraforge/train/recipes/NAME.yaml)."""
    path = Path(path_or_name)
    if not path.exists() and (RECIPE_DIR / f"{path_or_name}.yaml").exists():
        path = RECIPE_DIR / f"{path_or_name}.yaml"
    if not path.exists():
        bundled = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise LoraError(f"recipe {path_or_name!r} not found (bundled recipes: {bundled})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise LoraError(f"{path}: not valid YAML ({one_line(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LoraError(f"recipe {path} is unreadable: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(data, dict):
        raise LoraError(f"{path}: a recipe is a mapping of option: value")
    return check_overrides(_yaml_floats(data), str(path))


def resolve(recipe: str | None = None, **overrides) -> TrainConfig:
    """Defaults < recipe file < explicit overrides (command-line flags that were given)."""
    values = load_recipe(recipe) if recipe else {}
    values.update(check_overrides({k: v for k, v in overrides.items() if v is not None}, "command line"))
    config = TrainConfig(**values)
    errors = config.problems()
    if errors:
        raise LoraError("invalid training settings: " + "; ".join(errors))
    return config


def dump(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
