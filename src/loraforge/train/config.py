"""Typed training settings: a dataclass, YAML recipes, and command-line overrides.

One place validates: unknown keys and wrong types are errors that name the key and the source.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from loraforge import LoraError, one_line

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class TrainConfig:
    """Everything `loraforge train` needs. Defaults were chosen by experiment (README, "Defaults")."""

    model: str = "smollm2-135m-instruct"
    data: str = ""
    out: str = ""
    # adapter
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    # optimisation
    lr: float = 1e-3
    loraplus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): lr of B = lr * ratio
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0  # 0: run `epochs` epochs
    batch_size: int = 8  # packed rows per optimizer step (the global batch, across processes)
    grad_accum: int = 1
    max_tokens: int = 256  # tokens in one packed row
    max_len: int = 256  # one example is cut to this many tokens
    train_on_prompt: bool = False
    seed: int = 0
    # runtime
    precision: str = "auto"  # auto | fp32 | bf16 (autocast) | bf16-base (frozen base stored in bf16)
    device: str = "auto"
    gradient_checkpointing: bool = False
    quantize: str = ""  # "" | nf4 | int8 (QLoRA)
    save_every: int = 50  # checkpoint every N steps (0: only at the end)
    eval_every: int = 0  # validation loss every N steps (0: at the end only)
    val_fraction: float = 0.05
    resume: bool = False
    nproc: int = 1
    fsdp: bool = False  # FSDP2 (fully_shard per decoder block) on CUDA, with --nproc > 1
    progress: bool = True

    def problems(self) -> list[str]:
        errors = []
        for name in ("rank", "batch_size", "grad_accum", "max_tokens", "max_len", "nproc"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "alpha", "epochs"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16", "bf16-base"):
            errors.append(f"precision must be auto, fp32, bf16 or bf16-base, got {self.precision!r}")
        if self.quantize not in ("", "nf4", "int8"):
            errors.append(f"quantize must be nf4 or int8, got {self.quantize!r}")
        for name in ("max_steps", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            errors.append(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.max_len > self.max_tokens:
            errors.append(f"max_len ({self.max_len}) must not exceed max_tokens ({self.max_tokens})")
        return errors


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
    """A YAML recipe file, or the name of a bundled one (src/loraforge/recipes/NAME.yaml)."""
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
