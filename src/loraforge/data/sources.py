"""Where rows come from: the files people already have, read into plain records (dicts) that
`records.parse_record` then validates.

    .jsonl                one JSON object per line (our own reader: errors name the line)
    .json                 a JSON array of objects, or JSON lines
    .csv, .parquet        through the `datasets` library (no hub: local files only)
    a directory           written by `datasets`' save_to_disk (a Dataset, or a DatasetDict: `split`)

`columns` renames columns onto the formats loraforge reads (`{"prompt": "question", "completion":
"answer"}` reads a `question` column as the prompt). TRL's conversational prompt/completion rows
(`prompt` and `completion` as message lists) are read as chat rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from loraforge import LoraError, one_line

DATASETS_FORMATS = {".csv": "csv", ".parquet": "parquet"}


def parse_columns(text: str | None) -> dict[str, str]:
    """`prompt=question,completion=answer` -> {"prompt": "question", "completion": "answer"}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        target, sep, source = (x.strip() for x in part.partition("="))
        if not sep or not target or not source:
            raise LoraError(f"--columns: {part!r} is not NAME=COLUMN (e.g. prompt=question,completion=answer)")
        if target in mapping:
            raise LoraError(f"--columns: {target!r} is mapped twice")
        mapping[target] = source
    return mapping


def read_records(path: str | Path, split: str = "", columns: dict[str, str] | None = None
                 ) -> list[tuple[str, dict]]:
    """(where, record) for every row of a data file or save_to_disk directory; `where` names the
    file and the line or row for error messages."""
    p = Path(path)
    if not p.exists():
        raise LoraError(f"{path}: no such data file")
    if p.is_dir():
        rows = _from_disk(p, split)
    elif p.suffix.lower() in DATASETS_FORMATS:
        rows = _through_datasets(p, DATASETS_FORMATS[p.suffix.lower()])
    elif p.suffix.lower() == ".json" and _starts_with(p, b"["):
        rows = _json_array(p)
    else:
        from loraforge.data.records import _read_numbered

        rows = [(f"{path} line {n}", record) for n, record in _read_numbered(p)]
    if split and not p.is_dir():
        raise LoraError(f"--split {split!r}: only a save_to_disk directory has splits; {path} is one file")
    if not rows:
        raise LoraError(f"{path} has no examples")
    return [(where, normalise(record, where, columns or {})) for where, record in rows]


def normalise(record: dict, where: str, columns: dict[str, str]) -> dict:
    """Apply the column mapping; read TRL's conversational prompt/completion as a chat row."""
    if columns:
        missing = [c for c in columns.values() if c not in record]
        if missing:
            raise LoraError(f"{where}: no column {missing[0]!r} (columns: {', '.join(map(str, record)) or 'none'})")
        record = {**{k: v for k, v in record.items() if k not in columns.values()},
                  **{target: record[source] for target, source in columns.items()}}
    if isinstance(record.get("prompt"), list) and isinstance(record.get("completion"), list):
        rest = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
        return {**rest, "messages": [*record["prompt"], *record["completion"]]}
    return record


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(prefix)
    except OSError as err:
        raise LoraError(f"{path}: cannot be read ({err.strerror or one_line(err)})") from None


def _json_array(path: Path) -> list[tuple[str, dict]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise LoraError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise LoraError(f"{path}: not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise LoraError(f"{path}: JSON nested too deeply to read") from None
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise LoraError(f"{path} item {i}: expected a JSON object, got {type(item).__name__}")
        rows.append((f"{path} item {i}", item))
    return rows


def _through_datasets(path: Path, fmt: str) -> list[tuple[str, dict]]:
    """A local CSV or Parquet file read by `datasets` (row i of the file is row i here)."""
    datasets = _datasets()
    try:
        options = _csv_as_text(path, datasets) if fmt == "csv" else {}
        table = datasets.load_dataset(fmt, data_files=str(path), split="train", **options)
    except Exception as err:  # datasets raises its own and pyarrow's error types
        raise LoraError(f"{path}: cannot be read as {fmt.upper()} ({one_line(err)})") from None
    header = 2 if fmt == "csv" else 0  # CSV: the header is line 1, row 0 is line 2
    where = "line" if fmt == "csv" else "row"
    return [(f"{path} {where} {i + header}", dict(row)) for i, row in enumerate(table)]


def _csv_as_text(path: Path, datasets) -> dict:
    """A CSV cell is text ("5" stays "5", "NA" stays "NA"): every column read as a string."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def _from_disk(path: Path, split: str) -> list[tuple[str, dict]]:
    datasets = _datasets()
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:
        raise LoraError(f"{path}: not a dataset saved with save_to_disk ({one_line(err)})") from None
    if isinstance(data, datasets.DatasetDict):
        chosen = split or ("train" if "train" in data else "")
        if chosen not in data:
            raise LoraError(f"{path}: no split {chosen!r} (splits: {', '.join(data)}); pass --split")
        data, label = data[chosen], f"{path} [{chosen}]"
    elif split:
        raise LoraError(f"--split {split!r}: {path} holds one dataset without splits")
    else:
        label = str(path)
    return [(f"{label} row {i}", dict(row)) for i, row in enumerate(data)]


def _datasets():
    try:
        import datasets
    except ImportError:
        raise LoraError("reading CSV, Parquet or save_to_disk data needs the 'datasets' package: "
                        "pip install datasets") from None
    datasets.disable_progress_bars()
    return datasets
