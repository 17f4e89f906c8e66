"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory `checkpoints/step-NNNNNN/` holding the adapter parameters, the
optimizer's tensors, and `state.json` (optimizer groups, scheduler, step, RNG states). It is
written under a temporary name and renamed into place; the file `checkpoints/latest` (written
atomically) names the newest complete one, so a crash mid-write never leaves a broken resume.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraforge import LoraError, one_line
from loraforge.core.io import atomic_save_safetensors, atomic_write_bytes
from loraforge.core.ops import adapter_params

KEEP = 2  # checkpoints kept on disk


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    scalars = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()
               if not isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, data_stream: dict | None = None,
                    data_order: dict | None = None) -> Path:
    """`data_stream`: a streaming run's reader position (data.stream.RowStream.state); `data_order`:
    the settings an in-memory run's row order depends on beyond its seed; both kept in state.json."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng_tensors, rng_json = _rng_state()
    opt_tensors, opt_json = _optimizer_tensors(optimizer)
    params = {f"adapter.{k}": p for k, p in adapter_params(model).items()}
    atomic_save_safetensors({**params, **opt_tensors, **rng_tensors}, tmp / "state.safetensors")
    meta = {"step": step, "optimizer": opt_json, "scheduler": scheduler.state_dict(), **rng_json}
    if data_stream is not None:
        meta["data_stream"] = data_stream
    if data_order is not None:
        meta["data_order"] = data_order
    atomic_write_bytes(tmp / "state.json", json.dumps(meta).encode())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_bytes(root / "latest", final.name.encode())
    _prune(root, final)
    return final


def _prune(root: Path, newest: Path):
    """Keep `newest` and the KEEP - 1 checkpoints before it; later steps belong to an abandoned run."""
    others = sorted(p for p in root.glob("step-*") if p != newest)
    older = [p for p in others if p.name < newest.name]
    later = [p for p in others if p.name > newest.name]
    for old in older[:max(0, len(older) - (KEEP - 1))] + later:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(out: Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore adapter, optimizer, scheduler and RNG state; returns the step to continue from."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
    except (OSError, ValueError, SafetensorError) as err:
        raise LoraError(f"checkpoint {path} is unreadable ({one_line(err)}); delete it to start over") from None
    params = adapter_params(model)
    missing = [k for k in params if f"adapter.{k}" not in tensors]
    if missing:
        raise LoraError(f"checkpoint {path} does not match this run's adapter (missing {missing[0]}); "
                        f"same --rank/--targets as the interrupted run?")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"adapter.{k}"])
    optimizer.load_state_dict(_optimizer_state(meta["optimizer"], tensors))
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return int(meta["step"])


def data_stream_state(path: Path) -> dict | None:
    """The data stream position a streaming run saved in checkpoint `path` (None: an in-memory run's)."""
    return checkpoint_meta(path).get("data_stream")


def data_order_state(path: Path) -> dict | None:
    """The data order settings checkpoint `path` was written with (None: written before they were kept)."""
    return checkpoint_meta(path).get("data_order")


def checkpoint_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise LoraError(f"checkpoint {path} is unreadable ({one_line(err)}); delete it to start over") from None
    if not isinstance(meta, dict):
        raise LoraError(f"checkpoint {path} is unreadable (state.json is not an object); delete it to start over")
    return meta


def _optimizer_state(meta: dict, tensors: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
