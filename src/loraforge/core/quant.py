"""QLoRA: frozen base weights stored in 4 bits (NF4) or 8 bits (LLM.int8), adapters in float.

QLoRA (Dettmers et al. 2023) keeps every frozen Linear weight of the decoder blocks as 4-bit
NormalFloat codes in blocks of 64 weights, with one absmax scale per block that is itself
quantized to 8 bits ("double quantization": 4 + 8/64 + 32/(64*256) = about 4.127 bits per weight),
dequantizes it on the fly for each matmul, and trains LoRA adapters in higher precision on top.

Storage and matmul come from bitsandbytes (its CPU backend works since 0.45; nothing here is a
hand-written kernel). `quantize_model` swaps, in place, each Linear of the model except the output
head (for a decoder-only LM: the attention and MLP projections of every decoder block) for a
`bitsandbytes.nn.Linear4bit` (nf4, blocksize 64, compress_statistics=True) or a
`bitsandbytes.nn.Linear8bitLt`, under the same module name, so adapters trained over it are saved
under the usual PEFT keys (`base_model.model.<path>.lora_A.weight`) and load on the
full-precision base. MoE experts fused into 3-D parameters (transformers 5's Mixtral, Qwen-MoE)
are stored in NF4 too (`QuantizedParams`: dequantized in the experts' forward); routers,
embeddings, norms and the output head keep their dtype.

    from loraforge.core.quant import quantize_model, weight_bytes
    model = load_model(DEFAULT_MODEL, dtype="bfloat16")
    quantize_model(model, "nf4")          # then attach(model, LoraConfig(...)) as usual
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from loraforge import LoraError, format_bytes

logger = logging.getLogger(__name__)
METHODS = ("nf4", "int8")
NF4_BLOCKSIZE = 64  # QLoRA's block size; bitsandbytes accepts 32..4096 (powers of two) on CPU
TRIM_EVERY = 8  # layers between two malloc_trim calls while quantizing
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (inference; CPU training dequantizes instead)


def _bnb():
    """bitsandbytes, imported without its CPU-backend notice about the optional `kernels`
    package (a faster fused inference kernel; not needed here), and with its per-call int8
    notice ("inputs will be cast ... to float16") silenced."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency of --quantize
        raise LoraError(f"--quantize needs bitsandbytes >= 0.45 (pip install bitsandbytes): {err}") from None
    finally:
        quiet.setLevel(level)
    chatty = logging.getLogger("bitsandbytes.autograd._functions")
    if _int8_cast_notice not in chatty.filters:
        chatty.addFilter(_int8_cast_notice)
    return bitsandbytes


def _int8_cast_notice(record: logging.LogRecord) -> bool:
    """Drops the notice Linear8bitLt's inference matmul logs on every call for non-fp16 inputs."""
    return "inputs will be cast from" not in record.getMessage()


# --- which layers --------------------------------------------------------------------------------
def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers `quantize_model` replaces, by dotted name: every float nn.Linear (and
    transformers' Conv1D, GPT-2's transposed Linear) except the output head(s). In a decoder-only
    LM these are exactly the decoder blocks' projections."""
    from loraforge.core.layers import Conv1D
    from loraforge.core.ops import output_head_names

    kinds = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)
    heads = output_head_names(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, kinds) and name not in heads and not is_quantized(module)}


def as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing what `module` does: itself, or a Conv1D's weight (in x out)
    transposed to (out x in), the bias shared. bitsandbytes quantizes Linear layers only."""
    if isinstance(module, nn.Linear):
        return module
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().T.contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = module.bias
    linear.train(module.training)
    return linear


def is_quantized(module: nn.Module) -> bool:
    from loraforge.core.layers import is_quantized as _is_quantized

    return _is_quantized(module)


# --- building the quantized layers -----------------------------------------------------------------
def to_nf4(linear: nn.Linear, compute_dtype: torch.dtype | None = None,
           blocksize: int = NF4_BLOCKSIZE) -> nn.Module:
    """A bitsandbytes Linear4bit holding `linear`'s weight as NF4 with double quantization.
    The bias (if any) is shared, not copied. The float weight is not kept."""
    bnb = _bnb()
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                     compress_statistics=True, quant_type="nf4",
                                     module=layer)._quantize(weight.device)
    if linear.bias is not None:
        layer.bias = linear.bias
        layer.bias.requires_grad_(False)
    # bitsandbytes' CPU backend repacks a 4-bit weight into an AVX512-BF16 inference layout on the
    # first forward in eval mode without grad, and from then on runs it through a kernel that has
    # no backward; that would break training after a validation pass (and merging and
    # weight_bytes, which read the standard layout). Keep the standard layout always.
    layer.support_avx512bf16_for_cpu = False
    layer.train(linear.training)
    return layer


def to_int8(linear: nn.Linear, threshold: float = INT8_THRESHOLD) -> nn.Module:
    """A bitsandbytes Linear8bitLt holding `linear`'s weight as int8 with one scale per row."""
    bnb = _bnb()
    weight = linear.weight.detach()
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold, device="meta")
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(weight.device)
    if linear.bias is not None:
        layer.bias = linear.bias
        layer.bias.requires_grad_(False)
    layer.train(linear.training)
    return layer


