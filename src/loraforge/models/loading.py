"""Loading base models and tokenizers: the embedded default, a local transformers directory
or a model hub id; and a base + adapter ready for inference."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraforge import LoraError, one_line
from loraforge.core.io import PICKLE_SUFFIXES
from loraforge.models.device import pick_device, pick_dtype
from loraforge.models.embedded import DEFAULT_MODEL, ensure_default_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Files fetched for a hub model: weights as safetensors, config and tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model_path(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
    """A local transformers model directory for ``--model``: the default name, a directory, or a hub id.
    For the default model loaded in bfloat16 (`dtype`), its bf16 copy (models.embedded)."""
    name = str(name_or_path)
    if name.strip().lower() == DEFAULT_MODEL:
        return str(ensure_default_model("bfloat16" if dtype == torch.bfloat16 else "float32"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraError(f"model directory '{name}' has no config.json (not a transformers model)")
        refuse_pickle_weights(path)
        return str(path)
    if path.exists():
        raise LoraError(f"model '{name}' is a file; pass a model directory (with config.json) or a hub id")
    if _looks_like_path(name):
        raise LoraError(f"model directory '{name}' does not exist")
    return _download_from_hub(name)


def refuse_pickle_weights(path: Path):
    """Loading a file never runs code: weights only as safetensors, never pickle (.bin, .pt, ...)."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LoraError(f"refusing to load {path / pickles[0]}: pickle files can run code; "
                        f"convert the model to safetensors (model.save_pretrained(dir, safe_serialization=True))")


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a filesystem path."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _download_from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except (HFValidationError, RepositoryNotFoundError) as err:
        raise LoraError(
            f"cannot load model '{repo_id}': not a local directory nor a hub model you can access "
            f"({type(err).__name__}: {one_line(err)})"
        ) from None
    except Exception as err:  # offline, DNS, timeouts, HTTP errors: all mean "unreachable"
        raise LoraError(
            f"cannot load model '{repo_id}': not a local directory and the model hub is unreachable "
            f"({type(err).__name__}: {one_line(err)})"
        ) from None
    if not (Path(folder) / "config.json").is_file():
        raise LoraError(f"hub model '{repo_id}' has no config.json (not a transformers model)")
    return folder




def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto") -> "PreTrainedModel":
    """Load a causal LM on ``device`` in ``dtype``, in eval mode with the KV cache on (for generation).

    Training code should call ``model.train()`` and set ``model.config.use_cache = False``
    (required with gradient checkpointing).
    """
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    path = resolve_model_path(name_or_path, torch_dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local load takes a second: no "Loading weights" bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LoraError(f"cannot load model '{name_or_path}' from {path}: {one_line(err)}") from None
    finally:
        hf_logging.enable_progress_bar()
    model.to(dev)
    model.eval()
    model.config.use_cache = True
    return model


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> "PreTrainedTokenizerBase":
    """Load the tokenizer; pad_token defaults to eos_token, and padding_side is 'left'.

    Left padding is what batched generation needs (new tokens follow the prompt directly).
    Training collators that want right padding must set ``tokenizer.padding_side = "right"``.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LoraError(f"cannot load the tokenizer of '{name_or_path}' from {path}: {one_line(err)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoraError(f"tokenizer of '{name_or_path}' has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_for_inference(model_name: str, adapter: str | None, dtype: str = "float32", quantize: str | None = None):
    """Base model + tokenizer, with the adapter at `adapter` attached and active."""
    from loraforge.core.io import load_adapter

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=dtype)
    if quantize:
        from loraforge.core.quant import quantize_model

        quantize_model(model, quantize)
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer
