"""`loraforge sweep`: is "all linear layers at a small rank" better than "attention at a bigger rank"?

Each configuration (targets:rank) is trained by `loraforge.train.train` on the same data with the
same steps, seed and settings (alpha = 2·rank, so every run has scaling 2, as the default recipe
has at rank 8), then scored by `loraforge.eval.score.evaluate` (loss per answer token, exact match)
on --eval-data, or else on the validation split that training held out of --data. Trainable
parameters are counted as `loraforge estimate` counts them; the table compares each count with
that of the --budget-from configuration.

    OUT/<config>/       the adapter, metrics.jsonl and loss.png of each run
    OUT/results.json    everything in the table (rewritten after each run)
    OUT/sweep.png       eval loss and exact match against trainable parameters
"""
from __future__ import annotations

import re
import time
import logging
from dataclasses import dataclass
from pathlib import Path

from loraforge import LoraError
from loraforge.models.embedded import DEFAULT_MODEL
from loraforge import data as D
from loraforge.core.io import atomic_write_json
from loraforge.tools.factors import save_figure

logger = logging.getLogger(__name__)
ALPHA_PER_RANK = 2.0


@dataclass
class SweepConfig:
    label: str  # as written: "attention:16"
    targets: str  # as TrainConfig.targets: all-linear | attention | mlp | comma list of names
    rank: int

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", self.label.replace(":", "-r"))


def parse_config(text: str) -> SweepConfig:
    """'attention:16' or 'q_proj+v_proj:8' ('+' joins module names, as ',' separates configs)."""
    targets, sep, rank = text.strip().rpartition(":")
    if not sep or not targets or not rank.strip().isdigit() or int(rank) < 1:
        raise LoraError(f"sweep config {text.strip()!r}: write targets:rank with rank >= 1, e.g. attention:16")
    return SweepConfig(f"{targets}:{int(rank)}", targets.replace("+", ","), int(rank))


def parse_configs(text: str) -> list[SweepConfig]:
    configs = [parse_config(t) for t in text.split(",") if t.strip()]
    if not configs:
        raise LoraError("--configs is empty; e.g. --configs attention:16,all-linear:8")
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise LoraError(f"--configs lists a configuration twice: {', '.join(labels)}")
    return configs


def trainable_params(model_dir: str, config: SweepConfig) -> int:
    from loraforge.tools.estimate import estimate

    return estimate(model_dir, config.rank, config.targets)["trainable_params"]


def train_config(config: SweepConfig, model: str, data: str, out: Path, steps: int, seed: int, overrides: dict):
    from loraforge.train.config import resolve

    return resolve(None, model=model, data=data, out=str(out / config.slug), rank=config.rank,
                   alpha=ALPHA_PER_RANK * config.rank, targets=config.targets, max_steps=steps, seed=seed,
                   save_every=0, progress=False, **overrides)


def eval_examples(cfg, eval_data: str | None, limit: int) -> tuple[list, str]:
    """(examples, where they come from): --eval-data, else the split training held out."""
    if eval_data:
        examples, where = D.load_examples(eval_data), eval_data
    else:
        examples = D.load_examples(cfg.data)
        _, held_out, _ = D.train_val_split(examples, cfg.val_fraction, seed=cfg.seed)
        where = f"the validation split of {cfg.data}"
        if not held_out:
            where = f"{cfg.data} itself (too few rows to hold out a validation split; pass --eval-data)"
        examples = held_out or examples
    return (examples[:limit] if limit else examples), where


def run_one(config: SweepConfig, cfg, examples: list) -> dict:
    """Train one configuration, then score its adapter."""
    from loraforge.eval.score import evaluate
    from loraforge.models.loading import load_for_inference
    from loraforge.train.loop import train

    began = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - began
    model, tokenizer = load_for_inference(cfg.model, cfg.out)
    scores = evaluate(model, tokenizer, examples)
    return {"config": config.label, "targets": config.targets, "rank": config.rank, "alpha": cfg.alpha,
            "train_seconds": round(seconds, 2), "final_train_loss": summary["final_loss"],
            "eval_loss": scores["loss"], "exact_match": scores["exact_match"], "adapter": cfg.out}


