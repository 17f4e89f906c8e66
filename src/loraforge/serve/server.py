"""`loraforge serve`: load the base model, build the engine and the app, run uvicorn.

uvicorn handles SIGTERM / SIGINT with a graceful shutdown: it stops accepting connections and
lets in-flight requests finish (up to --shutdown-timeout seconds); the app's lifespan then
stops the engine, which aborts whatever is still queued.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path

from loraforge import LoraError
from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.api import DEFAULT_MAX_BODY_BYTES, ServeState, create_app
from loraforge.serve.engine import DEFAULT_PREFILL_CHUNK, Engine, check_prefill_chunk
from loraforge.serve.prefix_cache import DEFAULT_PREFIX_CACHE_MB

MERGED = "merged"


def build_state(model_name: str, adapters_dir: str | None, max_batch: int = 16, max_loaded: int = 8,
                max_queue: int = 256, merge: str | None = None, allow_roots: list[str] = (),
                served_name: str | None = None, dtype: str = "auto", device: str = "auto",
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> ServeState:
    """Everything the app serves, from the command line's choices."""
    from loraforge.models import load_model, load_tokenizer, resolve_model_path

    check_prefix_cache_mb(prefix_cache_mb)
    check_prefill_chunk(prefill_chunk, "--prefill-chunk")  # before the model loads
    registry = AdapterRegistry(adapters_dir, allow_roots) if adapters_dir or allow_roots else None
    model = load_model(model_name, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_name)
    if merge is not None:
        model = merge_adapter(model, registry, merge)
        registry = None
    engine = Engine(model, tokenizer, registry, max_batch=max_batch, max_loaded=max_loaded, max_queue=max_queue,
                    prefix_cache_mb=prefix_cache_mb, prefill_chunk=prefill_chunk)
    name = merge or served_name or str(model_name)
    if max_body_bytes < 1:
        raise LoraError(f"--max-body-bytes must be at least 1, got {max_body_bytes}")
    return ServeState(engine, registry, name, resolve_model_path(model_name), merged=merge is not None,
                      max_body_bytes=max_body_bytes)


def check_prefix_cache_mb(mb: float):
    if not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb < 0:
        raise LoraError(f"--prefix-cache-mb must be a finite number of MiB >= 0 (0 disables the cache), got {mb}")


def merge_adapter(model, registry: AdapterRegistry | None, name: str):
    """Fold adapter `name` (from the adapters directory) into the base weights: zero overhead."""
    from loraforge.core.io import load_adapter
    from loraforge.core.ops import merge_and_unload

    if registry is None:
        raise LoraError("--merge needs --adapters DIR holding the adapter")
    load_adapter(model, registry.path_of(name), MERGED)
    return merge_and_unload(model, [MERGED])


def cli_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise LoraError(f"--adapters {args.adapters} is not a directory")
    state = build_state(args.model, args.adapters, args.max_batch, args.max_loaded, args.max_queue, args.merge,
                        args.allow_root or [], args.served_model_name, args.dtype, args.device,
                        args.max_body_bytes,
                        DEFAULT_PREFIX_CACHE_MB if args.prefix_cache_mb is None else args.prefix_cache_mb,
                        DEFAULT_PREFILL_CHUNK if args.prefill_chunk is None else args.prefill_chunk)
    app = create_app(state, api_key=args.api_key)
    logging.basicConfig(level=logging.INFO)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    # uvicorn re-raises SIGTERM / SIGINT once it has shut down gracefully; exit 0 then.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.Server(config).run()
    return 0


def _exit_cleanly(signum, frame):
    """Everything is shut down: exit 0 at once (tearing down torch's modules takes seconds)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
