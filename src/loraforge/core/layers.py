"""The math: LoRA over Linear, Embedding and transformers' Conv1D; delta weights; merge; DoRA.

A LoRA layer wraps (never subclasses) its base layer, as PEFT does, so any Linear, a quantized
one included, can be adapted. Per adapter it holds `lora_A` (r x in), `lora_B` (out x r) and a
`scaling`; the forward adds `B(A(dropout(x))) * scaling` to the base output (LoRA eq. 3). Plain
LoRA never builds B @ A in the forward; DoRA does, once per forward, for the row norms of
W + dW (its eq. 5 needs them). Variants such as DoRA are classes (`LoraVariant`) that override
the few steps that differ. Several named adapters can live on one layer; `row_adapters` routes
each row of a batch to its own adapter (mixed batches for multi-tenant serving).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraforge import LoraError
from loraforge.core.config import lora_scaling

try:  # GPT-2's Conv1D: a Linear whose weight is stored transposed (in x out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


class LoraLayer(nn.Module):
    """State shared by every LoRA layer type: adapters, active set, merge bookkeeping."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: list[tuple[str, torch.Tensor]] | None = None  # [(adapter, row index)]
        self.router = None  # optional callable(layer, x, base_out) -> output, set by a serving engine
        self._merge_norms: dict[str, torch.Tensor] = {}  # DoRA: weight norm used at merge time

    # --- shapes of the base weight, seen as a (out x in) matrix ---------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def dense_weight(self) -> torch.Tensor:
        """The base weight as (out x in), dequantized when the base layer is quantized."""
        return dequantize(self.base_layer)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def set_scaling(self, name: str, r: int, alpha: float, use_rslora: bool):
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)

    # --- merging (exact: W' = W + dW, and back) ------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, names: list[str] | None = None):
        """Fold adapters `names` (default: the active ones this layer has) into the weight."""
        names = self.active_adapters if names is None else names
        for name in names:
            if name in self.r and name not in self.merged_adapters:
                self._add_to_weight(self.merge_increment(name))
                self.merged_adapters.append(name)

    def unmerge(self):
        while self.merged_adapters:
            self._add_to_weight(self.unmerge_increment(self.merged_adapters.pop()))

    def merge_increment(self, name: str) -> torch.Tensor:
        """What merging adds to the (out x in) weight: dW for plain LoRA."""
        return self.delta_weight(name)

    def unmerge_increment(self, name: str) -> torch.Tensor:
        return -self.delta_weight(name)

    def _add_to_weight(self, delta: torch.Tensor):
        """Add a (out x in) float32 delta to the base weight in its own layout and dtype."""
        weight = self.base_layer.weight
        if is_quantized(self.base_layer):
            set_quantized_weight(self.base_layer, self.dense_weight().float() + delta)
            return
        with torch.no_grad():
            weight.add_(self.to_base_layout(delta).to(weight.dtype))

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    # --- routing -----------------------------------------------------------------------
    def routes(self) -> list[tuple[str, torch.Tensor | None]]:
        """(adapter, rows or None for all rows) pairs that this forward applies."""
        if self.disabled:
            return []
        if self.row_adapters is not None:
            if self.merged:
                raise LoraError("mixed-adapter batches need unmerged adapters: call unmerge() first")
            return [(name, rows) for name, rows in self.row_adapters if name in self.r]
        return [(name, None) for name in self.active_adapters if name in self.r and name not in self.merged_adapters]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.router is not None:  # a batched multi-adapter kernel (serving) handles routing
            return self.router(self, x, result)
        base = result
        for name, rows in self.routes():  # each increment is computed against the base output
            if rows is None:
                result = self.add_lora(name, x, result, base)
            else:
                result = result.index_add(0, rows, self.lora_output(name, x[rows], base[rows]))
        return result

    def lora_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """result + this adapter's increment (layer types may fuse the addition)."""
        return result + self.lora_output(name, x, base)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A (r x in) and B (out x r), so that the update is B @ A * scaling."""
        raise NotImplementedError

    def set_factors(self, name: str, A: torch.Tensor, B: torch.Tensor):
        """Copy given factors into adapter `name` (shapes must match its rank)."""
        own_A, own_B = self.factors(name)
        with torch.no_grad():
            own_A.copy_(A)
            own_B.copy_(B)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoraVariant:
    """Plain LoRA (Hu et al. 2021): the increment is the low-rank term itself, and merging adds
    dW. A variant overrides the steps that differ (PEFT's LoraVariant idea); a layer finds an
    adapter's variant from the parameters it holds (`LoraLinear.variant`)."""

    fusable = True  # the increment may be folded into one addmm (LoraLinear.add_lora)

    def increment(self, layer: "LoraLinear", name: str, h: torch.Tensor, lora: torch.Tensor,
                  base_out: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output, given dropout(x) `h` and s·B·A·h `lora`."""
        return lora

    def merge_increment(self, layer: "LoraLinear", name: str) -> torch.Tensor:
        return layer.delta_weight(name)

    def unmerge_increment(self, layer: "LoraLinear", name: str) -> torch.Tensor:
        return -layer.delta_weight(name)


class DoraVariant(LoraVariant):
    """DoRA (Liu et al. 2024): W' = m (W + dW) / ||W + dW|| with a learned magnitude m per output
    row (`lora_magnitude_vector`) and the norm detached from the graph (sec. 4.3)."""

    fusable = False

    def increment(self, layer, name, h, lora, base_out):
        """m (W + dW) h / ||W + dW|| (eq. 5) as the increment over the base output W x + b."""
        scale = layer.lora_magnitude_vector[name] / layer.row_norm(name).detach()  # (out,)
        if isinstance(layer.lora_dropout[name], nn.Identity):
            base = base_out - layer.bias_or_zero()  # W x, reused from the base pass
        else:
            base = layer.base_matmul(h)
        return (scale - 1) * base + scale * lora

    def merge_increment(self, layer, name):
        weight = layer.dense_weight().float()
        merged = weight + layer.delta_weight(name)
        norm = merged.norm(p=2, dim=1)
        layer._merge_norms[name] = norm  # unmerge divides by the same norm
        return merged * (layer.lora_magnitude_vector[name].float() / norm)[:, None] - weight

    def unmerge_increment(self, layer, name):
        weight = layer.dense_weight().float()
        factor = layer.lora_magnitude_vector[name].float() / layer._merge_norms.pop(name)
        return weight / factor[:, None] - layer.delta_weight(name) - weight


PLAIN, DORA = LoraVariant(), DoraVariant()


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear (and quantized Linear subclasses): y = W x + B A dropout(x) * s."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: ||W + dW|| per output row
        self.in_features, self.out_features = self.base_shape()

    def base_shape(self) -> tuple[int, int]:
        return self.base_layer.in_features, self.base_layer.out_features

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "default",
                    use_rslora: bool = False, use_dora: bool = False):
        self.set_scaling(name, r, alpha, use_rslora)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)  # (r, in)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)  # (out, r)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(name, init)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self.row_norm(name))
        self._match_device(name)

    def reset_parameters(self, name: str, init: str):
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "pissa":
            self.pissa_init(name)
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
        else:  # LoRA paper / loralib: A kaiming-uniform, B zero so that dW = 0 at start
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def pissa_init(self, name: str):
        """PiSSA (Meng et al. 2024): A, B from the top-r singular vectors; W keeps the residual."""
        weight = self.dense_weight().float()  # (out, in)
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        r, scaling = self.r[name], self.scaling[name]
        root = torch.sqrt(S[:r] / scaling)  # (r,)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(root[:, None] * Vh[:r])  # (r, in)
            self.lora_B[name].weight.copy_(U[:, :r] * root[None, :])  # (out, r)
        self._add_to_weight(-self.delta_weight(name))

    def _match_device(self, name: str):
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        for module in (self.lora_A[name], self.lora_B[name]):
            module.to(device=weight.device, dtype=dtype)
        if name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].data = self.lora_magnitude_vector[name].data.to(weight.device, dtype)

    def variant(self, name: str) -> LoraVariant:
        return DORA if name in self.lora_magnitude_vector else PLAIN

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """dW = B @ A * scaling as a float32 (out x in) matrix (used for merge, never in forward)."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (B @ A) * self.scaling[name]

    def row_norm(self, name: str) -> torch.Tensor:
        """||W + dW|| over the input dimension: one norm per output row (DoRA eq. 5)."""
        return (self.dense_weight().float() + self.delta_weight(name)).norm(p=2, dim=1)

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Plain LoRA fused into one GEMM epilogue: result + s * (A h) B^T via addmm, so the
        scaling and the addition cost no extra pass over the (tokens x out) output."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if not self.variant(name).fusable or (not autocast and result.dtype != A.dtype):
            return result + self.lora_output(name, x, base)
        h = self.lora_dropout[name](x if autocast else x.to(A.dtype))
        a = F.linear(h, A)  # (..., r)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), B.t(),
                          alpha=self.scaling[name])  # (tokens, out)
        return out.view(result.shape)

    def lora_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.weight.dtype)
        h = self.lora_dropout[name](x)
        lora = B(A(h) * self.scaling[name])  # (..., out); scaling applied to the small (..., r) tensor
        return self.variant(name).increment(self, name, h, lora, base_out).to(base_out.dtype)

    def bias_or_zero(self):
        bias = getattr(self.base_layer, "bias", None)
        return 0 if bias is None else bias

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype))

    def merge_increment(self, name: str) -> torch.Tensor:
        return self.variant(name).merge_increment(self, name)

    def unmerge_increment(self, name: str) -> torch.Tensor:
        return self.variant(name).unmerge_increment(self, name)


