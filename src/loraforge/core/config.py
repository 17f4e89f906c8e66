"""LoraConfig: the fields of one adapter, their validation, and PEFT's JSON form.

Letters follow the LoRA paper (Hu et al. 2021, eq. 3) and PEFT: h = W x + B A x * scaling with
A (r x in) and B (out x r). The background notes the project grew from (lora-mechanics.txt)
write them the other way round (A: m x r, B: r x n, dW = A B); its A is our B. Only the names
differ, not the math.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from loraforge import LoraError

# Module-name suffixes behind the target presets. `all-linear` is not a list: it takes every
# Linear / Conv1D layer except the output head (see model.find_targets).
PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj",  # Llama, Mistral, Qwen, Gemma, OPT, SmolLM
                  "attn.c_attn", "attn.c_proj",  # GPT-2 (Conv1D)
                  "query_key_value", "attention.dense",  # GPT-NeoX (fused q/k/v, then its output)
                  "qkv_proj", "Wqkv", "out_proj"),  # Phi-3 and others with a fused q/k/v
    "mlp": ("gate_proj", "up_proj", "down_proj",  # Llama family
            "gate_up_proj",  # Phi-3 (fused gate/up)
            "mlp.c_fc", "mlp.c_proj",  # GPT-2
            "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h"),  # OPT, GPT-NeoX
}  # on MoE models `mlp` also selects the fused experts' gate_up_proj / down_proj (ops.find_parameter_targets)
ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian", "pissa")


@dataclass
class LoraConfig:
    """One adapter's settings. Field names follow PEFT where PEFT has them (`to_peft`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None  # PEFT's: parameters no Linear owns (MoE experts, routers)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: str = "default"  # default: A kaiming-uniform, B zero | gaussian | pissa
    use_rslora: bool = False  # scaling = alpha / sqrt(r) (Kalajdzievski 2023)
    use_dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024)
    modules_to_save: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # PEFT's: rows trained (core.tokens)

    def __post_init__(self):
        errors = self.type_problems()
        if not errors:
            if isinstance(self.target_modules, tuple):
                self.target_modules = list(self.target_modules)
            self.modules_to_save = list(self.modules_to_save or [])
            self.target_parameters = list(self.target_parameters) if self.target_parameters else None
            self.rank_pattern = dict(self.rank_pattern or {})
            self.alpha_pattern = dict(self.alpha_pattern or {})
            errors = self.problems()
        if errors:
            raise LoraError("invalid LoraConfig: " + "; ".join(errors))

    def type_problems(self) -> list[str]:
        """Fields of the wrong kind (a file may hold anything): names are a string or a list of
        strings, patterns are mappings."""
        errors = [f"{name} must be a string or a list of strings, got {_kind(getattr(self, name))}"
                  for name in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters")
                  if not _names_ok(getattr(self, name), allow_str=name in ("target_modules", "exclude_modules"))]
        errors += [f"{name} must be a mapping of pattern: value, got {_kind(getattr(self, name))}"
                   for name in ("rank_pattern", "alpha_pattern")
                   if not isinstance(getattr(self, name) or {}, dict)]
        if not _token_indices_ok(self.trainable_token_indices):
            errors.append("trainable_token_indices must be a list of token ids or a mapping of module name: list of "
                          f"token ids, got {self.trainable_token_indices!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            errors.append(f"base_model_name_or_path must be a string, got {_kind(self.base_model_name_or_path)}")
        return errors

    def problems(self) -> list[str]:
        """Every problem with the fields, collected (not just the first)."""
        errors = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            errors.append(f"r must be a positive integer, got {self.r!r}")
        if not _is_number(self.alpha) or not 0 < self.alpha < math.inf:  # the comparison also rejects NaN
            errors.append(f"alpha {_positive_finite(self.alpha)}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            errors.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            errors.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not self.target_modules and not self.target_parameters:
            errors.append("target_modules is empty (and no target_parameters)")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                errors.append(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            if not _is_number(value) or not 0 < value < math.inf:
                errors.append(f"alpha_pattern[{key!r}] {_positive_finite(value)}")
        for pattern in [*self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(pattern)
            except re.error as err:
                errors.append(f"pattern {pattern!r} is not a valid regex: {err}")
        return errors

    # --- per-module values -------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scaling_for(self, module_name: str) -> float:
        return lora_scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    # --- PEFT's adapter_config.json ------------------------------------------------------
    def to_peft(self, target_names: list[str] | None = None, fan_in_fan_out: bool = False,
                target_parameters: list[str] | None = None) -> dict:
        """PEFT's adapter_config.json fields. `target_names` replaces presets by the
        concrete module-name suffixes found on the model, so PEFT and vLLM can read it (and
        `target_parameters` the parameters adapted, MoE experts and routers);
        `fan_in_fan_out` is what PEFT records for GPT-2-style Conv1D targets."""
        targets = self.target_modules
        if target_names is not None and (isinstance(targets, list) or targets in PRESETS or targets == ALL_LINEAR):
            targets = sorted(set(target_names))
        parameters = self.target_parameters if target_parameters is None else target_parameters
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": self.exclude_modules,
            "target_parameters": sorted(parameters) if parameters else None,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": self.modules_to_save or None,
            "trainable_token_indices": self.trainable_token_indices,
            "init_lora_weights": {"default": True}.get(self.init, self.init),
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "inference_mode": True,
            "revision": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft(cls, data: dict, where: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's adapter_config.json (ours or PEFT's own)."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraError(f"{where}: peft_type is {data.get('peft_type')!r}, only LORA adapters are supported")
        if data.get("layers_to_transform") not in (None, []):
            raise LoraError(f"{where}: layers_to_transform is not supported")
        if data.get("bias", "none") != "none":
            raise LoraError(f"{where}: bias={data.get('bias')!r} is not supported (only 'none')")
        if data.get("lora_bias"):
            raise LoraError(f"{where}: lora_bias=True is not supported (lora_B without a bias only)")
        init = data.get("init_lora_weights", True)
        init = "default" if init in (True, False, None) else str(init)
        init = "pissa" if init.startswith("pissa") else init
        try:
            return cls(
                r=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                target_modules=data.get("target_modules") or [], exclude_modules=data.get("exclude_modules"),
                target_parameters=data.get("target_parameters") or None,
                rank_pattern=data.get("rank_pattern") or {}, alpha_pattern=data.get("alpha_pattern") or {},
                init=init if init in INITS else "default", use_rslora=bool(data.get("use_rslora", False)),
                use_dora=bool(data.get("use_dora", False)), modules_to_save=data.get("modules_to_save") or [],
                base_model_name_or_path=data.get("base_model_name_or_path"),
                trainable_token_indices=data.get("trainable_token_indices"),
            )
        except LoraError as err:
            raise LoraError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "LoraConfig":
        """Build from a plain dict (a YAML recipe section); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraError(f"{where}: unknown LoRA option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def parse_targets(targets: str | list[str]) -> str | list[str]:
    """Targets as a user writes them (a flag, a recipe): `all-linear`, `attention`, `mlp`, or a
    comma list of module names (returned as a list), or already a list."""
    if isinstance(targets, list):
        return targets
    text = targets.strip()
    if text == ALL_LINEAR or text in PRESETS:
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LoraError("--targets is empty; use all-linear, attention, mlp or a comma list of module names")
    return names


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B·A: alpha / r (LoRA, Hu et al. 2021, sec. 4.1) or alpha / sqrt(r) (rsLoRA,
    Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def exact_patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """Per-module values as rank_pattern / alpha_pattern entries: each module name escaped into a
    regex that matches it alone (PEFT matches pattern keys as regexes ending the module name),
    for every module whose value differs from `default`."""
    return {re.escape(m): v for m, v in sorted(values.items()) if v != default}


def _names_ok(value, allow_str: bool = True) -> bool:
    if value is None or (allow_str and isinstance(value, str)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _token_ids_ok(ids) -> bool:
    return isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)


def _token_indices_ok(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _token_ids_ok(v) for k, v in value.items())
    return value is None or _token_ids_ok(value)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def _positive_finite(value) -> str:
    """The complaint about a value that should be a finite number > 0."""
    if _is_number(value) and value <= 0:
        return f"must be > 0, got {value!r}"
    return f"must be > 0 and finite, got {value!r}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: a pattern key matches a module name ending in it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def parameter_matches(path: str, entries: list[str] | None) -> bool:
    """PEFT's rule for target_parameters: a parameter path equal to an entry or ending in `.entry`
    (`gate_up_proj` selects `model.layers.0.mlp.experts.gate_up_proj`)."""
    return any(path == entry or path.endswith("." + entry) for entry in entries or [])


def name_matches(module_name: str, targets: list[str] | str) -> bool:
    """Whether `module_name` is selected by `targets`.

    A list selects exact names and dotted suffixes (`q_proj` matches `layers.0.self_attn.q_proj`);
    preset names (`attention`, `mlp`) expand to their suffixes; a string that is not a preset is
    a regex matched against the whole name (PEFT's convention).
    """
    if isinstance(targets, str):
        if targets in PRESETS:
            return name_matches(module_name, list(PRESETS[targets]))
        return re.fullmatch(targets, module_name) is not None
    for target in targets:
        if target in PRESETS:
            if name_matches(module_name, list(PRESETS[target])):
                return True
        elif module_name == target or module_name.endswith("." + target):
            return True
    return False
