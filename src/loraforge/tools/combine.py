"""`loraforge combine`: several adapters (same base, same targets) into one.

With weights w_i and updates dW_i = s_i·B_i·A_i per module:
- cat: exact. A = [A_1; A_2; ...], B = [w_1 s_1 B_1, ...]: the update is sum_i w_i dW_i, rank sum r_i
  (re-factored by SVD at min(out, in) where the summed rank exceeds the matrix size; still exact).
- svd: the same sum, truncated to --rank by an SVD computed from the factors (Eckart–Young).
- ties: TIES-Merging (Yadav et al. 2023) of the weighted dense updates: trim each to its top
  `density` fraction by magnitude, elect the sign with the larger summed mass per entry, and take
  the mean over the adapters whose trimmed entry agrees with it (the "disjoint mean").
- dare: DARE (Yu et al. 2023) on the weighted dense updates: drop each entry with probability
  1 - density, rescale the kept ones by 1/density, then add them up. Seeded.
ties and dare work on dense out x in matrices, then factor the result back by SVD to --rank
(default: the sum of the ranks, capped by min(out, in)).

The result has alpha = its most common rank and no rsLoRA; the factors absorb any per-module scaling.
DoRA adapters and adapters with modules_to_save are refused: neither adds linearly.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from loraforge import LoraError, format_bytes
from loraforge.core.io import check_apart, write_adapter_dir
from loraforge.tools.factors import Adapter, Update, common_rank, factor_tensors, load, with_ranks
from loraforge.core.lowrank import concat_factors, energy_kept, factored_norm, factored_svd, split_factors

METHODS = ("cat", "svd", "ties", "dare")


# --- the merge rules on dense matrices (already multiplied by their weights) -------------------
def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the round(density·n) entries of largest magnitude (and any tied with the
    smallest of them), zero the rest."""
    n = delta.numel()
    k = min(n, max(1, round(density * n)))
    threshold = delta.abs().flatten().kthvalue(n - k + 1).values  # the k-th largest magnitude
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_merge(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, sec. 3): trim, elect sign, disjoint mean."""
    trimmed = torch.stack([trim(d, density) for d in deltas])  # (T, out, in)
    sign = torch.sign(trimmed.sum(dim=0))  # elected sign: that of the summed mass per entry
    agree = (trimmed != 0) & (torch.sign(trimmed) == sign)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def dare_merge(deltas: list[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2023, eq. 2): per update, keep an entry when torch.rand(shape, generator) <
    density (so it drops with probability 1 - density), rescale the kept ones by 1/density; then sum."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        keep = torch.rand(delta.shape, generator=generator) < density
        total += torch.where(keep, delta / density, torch.zeros_like(delta))
    return total


# --- checks -----------------------------------------------------------------------------------
def check_compatible(adapters: list[Adapter], allow_different_targets: bool = False):
    """Refuse what cannot be added up: other base models, other shapes, other targets, DoRA."""
    for a in adapters:
        if a.config.use_dora:
            raise LoraError(f"{a.path} is a DoRA adapter: magnitude vectors do not add linearly, so it cannot "
                            f"be combined")
        if a.other or a.config.modules_to_save:
            raise LoraError(f"{a.path} has modules_to_save (fully trained modules); only LoRA updates can be combined")
        if str(a.raw.get("init_lora_weights", "")).lower().startswith(("pissa", "olora", "corda")):
            raise LoraError(f"{a.path} was saved with init_lora_weights={a.raw['init_lora_weights']!r}: its "
                            f"factors are relative to a modified base model; convert it to a plain LoRA first")
    bases = {a.config.base_model_name_or_path: a for a in adapters if a.config.base_model_name_or_path}
    if len(bases) > 1:
        (b1, a1), (b2, a2) = list(bases.items())[:2]
        raise LoraError(f"adapters were trained on different base models: {a1.path} on {b1!r}, {a2.path} on {b2!r}")
    _check_shapes(adapters)
    if not allow_different_targets:
        _check_targets(adapters)


def _check_shapes(adapters: list[Adapter]):
    first: dict[str, tuple[Adapter, Update]] = {}
    for a in adapters:
        for name, u in a.updates.items():
            other, ou = first.setdefault(name, (a, u))
            if ou.shape != u.shape:
                raise LoraError(f"module {name} has dW of shape {ou.shape} in {other.path} but {u.shape} in "
                                f"{a.path}: the adapters were trained on different base models")


def _check_targets(adapters: list[Adapter]):
    ref = adapters[0]
    for a in adapters[1:]:
        only_ref, only_a = sorted(set(ref.updates) - set(a.updates)), sorted(set(a.updates) - set(ref.updates))
        if only_ref or only_a:
            example = f"{only_ref[0]} is only in {ref.path}" if only_ref else f"{only_a[0]} is only in {a.path}"
            raise LoraError(f"{ref.path} and {a.path} adapt different modules ({len(ref.updates)} vs "
                            f"{len(a.updates)}; {example}); pass --allow-different-targets to count a missing "
                            f"module as dW = 0")


# --- combining --------------------------------------------------------------------------------
def combine_module(parts: list[tuple[Update, float]], method: str, rank: int | None, density: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, energy kept, energy) of one module's combined update, with scaling 1."""
    out_f, in_f = parts[0][0].shape
    summed = sum(u.rank for u, _ in parts)
    A, B = concat_factors([(u.A.double(), u.B.double(), w * u.scaling) for u, w in parts])
    if method == "cat" and summed <= min(out_f, in_f):
        return A, B, 1.0, factored_norm(A, B) ** 2
    if method in ("cat", "svd"):
        U, S, Vh = factored_svd(A, B)
    else:
        deltas = [w * u.dense(torch.float32) for u, w in parts]
        merged = ties_merge(deltas, density) if method == "ties" else dare_merge(deltas, density, generator)
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    k = min(rank or summed, S.numel())
    A, B = split_factors(U, S, Vh, k, 1.0)
    return A, B, energy_kept(S, k), float((S.double() ** 2).sum())