class LoraConv1D(LoraLinear):
    """LoRA over GPT-2's Conv1D, whose weight is stored (in x out): y = x W + b."""

    def base_shape(self) -> tuple[int, int]:
        in_features, out_features = self.base_layer.weight.shape
        return in_features, out_features

    def dense_weight(self) -> torch.Tensor:
        return self.base_layer.weight.T  # (out, in)

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T


class LoraEmbedding(LoraLayer):
    """LoRA over nn.Embedding: out = E[x] + (A^T[x] @ B^T) * s, with A (r x vocab), B (dim x r).
    Stored as PEFT's `lora_embedding_A` / `lora_embedding_B` parameters."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "default",
                    use_rslora: bool = False, use_dora: bool = False):
        if use_dora:
            raise LoraError("DoRA is supported on Linear and Conv1D layers, not on embeddings")
        if init == "pissa":
            raise LoraError("PiSSA init is supported on Linear and Conv1D layers, not on embeddings")
        self.set_scaling(name, r, alpha, use_rslora)
        weight = self.base_layer.weight
        A = torch.empty(r, self.num_embeddings, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(A, std=1 / r if init == "gaussian" else 1.0)
        self.lora_embedding_A[name] = nn.Parameter(A)  # (r, vocab)
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(self.embedding_dim, r, device=weight.device,
                                                               dtype=weight.dtype))  # (dim, r), zero: dW = 0

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (B @ A).T * self.scaling[name]  # (vocab, dim), the layout of the embedding weight

    def dense_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def lora_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_A = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)  # (..., r)
        return (after_A @ self.lora_embedding_B[name].T * self.scaling[name]).to(base_out.dtype)


# --- quantized base layers (bitsandbytes), kept here so the rest of the code need not care ----
def is_quantized(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params")


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The (out x in) float weight of a Linear, dequantizing a bitsandbytes one."""
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    if type(weight).__name__ == "Int8Params":
        scb = getattr(weight, "SCB", None)
        if scb is None:  # bnb's Linear8bitLt moves CB/SCB into its matmul state on first forward
            scb = getattr(getattr(layer, "state", None), "SCB", None)
        if scb is None:
            return weight.data.float()
        return weight.data.float() * scb.float()[:, None] / 127
    return weight


def set_quantized_weight(layer: nn.Module, dense: torch.Tensor):
    """Re-quantize a bitsandbytes weight from a dense (out x in) matrix (rounding happens here)."""
    import warnings

    import bitsandbytes as bnb

    warnings.warn("merging into a quantized base weight re-quantizes it and rounds the result; "
                  "merge into a full-precision model instead for an exact merge", stacklevel=3)
    old = layer.weight
    if type(old).__name__ == "Params4bit":
        layer.weight = bnb.nn.Params4bit(dense.to(torch.float32).cpu(), requires_grad=False,
                                         quant_type=old.quant_type, blocksize=old.blocksize,
                                         compress_statistics=old.compress_statistics).to(old.device)
    else:
        layer.weight = bnb.nn.Int8Params(dense.to(torch.float16).cpu(), requires_grad=False).to(old.device)


def lora_layer_type(module: nn.Module) -> type[LoraLayer] | None:
    """The dispatch table: which LoRA wrapper adapts this module (None: not adaptable)."""
    if Conv1D is not None and isinstance(module, Conv1D):
        return LoraConv1D
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return None
