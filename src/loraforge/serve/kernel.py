"""Many adapters in one forward pass: a batched gather-matmul over stacked LoRA factors.

The idea is BGMV from Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving") and
S-LoRA (Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters"): keep every
loaded adapter's factors of one layer stacked in a single tensor, indexed by a *slot*, and let
each row of the batch gather its own slot. Ranks are zero-padded to the largest loaded rank, so
adapters of different ranks share one batched matmul (the padding adds exact zeros). Slot 0 is
all zeros: rows without an adapter get no update.

Per layer, for n slots:  At (n, in, r_max) = A^T  and  Bt (n, r_max, out) = (B * scaling)^T, so
    y[b] = base_out[b] + (x[b] @ At[slot[b]]) @ Bt[slot[b]]
The kernel is installed as `LoraLayer.router`, so the wrappers keep computing the base output
and the kernel adds the routed LoRA increment.
"""
from __future__ import annotations

import torch

from loraforge import LoraError
from loraforge.layers import LoraLayer, LoraLinear

# With at most this many distinct adapters in a batch, rows are grouped per adapter (one plain
# matmul pair each, no weight copy); above it, weights are gathered per row for two bmm calls
# (for decode steps, gathered once and reused while the batch keeps the same rows).
GROUP_LIMIT = 4