def check_request(paths: list, weights: list[float] | None, method: str, rank: int | None, density: float):
    if not paths:
        raise LoraError("combine needs at least one adapter")
    if weights is not None and len(weights) != len(paths):
        raise LoraError(f"{len(paths)} adapters but {len(weights)} weights; give one weight per adapter")
    if method not in METHODS:
        raise LoraError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "cat" and rank is not None:
        raise LoraError("--rank is for svd, ties and dare; cat is exact and keeps the summed rank")
    if rank is not None and rank < 1:
        raise LoraError(f"--rank must be >= 1, got {rank}")
    if not 0 < density <= 1:
        raise LoraError(f"--density must be in (0, 1], got {density}")


def combine_adapters(paths: list[str | Path], out: str | Path, weights: list[float] | None = None,
                     method: str = "cat", rank: int | None = None, density: float = 0.5, seed: int = 0,
                     allow_different_targets: bool = False) -> dict:
    """Write the combined adapter to `out`; return what was done, per module and overall."""
    check_request(paths, weights, method, rank, density)
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    adapters = [load(p) for p in paths]
    check_apart(out, [a.path for a in adapters])
    check_compatible(adapters, allow_different_targets)
    generator = torch.Generator().manual_seed(seed)
    results = {}
    with torch.no_grad():
        for name in sorted({m for a in adapters for m in a.updates}):
            parts = [(a.updates[name], w) for a, w in zip(adapters, weights) if name in a.updates]
            results[name] = combine_module(parts, method, rank, density, generator)
    ranks = {m: A.shape[0] for m, (A, *_) in results.items()}
    size = write_adapter_dir(out, _output_config(adapters, ranks), _output_tensors(adapters, results, ranks))
    rows = [{"module": m, "rank": ranks[m], "energy_kept": kept, "energy": e} for m, (_, _, kept, e) in results.items()]
    return {"adapters": [{"path": str(a.path), "weight": w, "r": a.config.r} for a, w in zip(adapters, weights)],
            "method": method, "density": density if method in ("ties", "dare") else None,
            "seed": seed if method == "dare" else None, "out": str(out), "modules": rows,
            "energy_kept": _overall(rows), "bytes": size}


def _output_config(adapters: list[Adapter], ranks: dict[str, int]) -> dict:
    same = all(set(a.updates) == set(adapters[0].updates) for a in adapters)
    base = next((a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path), None)
    targets = {} if same else {"target_modules": sorted(ranks), "exclude_modules": None}  # the union, by name
    return with_ranks(adapters[0].raw, ranks, lora_alpha=float(common_rank(ranks)), alpha_pattern={},
                      use_rslora=False, use_dora=False, modules_to_save=None, base_model_name_or_path=base,
                      **targets)


def _output_tensors(adapters: list[Adapter], results: dict, ranks: dict[str, int]) -> dict:
    """Factors at scaling 1 -> stored factors for scaling alpha / r_module (each side / sqrt(scaling))."""
    alpha, tensors = common_rank(ranks), {}
    for name, (A, B, _, _) in results.items():
        update = next(a.updates[name] for a in adapters if name in a.updates)  # for the keys
        root = math.sqrt(alpha / ranks[name])
        tensors.update(factor_tensors(update, A / root, B / root, adapters[0].dtype))
    return tensors


def _overall(rows: list[dict]) -> float:
    total = sum(r["energy"] for r in rows)
    return sum(r["energy"] * r["energy_kept"] for r in rows) / total if total else 1.0


def format_combine(report: dict) -> str:
    method = report["method"] + (f" (density {report['density']:g})" if report["density"] is not None else "") \
        + (f", seed {report['seed']}" if report["seed"] is not None else "")
    lines = [f"combined {len(report['adapters'])} adapter(s) by {method} -> {report['out']}"]
    lines += [f"  {a['path']}  weight {a['weight']:g}  (r={a['r']})" for a in report["adapters"]]
    ranks = sorted({r["rank"] for r in report["modules"]})
    lines.append(f"rank per module: {', '.join(map(str, ranks))} ({len(report['modules'])} modules)")
    if report["method"] == "cat":
        lines.append("exact: the update is the weighted sum of the adapters' updates")
    else:
        worst = min(report["modules"], key=lambda r: r["energy_kept"])
        lines.append(f"energy of the combined update kept by the rank-limited factoring: "
                     f"{report['energy_kept']:.4%} overall, lowest {worst['energy_kept']:.4%} ({worst['module']})")
    lines.append(f"adapter_model.safetensors: {format_bytes(report['bytes'])}")
    return "\n".join(lines)


def cli_combine(args) -> int:
    report = combine_adapters(args.adapters, args.out, args.weights, args.method, args.rank, args.density,
                              args.seed, args.allow_different_targets)
    print(format_combine(report))
    return 0
