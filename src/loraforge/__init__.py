"""loraforge: Low-Rank Adaptation for language models.

Naming follows the LoRA paper and PEFT: a frozen weight W (out x in) gets the update
dW = B @ A with ``lora_A`` (r x in, random at init) and ``lora_B`` (out x r, zero at init),
scaled by ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

The public API, re-exported from the layers below (imported on first use, so that
``import loraforge`` stays cheap)::

    from loraforge import LoraConfig, attach, load_adapter, save_adapter, merge_and_unload

Layers, imports pointing one way (a lower layer never imports a higher one):
``core`` <- ``models`` <- ``data`` <- ``eval`` <- ``train`` <- ``tools`` / ``serve`` / ``demo`` <- ``cli``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"


class LoraError(ValueError):
    """A user-facing error: the message says what is wrong and where, in one line."""


def one_line(err: BaseException, limit: int = 160) -> str:
    """The first non-blank line of an exception's text, cut to ``limit`` characters: what a
    LoraError may quote of an error raised inside a library."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_bytes(n: int) -> str:
    """Bytes in binary units as people read them: 512 B, 3.0 KiB, 1.5 MiB, 8.00 GiB."""
    for unit, scale, digits in (("GiB", 2 ** 30, 2), ("MiB", 2 ** 20, 1), ("KiB", 2 ** 10, 1)):
        if abs(n) >= scale:
            return f"{n / scale:,.{digits}f} {unit}"
    return f"{n} B"


# name -> module that defines it
_API = {
    "LoraConfig": "loraforge.core.config",
    **{name: "loraforge.core.ops" for name in (
        "attach", "find_targets", "set_adapter", "disabled", "delete_adapter", "mixed_batch", "adapter_params",
        "set_trainable", "parameter_report", "merge", "unmerge", "merge_and_unload", "unload", "combine")},
    **{name: "loraforge.core.io" for name in ("save_adapter", "load_adapter", "read_adapter")},
    **{name: "loraforge.core.quant" for name in ("quantize_model", "dequantize_model")},
    **{name: "loraforge.models" for name in ("load_model", "load_tokenizer", "generate_text", "DEFAULT_MODEL")},
    "TrainConfig": "loraforge.train.config",
    "train": "loraforge.train.loop",
    "evaluate": "loraforge.eval.score",
    "save_merged": "loraforge.tools.merge",
}
__all__ = ["LoraError", "format_bytes", "one_line", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value
