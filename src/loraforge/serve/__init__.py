"""Serving: one base model, many LoRA adapters, an OpenAI-compatible HTTP API.

    engine.py    continuous batching; one background thread owns the model
    kernel.py    the batched multi-adapter LoRA kernel (BGMV) set as LoraLayer.router
    kvcache.py   the running batch's left-padded KV cache
    adapters.py  adapter names -> directories, and the LRU of adapters in memory
    api.py       FastAPI routes (OpenAI + vLLM endpoints), errors, streaming
    protocol.py  request bodies (strictly validated) and response objects
    metrics.py   Prometheus metrics
    server.py    `loraforge serve`: build everything and run uvicorn

See docs/serve.md.
"""
