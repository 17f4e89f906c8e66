"""Picking the device and dtypes: CUDA when present, bf16 where the hardware runs it natively."""
from __future__ import annotations

from pathlib import Path

import torch

from loraforge import LoraError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


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


