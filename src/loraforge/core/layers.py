"""The math: LoRA over Linear, Embedding and transformers' Conv1D, and over parameters no Linear
owns (fused MoE experts, routers: LoraParameter); delta weights; merge; DoRA.

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
from torch.nn.modules import module as _nn_module

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
        return self._add_routes(x, result)

    def _add_routes(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The base output plus the increment of each adapter this forward applies."""
        base, routes = result, self.routes()
        for name, rows in routes:  # each increment is computed against the base output
            if rows is None:
                result = self.add_lora(name, x, result, base, in_place=len(routes) == 1)
            else:
                result = result.index_add(0, rows, self.lora_output(name, x[rows], base[rows]))
        return result

    def lora_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                 in_place: bool = False) -> torch.Tensor:
        """result + this adapter's increment (layer types may fuse the addition; `in_place`: the
        result is this layer's own fresh output, which nothing else reads)."""
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


def _no_op(dropout: nn.Module) -> bool:
    """Whether a LoRA dropout module passes its input through unchanged."""
    return isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (not dropout.training or dropout.p == 0))


_global_hooks = getattr(_nn_module, "_has_any_global_hook", lambda: True)  # unknown torch: assume hooks


def _call_base(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """layer(x, *args, **kwargs); a bare nn.Linear (no subclass, no hooks, no patched forward) is
    computed as the F.linear its module call would run, without the call's dispatch."""
    if (type(layer) is nn.Linear and not args and not kwargs and "forward" not in layer.__dict__
            and not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                     or layer._backward_pre_hooks or _global_hooks())):
        return F.linear(x, layer._parameters["weight"], layer._parameters["bias"])
    return layer(x, *args, **kwargs)


