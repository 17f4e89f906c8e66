"""`loraforge inspect`: which modules learned something, and how much of their rank they use.

Per module: ||dW||_F of dW = scaling·B·A, its singular values and effective rank (how many
singular values hold 90% / 99% of the energy sum(σ²)), all from the factors (`lowrank`); with a
base model, also ||dW|| / ||W||. Then sums by layer depth and by module type, and a heat map.
LoRA on MoE expert parameters (PEFT's target_parameters) is listed per expert
(`...experts.gate_up_proj[3]`, type `mlp.experts.gate_up_proj`), a router as its module
(`...mlp.gate`); telling which stored factors belong to which parameter needs the base model.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from loraforge import LoraError
from loraforge.tools.factors import Update, load, save_figure
from loraforge.core.lowrank import energy_rank, factored_norm, factored_svd

DORA_NOTE = ("DoRA adapter: the figures are for the low-rank update s·B·A; the magnitude vectors "
             "rescale each row of W + dW on top of it")


def split_name(module: str) -> tuple[int | None, str]:
    """(layer index, module type): 'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj')."""
    match = re.search(r"(?:^|\.)(\d+)\.", module)
    if match is None:
        return None, module
    return int(match.group(1)), re.sub(r"\[\d+\]$", "", module[match.end():])  # experts[e]: one type


def module_stats(update: Update, base_norm: float | None = None) -> dict:
    S = factored_svd(update.A, update.B, update.scaling)[1]
    norm = factored_norm(update.A, update.B, update.scaling)
    layer, kind = split_name(update.module)
    return {"module": update.module, "layer": layer, "type": kind, "rank": update.rank,
            "shape": list(update.shape), "scaling": update.scaling, "norm": norm,
            "singular_values": S.tolist(), "effective_rank_90": energy_rank(S, 0.90),
            "effective_rank_99": energy_rank(S, 0.99), "base_norm": base_norm,
            "relative": norm / base_norm if base_norm else None}


def base_norms(model: str | nn.Module, updates: dict[str, Update]) -> dict[str, float]:
    """||W||_F of each adapted module's base weight (the model is loaded when given by name)."""
    if not isinstance(model, nn.Module):
        from loraforge.models import load_model

        model = load_model(model, dtype="float32", device="cpu")
    norms = {}
    for name, update in updates.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LoraError(f"the model has no module {name!r}; was the adapter trained on another base model?") \
                from None
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None or tuple(weight.shape) not in (update.shape, update.shape[::-1]):
            shape = None if weight is None else tuple(weight.shape)
            raise LoraError(f"{name}: the model's weight has shape {shape} but the adapter's update is "
                            f"{update.shape}; was it trained on another base model?")
        norms[name] = float(weight.detach().double().norm())
    return norms


