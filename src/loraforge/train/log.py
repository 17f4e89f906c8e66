"""What people tune by, in a machine-readable file and a picture: metrics.jsonl and loss.png."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak RSS."""
    if device is not None and device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a killed process is dropped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict)]


class MetricsLog:
    """Appends one JSON object per step to out/metrics.jsonl (and keeps them for the plot); each
    record also goes to the dashboards' reporters (train.dashboards), if any."""

    def __init__(self, out: Path, enabled: bool = True, append: bool = False, reporters: list | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled
        self.reporters = reporters or []
        self.records: list[dict] = []
        if enabled and append and self.path.exists():
            self.records = read_records(self.path)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def truncate(self, step: int):
        """Forget records after `step` (a resumed run redoes them)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        if self.enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict):
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for reporter in self.reporters:
            reporter.log(record)

    def close(self):
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []

    def summary(self) -> dict:
        speeds = [r["tokens_per_s"] for r in self.records[1:] or self.records if "tokens_per_s" in r]
        return {"mean_tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
                "peak_memory_mb": max((r.get("peak_memory_mb", 0) for r in self.records), default=None)}

    def plot(self, path: Path):
        if not self.enabled or not self.records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in self.records]
        ax.plot(steps, [r["loss"] for r in self.records], label="train loss", lw=1.2)
        val = [(r["step"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (per answer token)")
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r["lr"] for r in self.records], color="grey", ls=":", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        ax.legend(loc="upper right")
        ax.set_title("loraforge train")
        fig.tight_layout()
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