# --- fused MoE experts: 3-D parameters ------------------------------------------------------------
class QuantizedParams(nn.Module):
    """A module whose 3-D parameters (transformers 5's fused MoE experts, `experts.gate_up_proj`
    (E, 2*inter, hidden) and `experts.down_proj` (E, hidden, inter)) are stored as NF4 (the same
    blocks of 64 with double quantization as a Linear4bit; bitsandbytes' quantize_4bit on the
    whole stack, so every expert's slice is its own whole blocks whenever in x out is a multiple
    of 64). The forward dequantizes them and runs the original module (`module`, which keeps
    everything else) with them in place: the experts' own routing and kernels are unchanged.
    Under the same module name, so LoRA over it (core.layers.LoraParameter) saves PEFT's keys."""

    def __init__(self, module: nn.Module, names: list[str], blocksize: int = NF4_BLOCKSIZE):
        super().__init__()
        bnb = _bnb()
        for name in names:
            weight = module._parameters.pop(name).detach()
            packed = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize, compress_statistics=True,
                                       quant_type="nf4")._quantize(weight.device)
            self.register_parameter(name, packed)
            del weight
        self.module = module
        self.train(module.training)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of the quantized parameters, as the float ones had."""
        return {name: tuple(p.quant_state.shape) for name, p in self.named_parameters(recurse=False)}

    def dense_parameter(self, name: str) -> torch.Tensor:
        import bitsandbytes.functional as bnbF

        packed = getattr(self, name)
        return bnbF.dequantize_4bit(packed.data, packed.quant_state)  # (E, out, in), the original dtype

    def run_with(self, overrides: dict[str, torch.Tensor], args: tuple, kwargs: dict):
        weights = {name: overrides[name] if name in overrides else self.dense_parameter(name)
                   for name in self.parameter_shapes()}
        return torch.func.functional_call(self.module, weights, args, kwargs, strict=False)

    def forward(self, *args, **kwargs):
        return self.run_with({}, args, kwargs)

    def set_dense(self, name: str, dense: torch.Tensor):
        """Re-quantize parameter `name` from a float tensor (merging into it rounds, as for a Linear4bit)."""
        import warnings

        warnings.warn("merging into a quantized base weight re-quantizes it and rounds the result; "
                      "merge into a full-precision model instead for an exact merge", stacklevel=3)
        old = getattr(self, name)
        self._parameters[name] = _bnb().nn.Params4bit(
            dense.to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type)._quantize(old.device)

    def dequantized(self, dtype: torch.dtype) -> nn.Module:
        """The original module with float parameters in `dtype` (this module is then spent)."""
        for name in list(self.parameter_shapes()):
            weight = self.dense_parameter(name).to(dtype)
            self.module.register_parameter(name, nn.Parameter(weight, requires_grad=False))
        return self.module


def quantizable_experts(model: nn.Module) -> dict[str, list[str]]:
    """{module path: names of its float 3-D parameters}: the fused experts of an MoE model
    (convolutions, whose weights are 3-D too, are left alone)."""
    from loraforge.core.layers import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, QuantizedParams, nn.modules.conv._ConvNd)):
            continue
        names = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]
        if names:
            found[name] = names
    return found


def _quantize_experts(model: nn.Module, blocksize: int, release: "_Release") -> tuple[int, int, int]:
    """Replace every fused-experts module by a QuantizedParams; (parameters, bytes before, after)."""
    count = before = after = 0
    for name, names in quantizable_experts(model).items():
        module = model.get_submodule(name)
        weights = [getattr(module, n) for n in names]
        before += sum(w.numel() * w.element_size() for w in weights)
        with torch.no_grad():
            quantized = QuantizedParams(module, names, blocksize)
        _set_submodule(model, name, quantized)
        for weight in weights:
            release.release(weight)
        del weights
        count += len(names)
        after += sum(p.data.numel() * p.data.element_size() + sum(t.numel() * t.element_size()
                                                                   for t in _state_tensors(p, None))
                     for p in quantized.parameters(recurse=False))
        release.trim(every=TRIM_EVERY)
    return count, before, after


def quantize_model(model: nn.Module, method: str = "nf4", compute_dtype: torch.dtype | None = None,
                   blocksize: int = NF4_BLOCKSIZE) -> nn.Module:
    """Replace, in place, every Linear except the output head by its bitsandbytes 4-bit ("nf4") or
    8-bit ("int8") version, one layer at a time (the float weight of each is freed as soon as it
    is replaced). Module names are unchanged. Quantize before attaching adapters.

    compute_dtype (nf4): dtype the weight is dequantized to for each matmul. None (default): the
    dtype of the first input the layer sees (bitsandbytes' rule: float32 for a float32 model,
    bfloat16 for a bf16 one); under autocast the matmul itself runs in the autocast dtype either
    way. Returns the model; `model.loraforge_quantization` records the method and the bytes held by
    the quantized Linear weights and by all base weights, before and after (see `weight_bytes`)."""
    from loraforge.core.layers import LoraLayer

    if method not in METHODS:
        raise LoraError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LoraError("quantize the base model before attaching adapters (quantize_model, then attach "
                        "or load_adapter)")
    if method == "nf4" and blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise LoraError(f"NF4 block size {blocksize} is not supported by bitsandbytes (use 64, as QLoRA)")
    targets = quantizable_linears(model)
    n_layers = len(targets)
    if not targets:
        if any(is_quantized(m) for m in model.modules()):
            raise LoraError("this model is already quantized")
        raise LoraError("this model has no Linear layer to quantize (besides the output head)")
    odd = [n for n, m in targets.items() if m.weight.device.type == "meta"]
    if odd:
        raise LoraError(f"cannot quantize weights on the meta device (e.g. {odd[0]})")
    before, linear_before = weight_bytes(model), _linear_bytes(targets.values())
    release = _Release(model)
    for name in list(targets):
        original = targets.pop(name)  # hold no reference: each float weight is freed once replaced
        with torch.no_grad():
            linear = as_linear(original)
            layer = to_nf4(linear, compute_dtype, blocksize) if method == "nf4" else to_int8(linear)
        _set_submodule(model, name, layer)
        release.release(original.weight)
        del linear, original
        release.trim(every=TRIM_EVERY)
    experts = _quantize_experts(model, blocksize, release) if method == "nf4" else (0, 0, 0)
    if method == "int8" and quantizable_experts(model):
        logger.warning("int8 keeps the fused MoE experts (3-D parameters) in float; --quantize nf4 stores them "
                       "in 4 bits")
    release.trim()
    linear_after = _linear_bytes(m for m in model.modules() if is_quantized(m))
    after = weight_bytes(model)
    model.loraforge_quantization = {
        "method": method, "layers": n_layers, "blocksize": blocksize if method == "nf4" else None,
        "bytes_before": before, "bytes_after": after,
        "linear_bytes_before": linear_before, "linear_bytes_after": linear_after,
        "expert_params": experts[0], "expert_bytes_before": experts[1], "expert_bytes_after": experts[2]}
    logger.info(describe(model))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace, in place, every 4-bit / 8-bit layer (also under a LoRA wrapper) by a plain frozen
    nn.Linear holding its dequantized weight in `dtype`. The model then computes what the
    quantized one did, in full precision: merge an adapter trained over NF4 into it to keep
    exactly the trained model (merging into the original float weights instead changes the base
    under the adapter by the quantization error)."""
    from loraforge.core.layers import LoraLayer, dequantize

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedParams):
            _set_submodule(model, name, module.dequantized(dtype))
            continue
        if isinstance(module, LoraLayer) or not is_quantized(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantize(module).to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = module.bias
        linear.train(module.training)
        _set_submodule(model, name, linear)
    model.loraforge_quantization = None
    return model


def _linear_bytes(layers) -> int:
    """Bytes of the weights (and quantization state) of these Linear layers, biases excluded."""
    total = 0
    for layer in layers:
        tensors = [layer.weight.data, *_state_tensors(layer.weight, layer)]
        total += sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    return total


class _Release:
    """Gives memory back to the system while a model is quantized, so that the float model is
    never resident all at once (Linux; elsewhere, or on any failure, it does nothing).

    1. Float weights read from a memory-mapped checkpoint.
    transformers maps a safetensors file and points the weights into it, so a weight's pages
    enter the process's resident memory when it is read (here: to quantize it) and stay there as
    long as anything else still points into the file (the embeddings do). Once a weight has been
    quantized, its pages are never read again: madvise(MADV_DONTNEED) drops them, so the float
    model is never resident all at once. Only whole pages inside that one weight, inside a
    file-backed mapping, and only for a weight no other parameter shares.
    2. The heap: quantizing allocates temporaries between the long-lived packed weights, and
    glibc keeps such freed memory; malloc_trim hands it back."""

    MADV_DONTNEED = 4

    def __init__(self, model: nn.Module):
        self.ranges: list[tuple[int, int]] = []
        self.madvise = self.malloc_trim = None
        self.count = 0
        if not sys.platform.startswith("linux"):
            return
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split()
                    if len(parts) >= 6 and parts[5].startswith("/"):  # backed by a file
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((start, end))
            self.madvise = libc.madvise
            self.malloc_trim = getattr(libc, "malloc_trim", None)  # glibc only
        except (OSError, AttributeError, ValueError):
            self.ranges, self.madvise = [], None
        # (start, end, id) of every parameter's bytes: a weight whose bytes any other parameter
        # also uses (tied, or a view of it) is left alone
        self.spans = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), id(p))
                      for _, p in model.named_parameters(remove_duplicate=False)]

    def trim(self, every: int = 1):
        self.count += 1
        if self.malloc_trim is not None and self.count % every == 0:
            self.malloc_trim(0)

    def release(self, weight: torch.Tensor):
        if self.madvise is None or weight.device.type != "cpu":
            return
        import mmap

        start = weight.data_ptr()
        end = start + weight.numel() * weight.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return
        if any(lo < end and start < hi and ident != id(weight) for lo, hi, ident in self.spans):
            return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            self.madvise(first, last - first, self.MADV_DONTNEED)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --- accounting ---------------------------------------------------------------------------------
