"""Many adapters in one forward pass: a batched gather-matmul over stacked LoRA factors.

The idea is BGMV from Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving") and
S-LoRA (Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters"): keep every
loaded adapter's factors of one layer stacked in a single tensor, indexed by a *slot*, and let
each row of the batch gather its own slot. Ranks are zero-padded to the largest loaded rank, so
adapters of different ranks share one batched matmul (the padding adds exact zeros). Slot 0 is
all zeros: rows without an adapter get no update.

Per layer, for n slots:  A (n, r_max, in)  and  B (n, out, r_max) = B * scaling, so that
    y[b] = base_out[b] + B[slot[b]] @ (A[slot[b]] @ x[b])
How a forward applies them depends on the batch (`set_rows`):
    base    no row has an adapter: nothing to add
    one     every row has the same adapter: two plain matmuls (no copies)
    groups  a few adapters over many rows: one matmul pair per adapter, on its rows
    gather  many adapters: per-row weights gathered, two batched matmuls (torch.bmm)
    rows    the same for decode steps, with the gathered weights kept while the batch keeps
            the same rows (gathering costs about as much as the matmuls themselves)
The kernel is installed as `LoraLayer.router`: the wrappers compute the base output and the
kernel adds the routed LoRA increment.

LoRA on MoE expert parameters and routers (core.layers.LoraParameter) is an update of the weight
the module uses inside (it routes tokens itself), not an increment to its output: per layer the
kernel keeps each slot's per-expert factors, and runs the module once with W + s B_e A_e for the
rows of each adapter in the batch (`run_parameters`), the base rows with W.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge import LoraError
from loraforge.core.layers import LoraLayer, LoraLinear, LoraParameter, call_with, run_row_groups

# Per-adapter matmuls ("groups") read each adapter once but cost a few small ops per adapter;
# gathering reads one adapter per row in two ops. Groups win for a few adapters over many rows.
GROUP_LIMIT = 8  # at most this many distinct adapters...
ROWS_PER_GROUP = 6  # ...with at least this many rows each, on average

Pair = tuple[torch.Tensor, torch.Tensor]


class MultiLoraKernel:
    """Stacked factors of `capacity` adapter slots (plus the zero slot 0) for every LoRA layer."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise LoraError(f"the adapter cache needs at least one slot, got {capacity}")
        self.capacity = capacity
        self.r_max = 1
        self.ranks = [0] * (capacity + 1)  # rank per slot (0: empty)
        self.stacks: dict[LoraLayer, Pair] = {}  # layer -> (A (n, r_max, in), B (n, out, r_max))
        self.plan: tuple = ("base",)  # how the next forward routes rows (see set_rows)
        self.batch_rows = 0  # rows of the next forward (set_rows)
        self.device = torch.device("cpu")
        self.group_limit, self.rows_per_group = GROUP_LIMIT, ROWS_PER_GROUP
        self.views: dict[int, dict[LoraLayer, Pair]] = {}  # slot -> layer -> (A (r, in), B (out, r))
        self.row_stacks: dict[LoraLayer, Pair] = {}  # layer -> (At (rows, in, r), Bt (rows, r, out))
        self.kept_slots: list[int] | None = None  # the rows that row_stacks were gathered for
        self.slots: list[int] = []  # the slot of each batch row (set_rows)
        # LoraParameter -> slot -> (A (E, r, in), B (E, out, r) * scaling): expert / router factors
        self.expert_slots: dict[LoraParameter, dict[int, Pair]] = {}

    # --- installing on a model ---------------------------------------------------------
    def install(self, layers: list[LoraLayer]):
        """Become the router of `layers`, giving new ones empty (zero) stacks."""
        for layer in layers:
            if isinstance(layer, LoraParameter):
                layer.router = self
                self.expert_slots.setdefault(layer, {})
                continue
            if not isinstance(layer, LoraLinear):
                raise LoraError(f"serving supports LoRA on Linear layers and MoE expert / router parameters only, "
                                f"not {type(layer).__name__}")
            layer.router = self
            self.device = layer.base_layer.weight.device
            if layer not in self.stacks:
                self.stacks[layer] = self._zeros(layer, self.r_max)

    def _zeros(self, layer: LoraLinear, r: int) -> Pair:
        weight = layer.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        n = self.capacity + 1
        A = torch.zeros(n, r, layer.in_features, dtype=dtype, device=weight.device)  # (n, r, in)
        B = torch.zeros(n, layer.out_features, r, dtype=dtype, device=weight.device)  # (n, out, r)
        return A, B

    def _grow_rank(self, r: int):
        """Zero-pad every stack to rank r (existing slots keep their values)."""
        for layer, (A, B) in self.stacks.items():
            new_A, new_B = self._zeros(layer, r)
            new_A[:, : self.r_max] = A
            new_B[:, :, : self.r_max] = B
            self.stacks[layer] = (new_A, new_B)
        self.r_max = r

    # --- slots -------------------------------------------------------------------------
    @torch.no_grad()
    def set_slot(self, slot: int, factors: dict[LoraLayer, tuple[torch.Tensor, torch.Tensor, float]]):
        """Write one adapter into `slot`: {layer: (A (r x in), B (out x r), scaling)}.
        Layers the adapter does not touch get zeros in that slot."""
        if not 1 <= slot <= self.capacity:
            raise LoraError(f"slot {slot} is outside 1..{self.capacity}")
        self.install(list(factors))
        rank = max((A.shape[0] for layer, (A, _, _) in factors.items() if layer in self.stacks), default=0)
        if rank > self.r_max:
            self._grow_rank(rank)
        self.clear_slot(slot)
        for layer, (A, B, scaling) in factors.items():
            if isinstance(layer, LoraParameter):  # PEFT's flat layout -> per-expert factors
                A_e, B_e = layer.split_experts(A, B)
                self.expert_slots[layer][slot] = (A_e.clone(), (B_e.float() * scaling).to(B_e.dtype))
                continue
            stack_A, stack_B = self.stacks[layer]
            r = A.shape[0]
            stack_A[slot, :r] = A.to(stack_A.dtype)
            stack_B[slot, :, :r] = (B.float() * scaling).to(stack_B.dtype)
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_slot(self, slot: int):
        self._invalidate()
        for A, B in self.stacks.values():
            A[slot].zero_()
            B[slot].zero_()
        for per_slot in self.expert_slots.values():
            per_slot.pop(slot, None)
        self.ranks[slot] = 0

    def _invalidate(self):
        """The stacks changed: drop cached slot views and gathered rows."""
        self.views = {}
        self._forget_rows()

    def _forget_rows(self):
        self.row_stacks, self.kept_slots = {}, None

    # --- routing -----------------------------------------------------------------------
    def set_rows(self, slots: list[int], reuse: bool = False):
        """Choose the adapter slot of each batch row for the next forward pass(es).
        reuse=True (decode steps): per-row weights are gathered once and reused by later
        steps for as long as the batch keeps the same rows."""
        self.batch_rows = len(slots)
        self.slots = list(slots)
        used = sorted({s for s in slots if s})
        if not used:
            self.plan = ("base",)
        elif len(used) == 1 and all(s == used[0] for s in slots):
            self.plan = ("one", used[0])
        elif len(used) <= self.group_limit and len(used) * self.rows_per_group <= len(slots):
            self.plan = ("groups", [(s, self._rows_of(slots, s)) for s in used])
        elif reuse:
            if slots != self.kept_slots:
                self._gather_rows(slots, max(self.ranks[s] for s in used))
            self.plan = ("rows",)
        else:
            self.plan = ("gather", torch.tensor(slots, device=self.device), max(self.ranks[s] for s in used))
        if reuse and self.plan[0] != "rows":
            self._forget_rows()

    def reset_rows(self):
        self.plan = ("base",)

    def _rows_of(self, slots: list[int], slot: int) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(slots) if s == slot], device=self.device)

    def _gather_rows(self, slots: list[int], r: int):
        index = torch.tensor(slots, device=self.device)
        self.row_stacks = {layer: gather_rows(A, B, index, r, contiguous=True) for layer, (A, B) in self.stacks.items()}
        self.kept_slots = list(slots)

    def _slot_view(self, layer: LoraLayer, slot: int) -> Pair:
        """(A (r, in), B (out, r)) of one slot at its own rank, contiguous, cached per slot."""
        views = self.views.setdefault(slot, {})
        if layer not in views:
            A, B = self.stacks[layer]
            r = self.ranks[slot]
            views[layer] = (A[slot, :r], B[slot, :, :r].contiguous())
        return views[layer]

    def run_parameters(self, layer: LoraParameter, args: tuple, kwargs: dict):
        """The router of a LoraParameter chain: its module run with each row's adapter weights."""
        chain, core = layer.chain(), layer.core()
        slots = self.slots if self.plan[0] != "base" else []
        used = sorted({s for s in slots if s and any(s in self.expert_slots.get(c, {}) for c in chain)})
        if not used:
            return call_with(core, {}, args, kwargs)
        weights = {s: {c.parameter_name: c.updated_weight([(*self.expert_slots[c][s], 1.0)])
                       for c in chain if s in self.expert_slots.get(c, {})} for s in used}
        if len(used) == 1 and all(s == used[0] for s in slots):
            return call_with(core, weights[used[0]], args, kwargs)
        groups = [(weights[s], self._rows_of(slots, s)) for s in used]
        return run_row_groups(core, len(slots), groups, args, kwargs)

    def __call__(self, layer: LoraLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The router: base_out (B, ..., out) plus each row's LoRA increment."""
        kind = self.plan[0]
        if kind == "base" or layer not in self.stacks:
            return base_out
        if kind == "one":
            return add_lora(base_out, x, *self._slot_view(layer, self.plan[1]))
        if x.dim() == 2 and x.shape[0] != self.batch_rows:  # (rows * tokens, in): OPT / Qwen2-MoE MLPs flatten rows
            rows, out = self.batch_rows, base_out.shape
            return self(layer, x.view(rows, -1, x.shape[-1]), base_out.view(rows, -1, out[-1])).view(out)
        if kind == "rows":
            return add_lora_rows(base_out, x, *self.row_stacks[layer])
        if kind == "groups":
            out = base_out.clone()
            for slot, rows in self.plan[1]:
                out.index_add_(0, rows, lora_delta(x[rows], *self._slot_view(layer, slot)).to(out.dtype))
            return out
        A, B = self.stacks[layer]
        return add_lora_rows(base_out, x, *gather_rows(A, B, self.plan[1], self.plan[2]))


# --- the math ------------------------------------------------------------------------------------
def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B @ (A @ x) for x (..., in), A (r, in), B (out, r): (..., out)."""
    return F.linear(F.linear(x.to(A.dtype), A), B)


def add_lora(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """base_out + B @ (A @ x), accumulated in place into the (fresh) base output."""
    if base_out.dtype != B.dtype:
        return base_out + lora_delta(x, A, B).to(base_out.dtype)
    h = F.linear(x.reshape(-1, x.shape[-1]).to(A.dtype), A)  # (N, r)
    out = base_out.reshape(-1, base_out.shape[-1])  # (N, out), a view when base_out is contiguous
    return out.addmm_(h, B.t()).view(base_out.shape)


def gather_rows(A: torch.Tensor, B: torch.Tensor, index: torch.Tensor, r: int, contiguous: bool = False) -> Pair:
    """Per-row weights (At (rows, in, r), Bt (rows, r, out)) for torch.bmm; `contiguous` lays
    them out for fast reuse (decode steps), at the price of one more copy."""
    At = A[:, :r].index_select(0, index).transpose(1, 2)
    Bt = B[:, :, :r].index_select(0, index).transpose(1, 2)
    return (At.contiguous(), Bt.contiguous()) if contiguous else (At, Bt)


def add_lora_rows(base_out: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """Row b of base_out (rows, ..., out) plus (x[b] @ At[b]) @ Bt[b]: the batched gather matmul."""
    rows = x.shape[0]
    h = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(At.dtype), At)  # (rows, S, r)
    if base_out.dtype != Bt.dtype:
        return base_out + torch.bmm(h, Bt).to(base_out.dtype).view(base_out.shape)
    out = base_out.reshape(rows, -1, base_out.shape[-1])  # (rows, S, out)
    return out.baddbmm_(h, Bt).view(base_out.shape)
