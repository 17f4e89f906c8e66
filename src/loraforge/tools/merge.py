"""Folding an adapter into its base: a standalone transformers model, and the ``merge`` command.

An adapter trained over a 4-bit (NF4) or 8-bit base learned to correct *that* base. Merged into the
original float weights it no longer sits on the weights it was trained with, and scores lower
(82.5% vs 92.5% exact match on the demo task, measured here). So by default an adapter whose
``train_config.yaml`` records a quantized base is merged into the dequantized quantized weights
(``base_weights="dequantized"``): the merged model computes what was trained. ``"original"``
merges into the float checkpoint instead. Either way the KL divergence of the merged model from
the unmerged one as trained is measured on a few probe texts and reported.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from loraforge import LoraError, one_line
from loraforge.core.io import check_apart, check_finite, load_adapter
from loraforge.core.ops import merge_and_unload

BASE_WEIGHTS = ("auto", "original", "dequantized")
PROBE_TEXTS = (  # short, varied: enough to see whether the merged model still computes the trained one
    "The capital of France is Paris, and the capital of Japan is",
    "Extract the person as JSON: In Oslo, 64-year-old Chen Murphy earns a living as a plumber.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Low-rank adaptation trains two small matrices instead of the full weight matrix.",
)


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
    the result with its tokenizer as one standalone transformers directory (safetensors)."""
    return write_model_dir(merge_and_unload(model), tokenizer, out)


def write_model_dir(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """Write a model and its tokenizer as a transformers directory, beside ``out`` first and
    renamed into place, so a killed write leaves no half model. Refuses non-finite weights."""
    out = Path(out)
    check_finite(model.state_dict(), f"merged model for {out}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a merge that was killed
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoraError(f"cannot write the merged model to {out}: {err.strerror or one_line(err)}") from None
    return out


# --- merging onto the base the adapter was trained on ---------------------------------------------
def training_config(adapter: str | Path):
    """The adapter's train_config.yaml as a TrainConfig (None for adapters made elsewhere)."""
    from loraforge.train.config import resolve

    path = Path(adapter) / "train_config.yaml"
    return resolve(str(path)) if path.is_file() else None


def choose_base_weights(requested: str, quantize: str) -> str:
    if requested not in BASE_WEIGHTS:
        raise LoraError(f"--base-weights must be one of {', '.join(BASE_WEIGHTS)}, got {requested!r}")
    if requested == "dequantized" and not quantize:
        raise LoraError("--base-weights dequantized: the adapter's train_config.yaml records no quantized base "
                        "(nothing to dequantize); use original")
    if requested == "auto":
        return "dequantized" if quantize else "original"
    return requested


def trained_base(model_name: str, cfg) -> nn.Module:
    """The base as the adapter's run trained over it (quantized for QLoRA), on the CPU."""
    import dataclasses

    from loraforge.train.loop import load_base

    return load_base(dataclasses.replace(cfg, model=model_name, device="cpu"), torch.device("cpu"))


@torch.no_grad()
def probe_logprobs(model: nn.Module, tokenizer) -> list[torch.Tensor]:
    """Log-softmax of the model's logits on each probe text, float64: (tokens, vocab) each."""
    out = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
        out.append(torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1).cpu())
    return out


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """KL(reference || other) per token, averaged over every probe token (nats)."""
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(reference, other))
    return total / sum(p.shape[0] for p in reference)


def merged_model(model_name: str, adapter: str | Path, base_weights: str = "auto",
                 dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, dict]:
    """Base + adapter merged into one plain model, onto the weights ``base_weights`` names (see
    the module docstring); returns (merged model, tokenizer, report with the KL measured)."""
    from loraforge.core.quant import dequantize_model
    from loraforge.models.loading import load_model, load_tokenizer

    cfg = training_config(adapter)
    quantize = cfg.quantize if cfg else ""
    choice = choose_base_weights(base_weights, quantize)
    tokenizer = adapter_tokenizer(adapter) or load_tokenizer(model_name)
    unmerged = trained_base(model_name, cfg) if quantize else load_model(model_name, dtype="float32", device="cpu")
    load_with_tokens(unmerged, adapter)
    reference = probe_logprobs(unmerged, tokenizer)
    if choice == "dequantized":
        model = dequantize_model(unmerged, torch.float32)  # in place: the adapter stays on the same weights
    elif quantize:  # the float checkpoint the quantized base came from
        del unmerged
        model = load_model(model_name, dtype="float32", device="cpu")
        load_with_tokens(model, adapter)
    else:
        model = unmerged
    merged = merge_and_unload(model).to(dtype)
    kl = mean_kl(reference, probe_logprobs(merged, tokenizer))
    return merged, tokenizer, {"base_weights": choice, "quantize": quantize or None, "kl": kl,
                               "probe_tokens": sum(p.shape[0] for p in reference)}


def adapter_tokenizer(adapter: str | Path):
    """The tokenizer saved beside the adapter (--add-tokens grew it), or None."""
    from transformers import AutoTokenizer

    if not (Path(adapter) / "tokenizer_config.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LoraError(f"cannot load the tokenizer saved beside the adapter in {adapter}: {one_line(err)}") from None


def load_with_tokens(model: nn.Module, adapter: str | Path):
    """load_adapter, the vocabulary grown first to an adapter's trainable tokens (--add-tokens: the
    tokenizer saved beside the adapter has them); the grown rows are then the trained ones."""
    from loraforge.core.io import read_adapter
    from loraforge.core.tokens import all_ids, grow_vocabulary

    indices = read_adapter(adapter)[0].trainable_token_indices
    if indices:
        grow_vocabulary(model, all_ids(indices), mean_resizing=False)
    load_adapter(model, adapter)


def describe_merge(report: dict) -> str:
    onto = (f"the dequantized {report['quantize']} weights it was trained over" if report["base_weights"] == "dequantized"
            else f"the original float weights (it was trained over {report['quantize']})" if report["quantize"]
            else "the original weights")
    kl = report["kl"]
    return (f"merged onto {onto}; KL(unmerged as trained || merged) = {kl:.3g} nats/token over "
            f"{report['probe_tokens']} probe tokens" + ("" if math.isfinite(kl) else " (not finite)"))


def cli_merge(args) -> int:
    from loraforge.models.device import DTYPES

    if args.dtype not in DTYPES:
        raise LoraError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    out = check_merge_out(args.out, args.force, inputs=(args.adapter, args.model))
    merged, tokenizer, report = merged_model(args.model, args.adapter, args.base_weights, DTYPES[args.dtype])
    write_model_dir(merged, tokenizer, out)
    print(describe_merge(report))
    print(f"merged model written to {out}")
    return 0
