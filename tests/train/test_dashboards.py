"""--report-to: the metrics written through TensorBoard, W&B (offline) and MLflow (local store),
read back with each tool's own reader."""
from __future__ import annotations

import pytest

from loraforge import LoraError
from loraforge.train.dashboards import REPORTERS, open_reporters, parse_report_to, series

RECORDS = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0 + s,
            "peak_memory_mb": 300.0, "tokens": 64} for s in (1, 2, 3)] + [{"step": 4, "loss": 0.4, "val_loss": 0.45,
                                                                            "lr": 0.0, "grad_norm": float("nan")}]


def run(names, tmp_path):
    reporters = open_reporters(names, tmp_path, {"rank": 8, "lr": 1e-3})
    for record in RECORDS:
        for r in reporters:
            r.log(record)
    for r in reporters:
        r.close()


@pytest.mark.parametrize("text, expected", [("none", []), ("", []), ("tensorboard", ["tensorboard"]),
                                            ("wandb, mlflow", ["wandb", "mlflow"]), ("TensorBoard,tensorboard",
                                                                                     ["tensorboard"])])
def test_parse_report_to(text, expected):
    assert parse_report_to(text) == expected


@pytest.mark.parametrize("text", ["comet", "tensorboard,neptune", "none,wandb"])
def test_unknown_dashboards_are_one_line_errors(text):
    with pytest.raises(LoraError, match="unknown dashboard") as err:
        parse_report_to(text)
    assert "\n" not in str(err.value) and ", ".join(REPORTERS) in str(err.value)


def test_series_keeps_finite_numbers_only():
    assert series(RECORDS[-1]) == {"loss": 0.4, "val_loss": 0.45, "lr": 0.0}


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    loss = events.Scalars("train/loss")
    assert [(e.step, round(e.value, 6)) for e in loss] == [(1, 2.0), (2, 1.0), (3, round(2 / 3, 6)), (4, 0.4)]
    assert [e.value for e in events.Scalars("train/val_loss")] == [pytest.approx(0.45)]
    assert len(events.Scalars("train/grad_norm")) == 3  # the NaN is not plotted


def test_wandb_offline_run_reads_back(tmp_path):
    pytest.importorskip("wandb")
    run(["wandb"], tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = wandb_history(next(runs[0].glob("*.wandb")))
    assert [(int(h["_step"]), float(h["loss"])) for h in history] == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3)),
                                                                      (4, 0.4)]
    assert float(history[-1]["val_loss"]) == 0.45 and "grad_norm" not in history[-1]


def wandb_history(path) -> list[dict]:
    """The history rows of an offline .wandb file: a ':W&B' header, then LevelDB-log records
    (32 KiB blocks; each chunk: crc32, length, type) holding wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, buf, rows = header, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
            buf = b""
    return rows


def test_mlflow_local_store_reads_back(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run(["mlflow"], tmp_path)
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("loraforge")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.data.params == {"rank": "8", "lr": "0.001"} and found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3)), (4, 0.4)]


def test_train_reports_to_tensorboard_and_mlflow_from_parquet_with_mapped_columns(tmp_path, capsys):
    """The CLI end to end: a Parquet file with other column names, --columns, --report-to."""
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    datasets = pytest.importorskip("datasets")
    import json

    from cli_helpers import FAST
    from factory import save_tiny_llama
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loraforge.cli import main
    from loraforge.demo.tasks import make_examples

    rows = [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]}
            for r in make_examples(24, seed=0, task="dates")]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "train.parquet")
    out = tmp_path / "run"
    assert main(["train", "--model", str(save_tiny_llama(tmp_path / "model")), "--data", str(tmp_path / "train.parquet"),
                 "--columns", "prompt=question,completion=answer", "--out", str(out), "--max-steps", "3",
                 "--report-to", "tensorboard,mlflow", "--val-fraction", "0.2", *FAST]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # float32
    assert len(events.Scalars("train/val_loss")) == 1
    client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("loraforge").experiment_id])
    assert [m.value for m in client.get_metric_history(found.info.run_id, "tokens_per_s")] == pytest.approx(
        [r["tokens_per_s"] for r in logged])
    assert found.data.params["columns"] == "prompt=question,completion=answer"


@pytest.mark.parametrize("flags, message", [
    (["--report-to", "comet"], "unknown dashboard 'comet'"),
    (["--columns", "prompt"], "is not NAME=COLUMN"),
])
def test_bad_reporting_and_column_flags_fail_before_the_model_loads(tmp_path, capsys, flags, message):
    from loraforge.cli import main

    assert main(["train", "--data", "d.jsonl", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "o").exists()
