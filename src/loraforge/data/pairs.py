"""Preference pairs for DPO / ORPO: JSONL rows -> ``PairExample`` -> (chosen, rejected) rows.

One JSON object per line, in either of TRL's two forms:

    standard        {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational  {"prompt": [{"role": "user", "content": ...}, ...],
                     "chosen": [{"role": "assistant", "content": ...}],
                     "rejected": [{"role": "assistant", "content": ...}]}

The prompt is rendered with the chat template and each answer is followed by the end-of-turn
marker, exactly as ``encode`` does for supervised rows (a pair is two ``Example``s that share
their prompt). Labels are -100 on the prompt: the log-probabilities are over answer tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge import LoraError
from loraforge.data.encode import encode_example, n_trained, one_per_row
from loraforge.data.records import (
    Example,
    _check_message,
    _kind,
    _read_numbered,
    _valid_text,
)

__all__ = ["PairExample", "encode_pairs", "load_pairs", "pair_rows", "parse_pair"]

PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PairExample:
    """One preference row: the prompt messages and the two answers to it."""

    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    where: str = ""

    def example(self, which: str) -> Example:
        """The chosen or rejected answer as a supervised Example (for ``encode``)."""
        return Example(self.messages, getattr(self, which), fmt="chat", where=self.where)


def _prompt(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise LoraError(f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": _valid_text(value, where, "'prompt'")}]
    if not isinstance(value, list) or not value:
        raise LoraError(f"{where}: 'prompt' must be a string or a non-empty list of messages, got {_kind(value)}")
    messages = [_check_message(m, i, where) for i, m in enumerate(value)]
    if messages[-1]["role"] == "assistant":
        raise LoraError(f"{where}: the prompt's last message is the assistant's; the answer goes in "
                        f"'chosen' / 'rejected'")
    return messages


def _answer(value: Any, key: str, where: str) -> str:
    if isinstance(value, list):  # conversational: one assistant message
        if len(value) != 1:
            raise LoraError(f"{where}: {key!r} must hold exactly one assistant message, got {len(value)}")
        message = _check_message(value[0], 0, f"{where}: {key!r}")
        if message["role"] != "assistant":
            raise LoraError(f"{where}: {key!r} must be the assistant's message, got role {message['role']!r}")
        value = message["content"]
    if not isinstance(value, str):
        raise LoraError(f"{where}: {key!r} must be a string or a list of one assistant message, got {_kind(value)}")
    if not value.strip():
        raise LoraError(f"{where}: {key!r} is empty")
    return _valid_text(value, where, repr(key))


def parse_pair(record: dict, where: str = "record") -> PairExample:
    """Validate one preference row; LoraError naming ``where`` and the key otherwise."""
    missing = [k for k in PAIR_KEYS if k not in record]
    if missing:
        keys = ", ".join(sorted(record)) or "none"
        raise LoraError(f"{where}: a preference row needs 'prompt', 'chosen' and 'rejected'; missing "
                        f"{', '.join(map(repr, missing))} (keys: {keys})")
    pair = PairExample(_prompt(record["prompt"], where), _answer(record["chosen"], "chosen", where),
                       _answer(record["rejected"], "rejected", where), where)
    if pair.chosen == pair.rejected:  # the loss would be exactly log 2 with zero gradient: a data bug
        raise LoraError(f"{where}: 'chosen' and 'rejected' are the same answer")
    return pair


def load_pairs(path: str | Path) -> list[PairExample]:
    """Read and validate a preference JSONL file."""
    return [parse_pair(record, f"{path} line {lineno}") for lineno, record in _read_numbered(path)]


def encode_pairs(pairs: list[PairExample], tokenizer: Any, max_len: int) -> tuple[list[dict], int]:
    """(pair rows, number dropped): each pair row is {"chosen": row, "rejected": row} in
    ``one_per_row`` form, cut to max_len; a pair where either answer lost every token is dropped."""
    rows, dropped = [], 0
    for pair in pairs:
        encoded = [encode_example(pair.example(which), tokenizer, max_len=max_len) for which in ("chosen", "rejected")]
        if any(n_trained(labels) == 0 for _, labels in encoded):
            dropped += 1
            continue
        chosen, rejected = one_per_row(encoded)
        rows.append({"chosen": chosen, "rejected": rejected})
    if not rows:
        raise LoraError(f"no preference pair keeps an answer token of both answers within max_len={max_len}; "
                        f"raise max_len")
    return rows, dropped


def pair_rows(pair_batch: list[dict]) -> list[dict]:
    """The 2B rows of one forward pass: the B chosen rows, then the B rejected rows (TRL's order)."""
    return [p["chosen"] for p in pair_batch] + [p["rejected"] for p in pair_batch]
