"""`loraforge resize`: a smaller adapter holding the best rank-R approximation of each dW.

By Eckart–Young (1936) the truncated SVD dW_k = U_k S_k V_kᵀ is the closest rank-k matrix in
Frobenius norm, with squared error sum of the dropped σ²; so the "energy kept" is exactly
1 - (||dW - dW_k|| / ||dW||)². When k reaches the true rank the result is exact. The SVD comes
from the factors (`lowrank.factored_svd`), never from a dense out x in matrix.

Each module keeps its alpha (and the config its alpha_pattern and rsLoRA setting); the new factors
absorb the new scaling alpha / k, so scaling·B'·A' = dW_k. Per-module ranks go to rank_pattern.
DoRA adapters keep their magnitude vectors unchanged: exact at full rank, and below it the
direction W + dW_k differs slightly from W + dW, so the normalized rows change slightly.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from loraforge import LoraError, format_bytes
from loraforge.core.io import check_apart, write_adapter_dir
from loraforge.tools.factors import factor_tensors, load, scaling_at, with_ranks
from loraforge.core.lowrank import energy_kept, energy_rank, factored_svd, split_factors

DORA_NOTE = ("DoRA: magnitude vectors kept as they were; below full rank the direction W + dW' differs "
             "slightly from W + dW, so outputs change slightly more than the energy figure says")


def choose_rank(S: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The new rank: the smallest holding `energy` of sum(σ²), capped at `rank`; at least 1,
    at most the number of singular values (the adapter's own rank, or the matrix size)."""
    k = S.numel()
    if energy is not None:
        k = max(1, energy_rank(S, energy))
    if rank is not None:
        k = min(k, rank)
    return k


def check_request(rank: int | None, energy: float | None):
    if rank is None and energy is None:
        raise LoraError("resize needs --rank R or --energy F (both: the energy-chosen rank, capped at R)")
    if rank is not None and rank < 1:
        raise LoraError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise LoraError(f"--energy is a fraction in (0, 1] such as 0.99, got {energy}")


def resize_adapter(path: str | Path, out: str | Path, rank: int | None = None,
                   energy: float | None = None) -> dict:
    """Write the resized adapter to `out`; return per-module ranks, energy kept and file sizes."""
    check_request(rank, energy)
    adapter = load(path)
    check_apart(out, [adapter.path])
    tensors, ranks, rows = dict(adapter.other), {}, []
    with torch.no_grad():
        for name, update in adapter.updates.items():
            U, S, Vh = factored_svd(update.A, update.B, update.scaling)
            k = choose_rank(S, rank, energy)
            A, B = split_factors(U, S, Vh, k, scaling_at(adapter.config, name, k))
            tensors.update(factor_tensors(update, A, B, update.A.dtype, update.magnitude))
            ranks[name] = k
            rows.append({"module": name, "rank": update.rank, "new_rank": k, "energy_kept": energy_kept(S, k),
                         "energy": float((S.double() ** 2).sum())})
    size = write_adapter_dir(out, with_ranks(adapter.raw, ranks), tensors)
    total = sum(r["energy"] for r in rows)
    overall = sum(r["energy"] * r["energy_kept"] for r in rows) / total if total else 1.0
    return {"adapter": str(path), "out": str(out), "modules": rows, "energy_kept": overall,
            "bytes_before": adapter.weights_bytes, "bytes_after": size,
            "notes": [DORA_NOTE] if adapter.config.use_dora else []}


def format_resize(report: dict) -> str:
    rows = report["modules"]
    width = max(len("module"), *(len(r["module"]) for r in rows))
    lines = [f"resized {report['adapter']} -> {report['out']}", "",
             f"{'module':<{width}} {'rank':>10} {'energy kept':>12}"]
    lines += [f"{r['module']:<{width}} {str(r['rank']) + ' -> ' + str(r['new_rank']):>10} {r['energy_kept']:>12.4%}"
              for r in rows]
    kept = report["energy_kept"]
    before, after = report["bytes_before"], report["bytes_after"]
    lines += ["", f"overall energy kept: {kept:.4%} (relative error ||dW - dW'||/||dW|| of all modules "
                  f"together: {math.sqrt(max(0.0, 1 - kept)):.2%})",
              f"adapter_model.safetensors: {format_bytes(before)} -> {format_bytes(after)} "
              f"({after / before:.1%} of the original)"]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def cli_resize(args) -> int:
    print(format_resize(resize_adapter(args.adapter, args.out, args.rank, args.energy)))
    return 0
