"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraforge_requests", "Finished generation requests", ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("loraforge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("loraforge_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("loraforge_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("loraforge_running_requests", "Requests in the running batch", registry=r)
        self.loaded_adapters = Gauge("loraforge_loaded_adapters", "Adapters held in memory", registry=r)
        self.adapter_loads = Counter("loraforge_adapter_loads", "Adapter loads from disk", registry=r)
        self.adapter_evictions = Counter("loraforge_adapter_evictions", "Adapters evicted (LRU)", registry=r)
        self.ttft = Histogram("loraforge_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loraforge_time_per_output_token_seconds", "Time between output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("loraforge_rejected_requests", "Requests refused (full queue)", registry=r)
        self.prefix_hits = Counter("loraforge_prefix_cache_hits", "Prefills that reused cached prompt blocks",
                                   registry=r)
        self.prefix_misses = Counter("loraforge_prefix_cache_misses",
                                     "Prefills that looked up the prefix cache and reused nothing", registry=r)
        self.prefix_hit_tokens = Counter("loraforge_prefix_cache_hit_tokens",
                                         "Prompt tokens read from the prefix cache instead of prefilled", registry=r)
        self.prefix_evictions = Counter("loraforge_prefix_cache_evictions",
                                        "Prefix cache blocks evicted (LRU, over the memory budget)", registry=r)
        self.prefix_bytes = Gauge("loraforge_prefix_cache_bytes", "Bytes of KV held by the prefix cache", registry=r)
        self.prefix_blocks = Gauge("loraforge_prefix_cache_blocks", "Blocks held by the prefix cache", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
