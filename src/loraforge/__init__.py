"""loraforge: Low-Rank Adaptation for language models.

Naming follows the LoRA paper and PEFT: a frozen weight W (out x in) gets the update
dW = B @ A with ``lora_A`` (r x in, random at init) and ``lora_B`` (out x r, zero at init),
scaled by ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
"""
__version__ = "0.1.0"


class LoraError(ValueError):
    """A user-facing error: the message says what is wrong and where, in one line."""