def run_sweep(data: str, configs: str | list[SweepConfig], budget_from: str | None = None, steps: int = 100,
              model: str = DEFAULT_MODEL, eval_data: str | None = None, out: str = "out/sweep",
              seed: int = 0, eval_limit: int = 0, **overrides) -> dict:
    """Train and score every configuration; write OUT/results.json and OUT/sweep.png."""
    from loraforge.models import resolve_model_path

    configs = parse_configs(configs) if isinstance(configs, str) else configs
    if steps < 1:
        raise LoraError(f"--steps must be >= 1, got {steps}")
    budget = parse_config(budget_from) if budget_from else configs[0]
    model_dir, out = resolve_model_path(model), Path(out)
    budget_params = trainable_params(model_dir, budget)
    params = [trainable_params(model_dir, c) for c in configs]  # also checks every config before training
    cfgs = [train_config(c, model_dir, data, out, steps, seed, overrides) for c in configs]
    examples, where = eval_examples(cfgs[0], eval_data, eval_limit)
    report = {"model": model, "data": data, "eval_data": where, "steps": steps, "seed": seed,
              "budget_from": budget.label, "budget_params": budget_params, "results": []}
    for i, (config, cfg, count) in enumerate(zip(configs, cfgs, params), 1):
        logger.info(f"[{i}/{len(configs)}] {config.label}: {count:,} trainable parameters, {steps} steps")
        row = {**run_one(config, cfg, examples), "trainable_params": count, "budget_ratio": count / budget_params}
        report["results"].append(row)
        atomic_write_json(out / "results.json", report)
    report["plot"] = str(plot_sweep(report, out / "sweep.png"))
    atomic_write_json(out / "results.json", report)
    return report


def format_sweep(report: dict) -> str:
    rows = report["results"]
    width = max(len("config"), *(len(r["config"]) for r in rows))
    ratio = f"x {report['budget_from']}"
    w = max(10, len(ratio))
    lines = [f"sweep on {report['data']}: {report['steps']} steps, seed {report['seed']}, alpha = 2 x rank; "
             f"scored on {report['eval_data']}", "",
             f"{'config':<{width}} {'trainable':>12} {ratio:>{w}} {'train s':>8} "
             f"{'train loss':>10} {'eval loss':>9} {'exact match':>11}"]
    for r in rows:
        lines.append(f"{r['config']:<{width}} {r['trainable_params']:>12,} {r['budget_ratio']:>{w}.2f} "
                     f"{r['train_seconds']:>8.1f} {r['final_train_loss']:>10.4f} {r['eval_loss']:>9.4f} "
                     f"{r['exact_match']:>11.1%}")
    lines += ["", f"budget: {report['budget_from']} = {report['budget_params']:,} trainable parameters",
              f"results: {Path(report['plot']).parent / 'results.json'}; plot: {report['plot']}"]
    return "\n".join(lines)


def plot_sweep(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "eval_loss", "eval loss (per answer token)"),
                           (axes[1], "exact_match", "exact match")):
        xs, ys = [r["trainable_params"] for r in rows], [r[key] for r in rows]
        ax.scatter(xs, ys)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(report["budget_params"], color="grey", ls=":", label=f"budget ({report['budget_from']})")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"loraforge sweep: {report['steps']} steps, same data and seed")
    fig.tight_layout()
    return save_figure(fig, path)


def cli_sweep(args) -> int:
    overrides = {k: getattr(args, k) for k in ("lr", "batch_size", "max_tokens") if getattr(args, k) is not None}
    if "max_tokens" in overrides:
        overrides["max_len"] = min(256, overrides["max_tokens"])
    report = run_sweep(args.data, args.configs, args.budget_from, args.steps, args.model, args.eval_data,
                       args.out, args.seed, args.eval_limit, **overrides)
    print(format_sweep(report))
    return 0