def summarize(rows: list[dict], key: str) -> list[dict]:
    """Per group (layer or type): ||dW|| of all its modules together and its share of the energy."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    total = sum(r["norm"] ** 2 for r in rows) or 1.0
    out = []
    for name, group in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0])):
        energy = sum(r["norm"] ** 2 for r in group)
        relative = [r["relative"] for r in group if r["relative"] is not None]
        out.append({key: name, "modules": len(group), "norm": math.sqrt(energy), "share": energy / total,
                    "mean_effective_rank_90": sum(r["effective_rank_90"] for r in group) / len(group),
                    "mean_relative": sum(relative) / len(relative) if relative else None})
    return out


def expert_updates(adapter, model: nn.Module) -> tuple[dict[str, Update], dict[str, float]]:
    """The stored factors of parameter targets split per expert: {name: Update} with each
    expert's own A_e (r, in), B_e (out, r) and the parameter's scaling, and ||W[e]|| of each."""
    from loraforge.core.config import lora_scaling
    from loraforge.core.io import parameter_keys
    from loraforge.core.layers import dense_param, split_experts
    from loraforge.core.ops import own_parameters, parameter_owners

    stored = {m: {"lora_A": u.A, "lora_B": u.B} for m, u in adapter.updates.items()}
    owners, updates, norms = parameter_owners(model), {}, {}
    for key, target in parameter_keys(model, adapter.config, stored, adapter.path).items():
        owner, _, pname = target.rpartition(".")
        shape = own_parameters(owners[owner])[pname]
        experts = shape[0] if len(shape) == 3 else 1
        A, B = stored[key]["lora_A"], stored[key]["lora_B"]
        r = A.shape[0] // experts
        scaling = lora_scaling(adapter.config.alpha_for(target), r, adapter.config.use_rslora)
        weight = dense_param(owners[owner], pname)  # a 4-bit one dequantized
        A_e, B_e = split_experts(A, B, experts)
        for e in range(experts):
            name = f"{target}[{e}]" if experts > 1 else owner
            updates[name] = Update(name, A_e[e], B_e[e], scaling, adapter.updates[key].keys)
            if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
                norms[name] = float((weight[e] if experts > 1 else weight).detach().double().norm())
        del adapter.updates[key]
    return updates, norms


def inspect_adapter(path: str | Path, model: str | nn.Module | None = None) -> dict:
    """Everything `loraforge inspect` prints, as a JSON-ready dict."""
    adapter = load(path, parameters=True)
    experts, expert_norms = {}, {}
    if adapter.config.target_parameters:
        if model is None:
            raise LoraError(f"adapter {path} adapts MoE expert / router parameters (target_parameters); pass --model "
                            f"so that inspect can tell which stored factors belong to which parameter")
        if not isinstance(model, nn.Module):
            from loraforge.models import load_model

            model = load_model(model, dtype="float32", device="cpu")
        experts, expert_norms = expert_updates(adapter, model)
    norms = base_norms(model, adapter.updates) if model is not None else {}
    adapter.updates.update(experts)
    norms.update(expert_norms)
    with torch.no_grad():
        rows = [module_stats(u, norms.get(m)) for m, u in adapter.updates.items()]
    notes = [DORA_NOTE] if adapter.config.use_dora else []
    zero = [r["module"] for r in rows if r["norm"] == 0.0]
    if zero:
        notes.append(f"{len(zero)} module(s) have dW = 0 (untrained: B is still zero), e.g. {zero[0]}")
    config = adapter.config
    return {"adapter": str(path), "r": config.r, "alpha": config.alpha, "use_rslora": config.use_rslora,
            "use_dora": config.use_dora, "base_model": config.base_model_name_or_path,
            "total_norm": math.sqrt(sum(r["norm"] ** 2 for r in rows)), "modules": rows,
            "by_layer": summarize(rows, "layer"), "by_type": summarize(rows, "type"), "notes": notes}


# --- text -----------------------------------------------------------------------------------------
def _module_lines(report: dict) -> list[str]:
    rows = report["modules"]
    width = max(len("module"), *(len(r["module"]) for r in rows))
    total = report["total_norm"] ** 2 or 1.0
    relative = any(r["relative"] is not None for r in rows)
    lines = [f"{'module':<{width}} {'r':>4} {'||dW||':>10} " + (f"{'/||W||':>9} " if relative else "")
             + f"{'sigma_1':>10} {'energy':>7} {'rank90':>6} {'rank99':>6}"]
    for r in rows:
        sigma = r["singular_values"][0] if r["singular_values"] else 0.0
        lines.append(f"{r['module']:<{width}} {r['rank']:>4} {r['norm']:>10.4g} "
                     + (f"{r['relative']:>9.3%} " if relative else "")
                     + f"{sigma:>10.4g} {r['norm'] ** 2 / total:>7.1%} {r['effective_rank_90']:>6} "
                     f"{r['effective_rank_99']:>6}")
    return lines


def _group_lines(groups: list[dict], key: str) -> list[str]:
    width = max(len(key), *(len(str(g[key])) for g in groups))
    relative = any(g["mean_relative"] is not None for g in groups)
    lines = [f"{key:<{width}} {'modules':>7} {'||dW||':>10} {'energy':>7} {'mean rank90':>11}"
             + (f" {'mean /||W||':>11}" if relative else "")]
    for g in groups:
        name = "-" if g[key] is None else str(g[key])
        lines.append(f"{name:<{width}} {g['modules']:>7} {g['norm']:>10.4g} {g['share']:>7.1%} "
                     f"{g['mean_effective_rank_90']:>11.1f}" + (f" {g['mean_relative']:>11.3%}" if relative else ""))
    return lines


def format_report(report: dict) -> str:
    head = (f"adapter {report['adapter']}: r={report['r']}, alpha={report['alpha']:g}"
            + (", rsLoRA" if report["use_rslora"] else "") + (", DoRA" if report["use_dora"] else "")
            + f", {len(report['modules'])} modules, base {report['base_model'] or 'unknown'}")
    lines = [head, f"dW = scaling·B·A; energy = share of sum ||dW||²; rankNN = singular values holding NN% "
                   f"of a module's energy; total ||dW|| = {report['total_norm']:.4g}", ""]
    lines += _module_lines(report) + ["", "by layer:"] + _group_lines(report["by_layer"], "layer")
    lines += ["", "by module type:"] + _group_lines(report["by_type"], "type")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


# --- heat map -------------------------------------------------------------------------------------
def plot_heatmap(report: dict, path: str | Path) -> Path:
    """A PNG of ||dW|| per (layer, module type); blank where a layer has no such module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [g["layer"] for g in report["by_layer"]]
    types = [g["type"] for g in report["by_type"]]
    grid = np.full((len(layers), len(types)), np.nan)
    for r in report["modules"]:
        grid[layers.index(r["layer"]), types.index(r["type"])] = r["norm"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(types), 2.8 + 0.3 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if grid.size <= 160:  # small grids: print each value in its cell
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                light = image.norm(value) > 0.6  # the upper end of viridis is light: black text on it
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
    fig.colorbar(image, ax=ax, label="||dW||_F")
    ax.set_xticks(range(len(types)), types, rotation=40, ha="right")
    ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"LoRA update norms: {Path(report['adapter']).name}")
    fig.tight_layout()
    return save_figure(fig, path)


def cli_inspect(args) -> int:
    report = inspect_adapter(args.adapter, args.model)
    if args.plot:
        report["plot"] = str(plot_heatmap(report, args.plot))
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_report(report))
    if args.plot:
        print(f"heat map written to {args.plot}")
    return 0
