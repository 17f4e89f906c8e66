"""Folding an adapter into its base: a standalone transformers model, and the ``merge`` command."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from loraforge import LoraError, one_line
from loraforge.core.io import check_apart, check_finite
from loraforge.core.ops import merge_and_unload


def check_merge_out(out: str | Path, force: bool = False, inputs: tuple = ()) -> Path:
    """Refuse an output that is a file, a non-empty directory without ``force``, or one that is,
    contains or lies inside an input (``force`` or not); check that it can be written."""
    out = Path(out)
    check_apart(out, [p for p in inputs if p and Path(p).exists()])
    if out.exists() and not out.is_dir():
        raise LoraError(f"output {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise LoraError(f"output directory {out} is not empty (pass --force to overwrite)")
    parent = out.resolve().parent
    if not os.access(parent if parent.exists() else Path.cwd(), os.W_OK):
        raise LoraError(f"cannot write {out}: {parent} is not writable")
    return out


def save_merged(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """Merge every active adapter of ``model`` into its weights (``merge_and_unload``) and write
    the result with its tokenizer as one standalone transformers directory (safetensors).

    Written beside ``out`` and renamed into place, so a killed merge leaves no half model."""
    out = Path(out)
    merged = merge_and_unload(model)
    check_finite(merged.state_dict(), f"merged model for {out}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a merge that was killed
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoraError(f"cannot write the merged model to {out}: {err.strerror or one_line(err)}") from None
    return out


def cli_merge(args) -> int:
    from loraforge.models.loading import load_for_inference

    out = check_merge_out(args.out, args.force, inputs=(args.adapter, args.model))
    model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    save_merged(model, tokenizer, out)
    print(f"merged model written to {out}")
    return 0
