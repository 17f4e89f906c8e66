"""Data-parallel training over torch.distributed: gloo on CPU, nccl on GPU.

`loraforge train --nproc N` relaunches itself under torchrun; each process takes every N-th row
of each micro-batch, and adapter gradients are summed across processes before the optimizer
step. With the loss normalised by the global answer-token count this is the same update as one
process with the whole batch. Only adapter gradients travel (a few MB), not the base model's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as tdist


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init():
    """Join the process group when started by torchrun (WORLD_SIZE set), once."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend)


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard(rows: list) -> list:
    """This process's share of a micro-batch: every world_size-th row."""
    return rows[rank()::world_size()]


def all_sum(value: float | int):
    """Sum a Python number over processes (float64 on the wire, exact for token counts)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return type(value)(t.item())


def all_reduce_grads(params: list[torch.nn.Parameter]):
    """Sum gradients across processes in one flat buffer (one collective per step)."""
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(_comm_device())
    tdist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
        offset += n


def barrier():
    if is_distributed():
        tdist.barrier()


def _comm_device() -> torch.device:
    return device() if tdist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> bool:
    """Whether this process was started by torchrun (it sets WORLD_SIZE), so it must not relaunch."""
    return "WORLD_SIZE" in os.environ


def launch(nproc: int, config_yaml: str) -> int:
    """Re-run `loraforge train` under torchrun with `nproc` processes on this machine.

    The processes get the resolved settings as a recipe file (not this process's argv, which
    is not the command when `loraforge.cli.main([...])` is called from Python)."""
    with tempfile.TemporaryDirectory(prefix="loraforge-launch-") as tmp:
        recipe = os.path.join(tmp, "train_config.yaml")
        with open(recipe, "w", encoding="utf-8") as f:
            f.write(config_yaml)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "loraforge", "train", "--config", recipe]
        threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": threads})


def fsdp_wrap(model, blocks_attr: str = "layers"):
    """FSDP2 for models that outgrow one GPU: `fully_shard` each decoder block, then the root.
    CUDA only; not run on the CPU test machine (see README)."""
    from torch.distributed.fsdp import fully_shard

    backbone = getattr(model, model.base_model_prefix)
    for block in getattr(backbone, blocks_attr):
        fully_shard(block)
    fully_shard(model)
    return model
