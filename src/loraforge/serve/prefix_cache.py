"""The prefix cache: KV blocks of prompt prefixes, reused by later prompts on the same adapter weights.

A prompt is cut into blocks of `block` tokens. Block i is keyed by a hash chained over the
adapter's identity (its name, its registry version and the stamp of the files its weights were
read from: an adapter reloaded under the same name is another adapter) and every token up to the
end of block i, as vLLM's automatic prefix caching hashes blocks. So a block is shared only by
prompts equal up to its end on the same weights; each block also keeps its own tokens and its
parent's key, and a lookup checks both, so even a hash collision cannot hand out the wrong KV.

Blocks hold the keys and values of every layer for their tokens, copied out of a prefill. They
are evicted least recently used first when the cached bytes exceed the budget; a lookup or an
insert refreshes a chain from its last block to its first, so the deepest blocks of the least
recently used prompt go first and a chain never loses its head while keeping its tail.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loraforge import LoraError
from loraforge.serve.metrics import ServeMetrics

BLOCK = 16  # tokens per cached block
DEFAULT_PREFIX_CACHE_MB = 512.0  # `loraforge serve --prefix-cache-mb` default; 0 disables the cache

AdapterKey = tuple  # what identifies the weights a prompt is prefilled with (see Engine._adapter_key)


@dataclass
class Block:
    """The KV of `block` consecutive prompt tokens: per layer (heads, block, head_dim) keys and values."""

    parent: bytes  # the key of the block before it (the adapter's key for the first block)
    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


def chain_keys(adapter: AdapterKey, tokens: list[int], block: int) -> list[bytes]:
    """The key of each full block of `tokens` (len(tokens) // block of them), hashed in a chain."""
    keys, parent = [], root_key(adapter)
    for start in range(0, len(tokens) - block + 1, block):
        parent = hashlib.blake2b(parent + struct.pack(f"<{block}q", *tokens[start:start + block]),
                                 digest_size=16).digest()
        keys.append(parent)
    return keys


def root_key(adapter: AdapterKey) -> bytes:
    return hashlib.blake2b(repr(adapter).encode(), digest_size=16).digest()


class PrefixCache:
    """Blocks by key in LRU order, within `budget_bytes` (0 disables). Engine thread only."""

    def __init__(self, budget_bytes: int, metrics: ServeMetrics | None = None, block: int = BLOCK):
        if budget_bytes < 0 or block < 1:
            raise LoraError(f"the prefix cache needs a budget >= 0 bytes and blocks >= 1 token, "
                            f"got {budget_bytes} bytes and {block} tokens")
        self.budget, self.block = budget_bytes, block
        self.metrics = metrics or ServeMetrics()
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def lookup(self, adapter: AdapterKey, tokens: list[int], limit: int) -> list[Block]:
        """The longest run of cached blocks that starts `tokens` and covers at most `limit` tokens
        (refreshed in the LRU order)."""
        keys, found = self._find(adapter, tokens, limit)
        self._touch(keys[:len(found)])
        return found

    def cached(self, adapter: AdapterKey, tokens: list[int], limit: int) -> int:
        """How many tokens lookup would find now (the LRU order untouched)."""
        return len(self._find(adapter, tokens, limit)[1]) * self.block

    def _find(self, adapter: AdapterKey, tokens: list[int], limit: int) -> tuple[list[bytes], list[Block]]:
        if not self.enabled:
            return [], []
        found, parent, keys = [], root_key(adapter), chain_keys(adapter, tokens[:limit], self.block)
        for i, key in enumerate(keys):
            block = self.blocks.get(key)
            start = i * self.block
            if block is None or block.parent != parent or block.tokens != tuple(tokens[start:start + self.block]):
                break
            found.append(block)
            parent = key
        return keys, found

    def record(self, reused_tokens: int):
        """Count one prefill that looked up the cache and reused `reused_tokens` prompt tokens."""
        if reused_tokens > 0:
            self.metrics.prefix_hits.inc()
            self.metrics.prefix_hit_tokens.inc(reused_tokens)
        else:
            self.metrics.prefix_misses.inc()

    def insert(self, adapter: AdapterKey, tokens: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]):
        """Cache the full blocks of `tokens` that are not cached yet. `layers`: per layer the
        (heads, m, head_dim) keys and values of the last m tokens of `tokens` (views are copied);
        m may differ between layers (a sliding-window layer may hold only the tail), and only
        blocks that every layer holds can be added."""
        if not self.enabled:
            return
        keys, parent, n = chain_keys(adapter, tokens, self.block), root_key(adapter), len(tokens)
        held_from = max((n - k.shape[1] for k, _ in layers), default=0)  # the first token every layer holds
        for i, key in enumerate(keys):
            if key not in self.blocks:
                start = i * self.block
                if start < held_from:
                    break
                kv = [(k[:, start - n + k.shape[1]:][:, :self.block].clone(),
                       v[:, start - n + v.shape[1]:][:, :self.block].clone()) for k, v in layers]
                nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
                if nbytes > self.budget:
                    break
                self.blocks[key] = Block(parent, tuple(tokens[start:start + self.block]), kv, nbytes)
                self.nbytes += nbytes
            parent = key
        self._touch(keys)
        self._evict()

    def clear(self):
        self.blocks.clear()
        self.nbytes = 0
        self._gauges()

    def _touch(self, keys: list[bytes]):
        for key in reversed(keys):  # the first block ends most recent: tails are evicted first
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def _evict(self):
        while self.nbytes > self.budget and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.nbytes -= block.nbytes
            self.metrics.prefix_evictions.inc()
        self._gauges()

    def _gauges(self):
        self.metrics.prefix_bytes.set(self.nbytes)
        self.metrics.prefix_blocks.set(len(self.blocks))


def past_kv(blocks: list[Block], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the (heads, length, head_dim) keys and values of the first `length` cached tokens."""
    layers = zip(*(block.kv for block in blocks))
    return [(torch.cat([k for k, _ in kv], dim=1)[:, :length], torch.cat([v for _, v in kv], dim=1)[:, :length])
            for kv in layers]
