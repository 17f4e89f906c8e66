"""Reading training rows: JSONL -> ``Example`` (prompt messages + reference answer, or plain text).

One JSON object per line, in one of four formats (all rows of a file share it):

    chat        {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
    alpaca      {"instruction": ..., "input": ... (optional), "output": ...}
    completion  {"prompt": ..., "completion": ...}
    text        {"text": ...}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge import LoraError

__all__ = ["ACCEPTED", "Example", "IGNORE_INDEX", "PARSERS", "Pair", "ROLES", "detect_format", "load_examples", "parse_record", "read_jsonl"]

IGNORE_INDEX = -100  # label value the loss skips (PyTorch / transformers convention)
ROLES = ("system", "user", "assistant")
ACCEPTED = ("chat {'messages': [...]}, alpaca {'instruction', 'output'}, "
            "{'prompt', 'completion'} or {'text'}")

Pair = tuple[list[int], list[int]]  # (input_ids, labels) of one example


@dataclass
class Example:
    """One normalised training row: prompt messages + reference answer, or a plain text."""

    messages: list[dict[str, str]]  # the prompt part, role/content dicts; [] for plain text
    answer: str | None  # the assistant reply to learn; None for plain text
    text: str | None = None  # plain-text rows only
    fmt: str = "chat"  # chat | alpaca | completion | text
    where: str = ""  # "data.jsonl line 7", for error messages


# ----------------------------------------------------------------------------- reading


def _read_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise LoraError(f"{path}: no such data file" if not p.exists() else f"{path}: not a file")
    rows = []
    with open(p, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as err:
            raise LoraError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for lineno, raw in enumerate(lines, 1):
        if raw.strip():
            rows.append((lineno, _parse_line(raw, f"{path} line {lineno}")))
    if not rows:
        raise LoraError(f"{path} has no examples")
    return rows


def _parse_line(raw: str, where: str) -> dict:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraError(f"{where}: not valid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise LoraError(f"{where}: JSON nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise LoraError(f"{where}: expected a JSON object, got {_kind(obj)}")
    return obj


def read_jsonl(path: str | Path) -> list[dict]:
    """All objects of a JSONL file (blank lines skipped); LoraError with the line on bad input."""
    return [obj for _, obj in _read_numbered(path)]


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# ----------------------------------------------------------------------------- formats


def detect_format(record: dict) -> str | None:
    """'chat', 'alpaca', 'completion', 'text', or None when no format's key is present."""
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def _need_str(record: dict, key: str, where: str, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if key not in record:
        raise LoraError(f"{where}: missing {key!r}")
    if not isinstance(value, str):
        raise LoraError(f"{where}: {key!r} must be a string, got {_kind(value)}")
    return _valid_text(value, where, repr(key))


def _valid_text(value: str, where: str, what: str) -> str:
    """JSON may spell lone UTF-16 surrogates (\\ud800) that no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LoraError(f"{where}: {what} holds an unpaired surrogate (\\u{ord(value[err.start]):04x}) at "
                        f"character {err.start}: not valid Unicode text") from None
    return value


def _check_message(msg: Any, i: int, where: str) -> dict[str, str]:
    if not isinstance(msg, dict):
        raise LoraError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {_kind(msg)}")
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        raise LoraError(f"{where}: messages[{i}] has role {role!r}; expected system, user or assistant")
    if not isinstance(content, str):
        raise LoraError(f"{where}: messages[{i}] 'content' must be a string, got {_kind(content)}")
    return {"role": role, "content": _valid_text(content, where, f"messages[{i}] 'content'")}


def _parse_chat(record: dict, where: str) -> Example:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LoraError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    msgs = [_check_message(m, i, where) for i, m in enumerate(msgs)]
    if msgs[-1]["role"] != "assistant":
        raise LoraError(f"{where}: the last message must be the assistant's answer, got role {msgs[-1]['role']!r}")
    if not any(m["role"] == "user" for m in msgs):
        raise LoraError(f"{where}: no user message before the assistant's answer")
    return Example(msgs[:-1], msgs[-1]["content"], fmt="chat", where=where)


def _parse_alpaca(record: dict, where: str) -> Example:
    instruction = _need_str(record, "instruction", where)
    extra = _need_str(record, "input", where, optional=True)
    output = _need_str(record, "output", where)
    user = instruction + ("\n\n" + extra if extra else "")
    return Example([{"role": "user", "content": user}], output, fmt="alpaca", where=where)


def _parse_completion(record: dict, where: str) -> Example:
    prompt = _need_str(record, "prompt", where)
    completion = _need_str(record, "completion", where)
    return Example([{"role": "user", "content": prompt}], completion, fmt="completion", where=where)


def _parse_text(record: dict, where: str) -> Example:
    text = _need_str(record, "text", where)
    if not text.strip():
        raise LoraError(f"{where}: 'text' is empty")
    return Example([], None, text=text, fmt="text", where=where)


PARSERS = {"chat": _parse_chat, "alpaca": _parse_alpaca, "completion": _parse_completion, "text": _parse_text}


def parse_record(record: dict, where: str = "record") -> Example:
    """Validate one JSON object and normalise it into an Example."""
    fmt = detect_format(record)
    if "chosen" in record and "rejected" in record:
        raise LoraError(f"{where}: a preference row (prompt, chosen, rejected): train on it with "
                        f"--method dpo or --method orpo")
    if fmt is None:
        keys = ", ".join(sorted(record)) or "none"
        raise LoraError(f"{where}: no recognised format (keys: {keys}); expected {ACCEPTED}")
    return PARSERS[fmt](record, where)


def load_examples(path: str | Path, split: str = "", columns: dict[str, str] | None = None) -> list[Example]:
    """Read and validate a data file (JSONL, JSON, CSV, Parquet or a save_to_disk directory:
    data.sources); every row must share the first row's format."""
    from loraforge.data.sources import read_records

    examples: list[Example] = []
    for where, record in read_records(path, split, columns):
        ex = parse_record(record, where)
        if examples and ex.fmt != examples[0].fmt:
            raise LoraError(f"{ex.where}: row is in {ex.fmt} format but {examples[0].where} is in "
                            f"{examples[0].fmt} format; use one format per file")
        examples.append(ex)
    return examples


