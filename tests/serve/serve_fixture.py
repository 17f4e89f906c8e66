"""Fixtures for the serve tests: a tiny random Llama + the tiny ChatML tokenizer saved as a model
directory, adapters of different ranks (two saved by loraforge, one by PEFT), a corrupt one, and
a uvicorn server running in a thread on a free 127.0.0.1 port.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch
from factory import tiny_llama, tiny_tokenizer
from transformers import LlamaForCausalLM

from loraforge.core.config import LoraConfig
from loraforge.core.io import save_adapter
from loraforge.core.ops import attach

CONTEXT = 512
# name -> (rank, targets, writer): adapters of different ranks and module sets
ADAPTERS = {
    "alpha": (2, "all-linear", "loraforge"),
    "beta": (4, ["q_proj", "v_proj"], "loraforge"),
    "gamma": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "peft"),
}


def build_base(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    return tiny_llama(seed, hidden, context=CONTEXT, text=True)


def randomize_b(model: torch.nn.Module, seed: int, std: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def save_loraforge_adapter(path: Path, rank: int, targets, seed: int, hidden: int = 64) -> Path:
    model = build_base(hidden=hidden)
    attach(model, LoraConfig(r=rank, alpha=2.0 * rank, target_modules=targets), "default")
    randomize_b(model, seed)
    return save_adapter(model, path, "default")


def save_peft_adapter(path: Path, rank: int, targets, seed: int) -> Path:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    model = get_peft_model(build_base(), PeftConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    randomize_b(model, seed)
    model.save_pretrained(str(path))
    return path


def make_setup(root: Path) -> dict[str, Path]:
    """root/base (model + tokenizer), root/adapters/{alpha,beta,gamma,broken,otherbase},
    root/extra/delta (a runtime adapter under an allowed root), root/outside/evil (not allowed)."""
    base = root / "base"
    build_base().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    adapters = root / "adapters"
    for seed, (name, (rank, targets, writer)) in enumerate(ADAPTERS.items(), start=1):
        saver = save_peft_adapter if writer == "peft" else save_loraforge_adapter
        saver(adapters / name, rank, targets, seed)
    broken = save_loraforge_adapter(adapters / "broken", 2, ["q_proj"], 9)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    save_loraforge_adapter(adapters / "otherbase", 2, ["q_proj"], 9, hidden=32)  # trained on another base
    save_loraforge_adapter(root / "extra" / "delta", 6, ["q_proj", "up_proj"], 7)
    save_loraforge_adapter(root / "outside" / "evil", 2, ["q_proj"], 8)
    return {"base": base, "adapters": adapters, "extra": root / "extra", "outside": root / "outside"}


@functools.lru_cache(maxsize=None)
def shared_setup() -> dict[str, Path]:
    """make_setup() once per test session (both serve test modules use it), removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="loraforge-serve-"))
    atexit.register(shutil.rmtree, root, True)
    return make_setup(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


def record_event(result: dict, event):
    """An engine sink for tests: delta texts appended to result["text"], the final event kept in result["done"]."""
    if event.kind == "delta":
        result["text"] += event.text
    else:
        result["done"] = event