def split_experts(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's flat factors of a 3-D parameter, A (r*E, in) and B (out, r*E), as per-expert
    A (E, r, in) and B (E, out, r) (PEFT's ParamWrapper layout: expert-major A, rank-major B)."""
    return A.reshape(experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)


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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (self.router is None and self.row_adapters is None and not self.disabled and not self.merged_adapters
                and len(self.active_adapters) == 1 and not torch.is_grad_enabled()):
            out = self._inference_forward(x, args, kwargs)
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)

    def _inference_forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """One plain adapter, no gradients: `add_lora`'s in-place path (the same two ops, the same
        floats) with its checks read straight from the module dicts, and a bare nn.Linear base
        called as F.linear; at batch 1 a LoRA layer's Python bookkeeping costs as much as its two
        matmuls. None: take the general path."""
        name, modules = self.active_adapters[0], self._modules
        A_module = modules["lora_A"]._modules.get(name)
        if (A_module is None or name in modules["lora_magnitude_vector"]
                or not _no_op(modules["lora_dropout"]._modules[name])):
            return None
        result = _call_base(modules["base_layer"], x, args, kwargs)
        A, B = A_module._parameters["weight"], modules["lora_B"]._modules[name]._parameters["weight"]
        if not (x.dtype == A.dtype == B.dtype == result.dtype and result.is_contiguous()):
            return self._add_routes(x, result)
        a = F.linear(x, A)  # (..., r)
        if a.dtype != result.dtype:  # autocast chose another dtype
            return self._add_routes(x, result)
        result.view(-1, result.shape[-1]).addmm_(a.view(-1, a.shape[-1]), B.t(), alpha=self.scaling[name])
        return result

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

    def factor_placement(self) -> tuple[torch.device, torch.dtype]:
        """Where this layer's factors live: the base weight's device, its dtype when it is a
        float (float32 over a quantized base)."""
        weight = self.base_layer.weight
        return weight.device, weight.dtype if weight.dtype.is_floating_point else torch.float32

    def _match_device(self, name: str):
        device, dtype = self.factor_placement()
        for module in (self.lora_A[name], self.lora_B[name]):
            module.to(device=device, dtype=dtype)
        if name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].data = self.lora_magnitude_vector[name].data.to(device, dtype)

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

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                 in_place: bool = False) -> torch.Tensor:
        """Plain LoRA fused into one GEMM epilogue: result + s * (A h) B^T via addmm, so the
        scaling and the addition cost no extra pass over the (tokens x out) output. Without
        gradients the addmm writes into the base output itself (no new tensor; the same floats)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if not self.variant(name).fusable or (not autocast and result.dtype != A.dtype):
            return result + self.lora_output(name, x, base)
        h = self.lora_dropout[name](x if autocast else x.to(A.dtype))
        inference = not torch.is_grad_enabled()
        a = F.linear(h, A)  # (..., r)
        flat = result.reshape(-1, result.shape[-1])  # (tokens, out)
        if inference and in_place and flat.data_ptr() == result.data_ptr() and a.dtype == B.dtype == flat.dtype:
            flat.addmm_(a.reshape(-1, a.shape[-1]), B.t(), alpha=self.scaling[name])
            return result
        out = torch.addmm(flat, a.reshape(-1, a.shape[-1]), B.t(), alpha=self.scaling[name])
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


# --- parameters no Linear owns: fused MoE experts and routers (PEFT's target_parameters) ----------
def dense_param(core: nn.Module, name: str) -> torch.Tensor:
    """Parameter `name` of `core` as a float tensor (a 4-bit one, see core.quant.QuantizedParams,
    dequantized)."""
    reader = getattr(core, "dense_parameter", None)
    return reader(name) if callable(reader) else getattr(core, name)


def call_with(core: nn.Module, overrides: dict[str, torch.Tensor], args: tuple, kwargs: dict):
    """`core(*args, **kwargs)` computed with parameters `overrides` in place of its own."""
    runner = getattr(core, "run_with", None)
    if callable(runner):
        return runner(overrides, args, kwargs)
    if not overrides:
        return core(*args, **kwargs)
    return torch.func.functional_call(core, overrides, args, kwargs)


class LoraParameter(LoraLayer):
    """LoRA on one parameter of a module that is not a Linear (PEFT's `target_parameters`, its
    `ParamWrapper`): transformers 5 stores MoE experts fused into 3-D parameters (experts, out,
    in) (`experts.gate_up_proj`, `experts.down_proj`) and routes with a `gate` module whose 2-D
    `weight` (experts, hidden) is applied by its own forward.

    Expert e gets its own update of its slice, dW[e] = B_e @ A_e * scaling (LoRA eq. 3 per
    expert). Stored in PEFT's layout: lora_A (r*E, in) holds A_e in rows e*r .. e*r+r-1, lora_B
    (out, r*E) holds B_e in columns j*E + e (j < r); a 2-D parameter is E = 1, a plain Linear's
    update. The forward runs the wrapped module with W + dW in place of W (weight-level, as PEFT's
    ParamWrapper: exact whatever the experts' implementation, and the only way into a module that
    routes tokens itself); W + dW is built by one baddbmm per adapter. Two targeted parameters of
    one module nest, the first-defined innermost, so the module paths are PEFT's keys
    (`experts.base_layer.lora_A` = gate_up_proj, `experts.lora_A` = down_proj); the outermost
    wrapper runs the whole chain. Dropout, DoRA and PiSSA are refused here, as PEFT refuses them."""

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # always empty: no DoRA here
        self.row_count: int | None = None  # rows of a mixed batch (the wrapped module sees tokens)
        shape = tuple(self.weight.shape)
        if len(shape) not in (2, 3):
            raise LoraError(f"LoRA on parameter {parameter_name!r} needs a 2-D or 3-D parameter, got shape {shape}")
        self.transposed = len(shape) == 3 and bool(getattr(self.core(), "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.weight_dim = len(shape)  # kept: reading self.weight dequantizes a 4-bit expert stack
        out_f, in_f = shape[-2:] if not self.transposed else shape[:0:-1]
        self.in_features, self.out_features = in_f, out_f

    # --- the chain of nested wrappers and the module at its bottom --------------------------------
    def chain(self) -> list["LoraParameter"]:
        layers, module = [], self
        while isinstance(module, LoraParameter):
            layers.append(module)
            module = module.base_layer
        return layers

    def core(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    @property
    def weight(self) -> torch.Tensor:
        return dense_param(self.core(), self.parameter_name)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    # --- adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "default",
                    use_rslora: bool = False, use_dora: bool = False):
        where = f"parameter {self.parameter_name!r}"
        if dropout > 0:
            raise LoraError(f"LoRA dropout is not supported on {where} (its input is inside the module; PEFT "
                            "refuses it too): use dropout 0")
        if use_dora or init == "pissa":
            raise LoraError(f"{'DoRA' if use_dora else 'PiSSA init'} is not supported on {where} (PEFT refuses it too)")
        self.set_scaling(name, r, alpha, use_rslora)
        weight = self.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        rows = r * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rows, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rows, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout[name] = nn.Identity()
        A = self.lora_A[name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:  # as LoraLinear (and PEFT): A kaiming-uniform over the whole (r*E, in) matrix, B zero
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in PEFT's flat layout: A (r*E, in), B (out, r*E)."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def expert_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E, r, in), B (E, out, r)): each expert's own factors."""
        return self.split_experts(*self.factors(name))

    def split_experts(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_experts(A, B, self.num_experts)

    def delta_weight(self, name: str) -> torch.Tensor:
        """dW in the parameter's own shape, float32: (E, out, in) per expert, or (out, in)."""
        A, B = self.expert_factors(name)
        delta = torch.bmm(B.float(), A.float()) * self.scaling[name]  # (E, out, in)
        return self.to_base_layout(delta)

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 1 and self.weight_dim == 2:
            return matrix.reshape(self.out_features, self.in_features)
        return matrix.transpose(-2, -1) if self.transposed else matrix

    def _add_to_weight(self, delta: torch.Tensor):
        core = self.core()
        if callable(getattr(core, "set_dense", None)):  # 4-bit experts: re-quantized (rounds)
            core.set_dense(self.parameter_name, self.weight.float() + delta)
            return
        param = getattr(core, self.parameter_name)
        with torch.no_grad():
            param.add_(delta.to(param.dtype))

    def effective_weight(self, names: list[str]) -> torch.Tensor:
        """W + sum of the adapters' dW, differentiable in the factors (one baddbmm per adapter)."""
        return self.updated_weight([(*self.expert_factors(name), self.scaling[name]) for name in names])

    def updated_weight(self, updates: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
        """W + sum of s * B_e @ A_e over `updates` [(A (E, r, in), B (E, out, r), s)]."""
        weight = self.weight
        stacked = weight if weight.dim() == 3 else weight[None]  # (E, out, in) or (E, in, out)
        for A, B, scaling in updates:
            A, B = A.to(weight.dtype), B.to(weight.dtype)
            left, right = (A.transpose(-2, -1), B.transpose(-2, -1)) if self.transposed else (B, A)
            stacked = torch.baddbmm(stacked, left, right, alpha=scaling)
        return stacked if weight.dim() == 3 else stacked[0]

    # --- forward -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.router is not None:  # a serving kernel: each row's tokens get their adapter's weights
            return self.router.run_parameters(self, args, kwargs)
        chain = self.chain()
        for layer in chain:
            if layer.disabled and layer.merged:
                layer.unmerge()
        if any(layer.row_adapters is not None for layer in chain) and not self.disabled:
            return self._mixed_forward(chain, args, kwargs)
        overrides = {}
        for layer in chain:
            names = [name for name, _ in layer.routes()]
            if names:
                overrides[layer.parameter_name] = layer.effective_weight(names)
        return call_with(self.core(), overrides, args, kwargs)

    def _mixed_forward(self, chain: list["LoraParameter"], args: tuple, kwargs: dict):
        """Mixed batch: the module sees (rows * seq) tokens; each row's tokens are recomputed with
        its adapter's weights and copied over the base result (the modules here act per token)."""
        groups = {}
        for layer in chain:
            for name, rows in layer.routes():
                groups.setdefault(name, rows)
        weights = {name: {layer.parameter_name: layer.effective_weight([name]) for layer in chain if name in layer.r}
                   for name in groups}
        return run_row_groups(self.core(), self.row_count or 1, [(weights[n], rows) for n, rows in groups.items()],
                              args, kwargs)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, experts={self.num_experts}, {super().extra_repr()}"


def run_row_groups(core: nn.Module, rows: int, groups: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
                   args: tuple, kwargs: dict):
    """`core` on a batch of `rows` rows that it sees flattened to (rows * seq) tokens (MoE experts
    and routers act per token): the base result, then for each (weights, row index) group the
    tokens of those rows recomputed with `weights` in place and copied over it."""
    tokens = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
    per_row = tokens // rows
    out = call_with(core, {}, args, kwargs)
    for weights, row_index in groups:
        index = (row_index[:, None] * per_row + torch.arange(per_row, device=row_index.device)).reshape(-1)
        out = _put(out, index, call_with(core, weights, _take(args, index, tokens), _take(kwargs, index, tokens)))
    return out


def _take(values, index: torch.Tensor, tokens: int):
    """The rows `index` of every tensor in `values` (a tuple or dict) that has `tokens` rows."""
    def pick(v):
        return v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == tokens else v

    return {k: pick(v) for k, v in values.items()} if isinstance(values, dict) else tuple(pick(v) for v in values)


def _put(out, index: torch.Tensor, sub):
    """`out` with rows `index` replaced by `sub` (a tensor, or a tuple of them)."""
    if isinstance(out, torch.Tensor):
        return out.index_copy(0, index, sub.to(out.dtype))
    return type(out)(_put(o, index, s) for o, s in zip(out, sub))


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
    """The dispatch table: which LoRA wrapper adapts this module (None: not adaptable). Parameter
    targets (LoraParameter) are chosen by parameter, not module (ops.find_parameter_targets)."""
    if Conv1D is not None and isinstance(module, Conv1D):
        return LoraConv1D
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return None