def _state_tensors(param: torch.Tensor, owner: nn.Module | None) -> list[torch.Tensor]:
    """The tensors a quantized weight needs besides its codes (scales, code books, offsets)."""
    kind = type(param).__name__
    found = []
    if kind == "Params4bit" and param.quant_state is not None:
        state = param.quant_state
        found += [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "state2", None) is not None:
            found += [state.state2.absmax, state.state2.code]
    elif kind == "Int8Params":
        scb = param.SCB
        if scb is None and owner is not None and getattr(owner, "state", None) is not None:
            scb = owner.state.SCB  # Linear8bitLt moves CB/SCB into its matmul state on forward
        found.append(scb)
    return [t for t in found if isinstance(t, torch.Tensor)]


def weight_bytes(model: nn.Module, include_adapters: bool = False) -> int:
    """Bytes held by the model's weights: every parameter once (tied or shared tensors counted
    once; buffers such as rotary tables are not weights), a quantized weight as its packed codes
    plus its quantization state (block scales, double-quantization scales and code books, int8
    row scales). Adapter weights are left out unless `include_adapters`."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor):
        nonlocal total
        if t.device.type == "meta":
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for module_name, module in model.named_modules():
        if not include_adapters and _is_adapter(module_name):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if not include_adapters and pname.startswith("lora_"):
                continue
            add(p.data)
            for t in _state_tensors(p, module):
                add(t)
    return total


def _is_adapter(name: str) -> bool:
    return any(part.startswith("lora_") or part == "modules_to_save" for part in name.split("."))


def nf4_bits_per_weight(blocksize: int = NF4_BLOCKSIZE, nested_blocksize: int = 256) -> float:
    """Storage per weight of NF4 with double quantization: 4-bit code + 8-bit block scale / blocksize
    + one fp32 second-level scale per `nested_blocksize` blocks (QLoRA sec. 3: 4.127 at 64/256)."""
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)


def describe(model: nn.Module) -> str:
    """One line on how the model's Linear weights are stored (after `quantize_model`)."""
    info = getattr(model, "loraforge_quantization", None)
    if not info:
        return f"base weights {format_bytes(weight_bytes(model))} (not quantized)"
    extra = f", blocksize {info['blocksize']}, double quantization" if info["method"] == "nf4" else ""
    experts = ""
    if info.get("expert_params"):
        experts = (f"; {info['expert_params']} fused MoE expert parameters in nf4 "
                   f"{format_bytes(info['expert_bytes_before'])} -> {format_bytes(info['expert_bytes_after'])}")
    return (f"{info['layers']} Linear layers in {info['method']}{extra}: their weights "
            f"{format_bytes(info['linear_bytes_before'])} -> {format_bytes(info['linear_bytes_after'])} "
            f"({info['linear_bytes_after'] / info['linear_bytes_before']:.3f}x){experts}; all base weights "
            f"{format_bytes(info['bytes_before'])} -> {format_bytes(info['bytes_after'])} "
            f"({info['bytes_after'] / info['bytes_before']:.3f}x)")