class MultiLoraKernel:
    """Stacked factors of `capacity` adapter slots (plus the zero slot 0) for every LoRA layer."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise LoraError(f"the adapter cache needs at least one slot, got {capacity}")
        self.capacity = capacity
        self.r_max = 1
        self.ranks = [0] * (capacity + 1)  # rank per slot (0: empty)
        self.stacks: dict[LoraLayer, tuple[torch.Tensor, torch.Tensor]] = {}
        self.plan: tuple = ("base",)  # how the next forward routes rows (see set_rows)
        self.device = torch.device("cpu")
        self.group_limit = GROUP_LIMIT
        self.row_stacks: dict[LoraLayer, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept_slots: list[int] | None = None  # the rows row_stacks were gathered for
        self.views: dict[int, dict[LoraLayer, tuple[torch.Tensor, torch.Tensor]]] = {}

    # --- installing on a model ---------------------------------------------------------
    def install(self, layers: list[LoraLayer]):
        """Become the router of `layers`, giving new ones empty (zero) stacks."""
        for layer in layers:
            if not isinstance(layer, LoraLinear):
                raise LoraError(f"serving supports LoRA on Linear layers only, not {type(layer).__name__}")
            layer.router = self
            self.device = layer.base_layer.weight.device
            if layer not in self.stacks:
                self.stacks[layer] = self._zeros(layer, self.r_max)

    def _zeros(self, layer: LoraLinear, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = layer.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        n = self.capacity + 1
        At = torch.zeros(n, layer.in_features, r, dtype=dtype, device=weight.device)  # (n, in, r)
        Bt = torch.zeros(n, r, layer.out_features, dtype=dtype, device=weight.device)  # (n, r, out)
        return At, Bt

    def _grow_rank(self, r: int):
        """Zero-pad every stack to rank r (existing slots keep their values)."""
        for layer, (At, Bt) in self.stacks.items():
            new_At, new_Bt = self._zeros(layer, r)
            new_At[:, :, : self.r_max] = At
            new_Bt[:, : self.r_max, :] = Bt
            self.stacks[layer] = (new_At, new_Bt)
        self.r_max = r

    # --- slots -------------------------------------------------------------------------
    @torch.no_grad()
    def set_slot(self, slot: int, factors: dict[LoraLayer, tuple[torch.Tensor, torch.Tensor, float]]):
        """Write one adapter into `slot`: {layer: (A (r x in), B (out x r), scaling)}.
        Layers the adapter does not touch get zeros in that slot."""
        if not 1 <= slot <= self.capacity:
            raise LoraError(f"slot {slot} is outside 1..{self.capacity}")
        self._forget_rows()
        self.install(list(factors))
        rank = max((A.shape[0] for A, _, _ in factors.values()), default=0)
        if rank > self.r_max:
            self._grow_rank(rank)
        self.clear_slot(slot)
        for layer, (A, B, scaling) in factors.items():
            At, Bt = self.stacks[layer]
            r = A.shape[0]
            At[slot, :, :r] = A.T.to(At.dtype)
            Bt[slot, :r, :] = (B.float() * scaling).T.to(Bt.dtype)
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_slot(self, slot: int):
        self._forget_rows()
        for At, Bt in self.stacks.values():
            At[slot].zero_()
            Bt[slot].zero_()
        self.ranks[slot] = 0

    # --- routing -----------------------------------------------------------------------
    def set_rows(self, slots: list[int], reuse: bool = False):
        """Choose the adapter slot of each batch row for the next forward pass(es).
        reuse=True (decode steps): the rows' weights are gathered once into row-ordered stacks
        that later steps reuse for as long as the batch keeps the same rows."""
        used = sorted({s for s in slots if s})
        if not used:
            self.plan = ("base",)
        elif len(used) == 1 and all(s == used[0] for s in slots):
            self.plan = ("one", used[0])
        elif len(used) <= self.group_limit:
            self.plan = ("groups", [(s, self._rows_of(slots, s)) for s in used])
        elif reuse:
            if slots != self.kept_slots:
                self._gather_rows(slots, max(self.ranks[s] for s in used))
            self.plan = ("rows",)
        else:
            self.plan = ("gather", torch.tensor(slots, device=self.device), max(self.ranks[s] for s in used))
        if self.plan[0] != "rows" and reuse:
            self._forget_rows()

    def _rows_of(self, slots: list[int], slot: int) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(slots) if s == slot], device=self.device)

    def _gather_rows(self, slots: list[int], r: int):
        index = torch.tensor(slots, device=self.device)
        self.row_stacks = {layer: (At[:, :, :r].index_select(0, index), Bt[:, :r].index_select(0, index))
                           for layer, (At, Bt) in self.stacks.items()}  # (B, in, r), (B, r, out)
        self.kept_slots = list(slots)

    def _forget_rows(self):
        """Drop gathered rows and cached slot views (after any change to the stacks)."""
        self.row_stacks, self.kept_slots, self.views = {}, None, {}

    def __call__(self, layer: LoraLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The router: base_out (B, ..., out) plus each row's LoRA increment."""
        kind = self.plan[0]
        if kind == "base" or layer not in self.stacks:
            return base_out
        if kind == "one":  # every row uses the same adapter: two plain matmuls, no copies
            return _add_lora(base_out, x, *self._slot_view(layer, self.plan[1]))
        if kind == "rows":
            return _add_lora_rows(base_out, x, *self.row_stacks[layer])
        if kind == "groups":
            out = base_out.clone()
            for slot, rows in self.plan[1]:  # one matmul pair per adapter, on its rows only
                A, B = self._slot_view(layer, slot)
                xs = x[rows]
                delta = (xs.reshape(-1, xs.shape[-1]).to(A.dtype) @ A) @ B  # (rows*S, out)
                out.index_add_(0, rows, delta.view(*xs.shape[:-1], -1).to(out.dtype))
            return out
        At, Bt = self.stacks[layer]
        index, r = self.plan[1], self.plan[2]
        return _add_lora_rows(base_out, x, At[:, :, :r].index_select(0, index), Bt[:, :r].index_select(0, index))

    def _slot_view(self, layer: LoraLayer, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T (in, r), (B s)^T (r, out)) of one slot at its own rank, cached per slot."""
        views = self.views.setdefault(slot, {})
        if layer not in views:
            At, Bt = self.stacks[layer]
            r = self.ranks[slot]
            views[layer] = (At[slot, :, :r], Bt[slot, :r])
        return views[layer]

    def reset_rows(self):
        self.plan = ("base",)


def _add_lora(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """base_out + (x @ A) @ B with x (..., in), A (in, r), B (r, out)."""
    h = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A  # (N, r)
    if base_out.dtype != B.dtype:
        return base_out + (h @ B).to(base_out.dtype).view(base_out.shape)
    return torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h, B).view(base_out.shape)


def _add_lora_rows(base_out: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """Row b of base_out (B, ..., out) plus (x[b] @ At[b]) @ Bt[b]: the batched gather matmul,
    with At (B, in, r) and Bt (B, r, out) already gathered per row."""
    rows = x.shape[0]
    h = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(At.dtype), At)  # (B, S, r)
    if base_out.dtype != Bt.dtype:
        return base_out + torch.bmm(h, Bt).to(base_out.dtype).view(base_out.shape)
    return torch.baddbmm(base_out.reshape(rows, -1, base_out.shape[-1]), h, Bt).view(base_out.shape)
