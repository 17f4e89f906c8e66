"""Base models: the embedded default (``embedded``), device and dtype choice (``device``), loading
models and tokenizers (``loading``) and generation (``generate``). The common names are re-exported."""
from loraforge.models.device import DTYPES, autocast_dtype, bf16_supported, pick_device, pick_dtype
from loraforge.models.embedded import DEFAULT_MODEL, default_model_dir, ensure_default_model
from loraforge.models.generate import generate_text
from loraforge.models.loading import load_for_inference, load_model, load_tokenizer, resolve_model_path

__all__ = ["DEFAULT_MODEL", "DTYPES", "autocast_dtype", "bf16_supported", "default_model_dir", "ensure_default_model",
           "generate_text", "load_for_inference", "load_model", "load_tokenizer", "pick_device", "pick_dtype",
           "resolve_model_path"]
