"""Adapter directories as the tools see them: one `Update` (A, B, scaling) per module, plus the
stored config and any other tensors (modules_to_save), which are written back unchanged.

Files are read with `loraforge.core.io.read_adapter` (safetensors only, never pickle). Per-module
ranks come from the stored shapes and alphas from the config, as `loraforge.core.io.load_adapter` does.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge import LoraError
from loraforge.core.config import LoraConfig, exact_patterns, lora_scaling
from loraforge.core.io import CONFIG_NAME, WEIGHTS_NAME, group_by_module, read_adapter


@dataclass
class Update:
    """One module's update dW = scaling·B·A (A: r x in, B: out x r) and the keys it is stored under."""

    module: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    keys: dict[str, str] = field(default_factory=dict)  # part ('lora_A', ...) -> key in the file
    magnitude: torch.Tensor | None = None  # DoRA's per-row magnitude vector

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of dW; for an embedding (dim, vocab), PEFT's layout."""
        return self.B.shape[0], self.A.shape[1]

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """dW as a dense (out x in) matrix; only the methods that need it call this."""
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class Adapter:
    path: Path
    config: LoraConfig
    raw: dict  # adapter_config.json as stored; outputs change only the fields they must
    updates: dict[str, Update]
    other: dict[str, torch.Tensor]  # tensors that are not LoRA factors, copied through
    weights_bytes: int

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.updates.values())).A.dtype


def load(path: str | Path, parameters: bool = False) -> Adapter:
    """Read an adapter directory into per-module updates (LoraError in one line when broken).
    LoRA on MoE expert parameters (target_parameters) is refused unless `parameters` (inspect)."""
    path = Path(path)
    config, tensors = read_adapter(path)
    if config.target_parameters and not parameters:
        raise LoraError(f"adapter {path} adapts MoE expert / router parameters (target_parameters); this tool "
                        f"handles Linear, Conv1D and Embedding updates only")
    raw = json.loads((path / CONFIG_NAME).read_text())
    modules = group_by_module(tensors, str(path))
    if not modules:
        raise LoraError(f"{path}/{WEIGHTS_NAME} holds no LoRA weights")
    key_of = {id(t): k for k, t in tensors.items()}
    updates = {m: _update(m, parts, key_of, config, path) for m, parts in sorted(modules.items())}
    used = {key for u in updates.values() for key in u.keys.values()}
    other = {k: t for k, t in tensors.items() if k not in used}
    return Adapter(path, config, raw, updates, other, (path / WEIGHTS_NAME).stat().st_size)


def _update(module: str, parts: dict, key_of: dict, config: LoraConfig, path: Path) -> Update:
    A = parts.get("lora_A", parts.get("lora_embedding_A"))
    B = parts.get("lora_B", parts.get("lora_embedding_B"))
    if A is None or B is None:
        raise LoraError(f"adapter {path}: module {module!r} lacks its lora_A or lora_B tensor")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise LoraError(f"adapter {path}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                        f"expected (r, in) and (out, r) (only Linear, Conv1D and Embedding updates are supported)")
    keys = {part: key_of[id(t)] for part, t in parts.items()}
    return Update(module, A, B, scaling_at(config, module, A.shape[0]), keys, parts.get("lora_magnitude_vector"))


def scaling_at(config: LoraConfig, module: str, r: int) -> float:
    """The module's scaling at rank r: its alpha (alpha_pattern applies) over r, or sqrt(r) (rsLoRA)."""
    return lora_scaling(config.alpha_for(module), r, config.use_rslora)


def factor_tensors(update: Update, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype,
                   magnitude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """New factors for `update`'s module under its own keys (lora_A or lora_embedding_A...)."""
    a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in update.keys \
        else ("lora_A", "lora_B")
    tensors = {update.keys[a_part]: A.to(dtype).contiguous(), update.keys[b_part]: B.to(dtype).contiguous()}
    if magnitude is not None:
        tensors[update.keys["lora_magnitude_vector"]] = magnitude
    return tensors


def common_rank(ranks: dict[str, int]) -> int:
    return Counter(ranks.values()).most_common(1)[0][0]


def with_ranks(raw: dict, ranks: dict[str, int], **changes) -> dict:
    """A copy of adapter_config.json with per-module ranks: r = the most common one, the others
    as exact-name entries in rank_pattern (PEFT matches keys as regexes on the module name)."""
    r = common_rank(ranks)
    return {**raw, **changes, "r": r, "rank_pattern": exact_patterns(ranks, r)}




def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=100, format="png")
        tmp.replace(path)
    except OSError as err:
        raise LoraError(f"cannot write plot {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return path
