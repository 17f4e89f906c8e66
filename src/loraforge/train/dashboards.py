"""Dashboards: the numbers of metrics.jsonl also written through each tool's own library, so a run
shows up where its user already looks. Each tool writes locally, nothing is sent anywhere:

    tensorboard   OUT/tensorboard/      event files (torch.utils.tensorboard)  tensorboard --logdir OUT/tensorboard
    wandb         OUT/wandb/            an offline run (mode="offline")        wandb sync OUT/wandb/offline-run-*
    mlflow        OUT/mlruns/           MLflow's local file store              mlflow ui --backend-store-uri OUT/mlruns

Each library is imported only when its reporter is asked for; a missing one is a one-line error
that names the package to install.
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

from loraforge import LoraError

REPORTERS = ("tensorboard", "wandb", "mlflow")
# metrics.jsonl keys that are series on a dashboard (the others, such as the step, are not)
SERIES = ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "val_loss")


def parse_report_to(text: str) -> list[str]:
    """`--report-to tensorboard,wandb` -> ["tensorboard", "wandb"]; "none" or "" -> []."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in REPORTERS]
    if unknown or "none" in names:
        bad = unknown[0] if unknown else "none"
        raise LoraError(f"--report-to: unknown dashboard {bad!r}; use none or a comma list of {', '.join(REPORTERS)}")
    return list(dict.fromkeys(names))


PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}  # dashboard: (module, the package that installs it)


def check_available(names: list[str]):
    """Before training: every dashboard asked for can be imported (a one-line error otherwise)."""
    import importlib.util

    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise LoraError(f"--report-to {name} needs the {package!r} package: pip install {package}")


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoraError(f"--report-to needs the {package!r} package: pip install {package}") from None


def series(record: dict) -> dict[str, float]:
    """The finite numeric series of one metrics.jsonl record."""
    return {k: float(record[k]) for k in SERIES
            if isinstance(record.get(k), (int, float)) and math.isfinite(float(record[k]))}


class TensorBoardReporter:
    def __init__(self, out: Path, settings: dict):
        _require("tensorboard", "tensorboard")
        tensorboard = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in settings.items()))

    def log(self, record: dict):
        for key, value in series(record).items():
            self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self):
        self.writer.close()


class WandbReporter:
    def __init__(self, out: Path, settings: dict):
        wandb = _require("wandb", "wandb")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(mode="offline", dir=str(out), project="loraforge", name=out.name, config=settings,
                              reinit="finish_previous")

    def log(self, record: dict):
        self.run.log(series(record), step=record["step"])

    def close(self):
        import wandb

        self.run.finish()
        wandb.teardown()  # wait for wandb's service process to write the run out to disk


class MlflowReporter:
    def __init__(self, out: Path, settings: dict):
        mlflow = _require("mlflow", "mlflow-skinny")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store: no server, no database
        self.client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        experiment = self.client.get_experiment_by_name("loraforge")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("loraforge")
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        for key, value in settings.items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log(self, record: dict):
        for key, value in series(record).items():
            self.client.log_metric(self.run_id, key, value, step=record["step"])

    def close(self):
        self.client.set_terminated(self.run_id)


_CLASSES = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "mlflow": MlflowReporter}


def open_reporters(names: list[str], out: str | Path, settings: dict) -> list:
    """One reporter per dashboard name, each writing under `out`."""
    out = Path(out)
    return [_CLASSES[name](out, settings) for name in names]
