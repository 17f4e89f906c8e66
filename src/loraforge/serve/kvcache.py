"""The KV cache of the running batch, for continuous batching on a transformers DynamicCache.

Rows are left-padded so that every sequence's latest token sits in the last column: a decode
step appends one column for all rows at once. `mask` (B, T) marks real tokens (1) and padding
(0); the model's attention mask hides the padding and `positions` feeds rotary embeddings the
true position of each row, so a row computes what it would compute alone. Rows join (`extend`,
the narrower side is padded on the left) and leave (`keep`, then the leading columns that are
padding in every row are cut) only between steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from loraforge import LoraError


def new_cache(config) -> DynamicCache:
    """An empty DynamicCache for `config`; refuses sliding-window / hybrid layouts."""
    cache = DynamicCache(config=config)
    if any(getattr(cache, "is_sliding", [])) or any(getattr(cache, "is_linear", [])):
        raise LoraError("serve supports full-attention decoder models only (no sliding-window or hybrid caches)")
    return cache


class BatchCache:
    """Left-padded KV tensors of the running rows, their padding mask and true lengths."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # (B, T) long, 1 = real token

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def positions(self) -> torch.Tensor:
        """(B, 1): the position of each row's next token (its number of real tokens)."""
        return self.mask.sum(dim=1, keepdim=True)

    def step_mask(self) -> torch.Tensor:
        """(B, T + 1): the attention mask of a decode step (the new token is real)."""
        return torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)

    def after_step(self, mask: torch.Tensor):
        """Record that the forward appended one column (the cache grew in place)."""
        self.mask = mask

    def extend(self, other: "BatchCache"):
        """Append other's rows below ours, padding the narrower one on the left."""
        if self.rows == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], dim=0)
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)], dim=0)

    def keep(self, rows: list[int]):
        """Keep only `rows` (in that order), then drop columns that are padding everywhere."""
        if len(rows) == self.rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(rows) and used.numel() else self.width
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(0, index)[:, :, start:]
                layer.values = layer.values.index_select(0, index)[:, :, start:]


def empty_batch(config, device: torch.device) -> BatchCache:
    return BatchCache(new_cache(config), torch.zeros(0, 0, dtype=torch.long, device=device))


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D) with zeros on the left of the sequence axis."""
    return t if t.shape[-2] == width else F.pad(t, (0, 0, width - t.shape[-2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return mask if mask.shape[1] == width else F.pad(mask, (width - mask.shape[1], 0))
