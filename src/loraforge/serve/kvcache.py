"""The KV cache of the running batch, for continuous batching on a transformers DynamicCache.

Rows are left-padded so that every sequence's latest token sits in the last column: a decode
step appends one column for all rows at once. `mask` (B, T) marks real tokens (1) and padding
(0); the model's attention mask hides the padding and `positions` feeds rotary embeddings the
true position of each row, so a row computes what it would compute alone. Rows join (`extend`,
the narrower side is padded on the left) and leave (`keep`, then the leading columns that are
padding in every row are cut) only between steps.

Sliding-window layers (Mistral, the local layers of Gemma2/3) are transformers' own
DynamicSlidingWindowLayer: they hold only the last window - 1 columns, which are all any later
token can attend to, since every row's next token is in the next column; `cumulative_length`
is the batch width T, shared by all rows, and the model's sliding masks, built from cache
indices with that offset, give each layer exactly its window. So their memory is bounded by the
window. A prefill keeps every column (`record_past`) until `end_prefill`, so that the prompt's
KV can be offered to the prefix cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from loraforge import LoraError

SERVED_LAYERS = ("full_attention", "sliding_attention")


def new_cache(config) -> DynamicCache:
    """An empty DynamicCache for `config`, its sliding-window layers bounded by their window.
    Other layouts (chunked, linear / recurrent, shared KV) are refused."""
    kinds = layer_types(config)
    unsupported = sorted(set(kinds) - set(SERVED_LAYERS))
    if unsupported:
        raise LoraError(f"serve supports full and sliding-window attention layers only; this model has "
                        f"{', '.join(unsupported)} layers")
    return DynamicCache(config=config)


def layer_types(config) -> list[str]:
    """The attention kind of each decoder layer, as transformers' caches read it from the config."""
    return list(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])


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
            held = _held(mine, width)
            mine.keys = torch.cat([_pad_left(mine.keys, held), _pad_left(theirs.keys, held)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, held), _pad_left(theirs.values, held)], dim=0)
            _set_width(mine, width)
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
                cut = max(0, layer.keys.shape[-2] - self.width)  # a sliding layer may hold fewer columns
                layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
                layer.values = layer.values.index_select(0, index)[:, :, cut:]
            _set_width(layer, self.width)


def start_prefill(cache: DynamicCache) -> DynamicCache:
    """Let the sliding layers keep every column of the coming prefill (see end_prefill)."""
    for layer in cache.layers:
        if layer.is_sliding:
            layer.record_past = True
    return cache


def end_prefill(cache: DynamicCache):
    """Bound the sliding layers by their window again: keep their last window - 1 columns."""
    for layer in cache.layers:
        if layer.is_sliding:
            if layer.keys is not None:
                _keep_last(layer, layer.sliding_window - 1)
            layer.record_past = False


def stacked_past(cache: DynamicCache, rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None],
                 width: int) -> DynamicCache:
    """Fill the empty `cache` with the rows' past KV, left padded to `width` columns: rows[i] is
    per layer the (heads, length, head_dim) keys and values of row i, or None (no past). Sliding
    layers keep their window's share (their offset still counts all `width` columns)."""
    template = next(row for row in rows if row is not None)
    for layer, (k0, v0) in enumerate(template):
        keys = [_pad_left((row[layer][0] if row else k0[:, :0])[None], width) for row in rows]
        values = [_pad_left((row[layer][1] if row else v0[:, :0])[None], width) for row in rows]
        cache.update(torch.cat(keys, dim=0), torch.cat(values, dim=0), layer)
        _keep_last(cache.layers[layer], _held(cache.layers[layer], width))
    return cache


def _held(layer, width: int) -> int:
    """How many of a batch's last `width` columns `layer` holds between forward passes."""
    return min(width, layer.sliding_window - 1) if layer.is_sliding else width


def _keep_last(layer, columns: int):
    start = max(0, layer.keys.shape[-2] - columns)
    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _set_width(layer, width: int):
    if layer.is_sliding:
        layer.cumulative_length = width  # the offset of the sliding masks: the batch width


def empty_batch(config, device: torch.device) -> BatchCache:
    return BatchCache(new_cache(config), torch.zeros(0, 0, dtype=torch.long, device=device))


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D) with zeros on the left of the sequence axis."""
    return t if t.shape[-2] == width else F.pad(t, (0, 0, width - t.shape[-2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return mask if mask.shape[1] == width else F.pad(mask, (width - mask.shape[1], 0))
