"""Streaming: a data file far larger than memory read, tokenized and packed as training goes.

The in-memory path (records.load_examples -> encode.pack) holds every example and packs them
all at once (best-fit decreasing, a global shuffle per epoch). A stream holds a bounded amount:

    reader        JSONL line by line (byte offsets), Parquet one row group at a time (pyarrow)
    online packer each example goes into the fullest of OPEN_ROWS open rows it fits (best fit);
                  when more rows are open, the fullest one leaves; a full row leaves at once
    shuffle       a buffer of `shuffle_buffer` packed rows: each new row sends a random one out
                  (no global shuffle); at the end of a pass the buffer drains in random order
    passes        a run is --max-steps long (a stream's length is not known up front); at the
                  end of the file the next pass starts over with the next epoch's shuffle
    validation    examples drawn with probability val_fraction among the first VAL_WINDOW of
                  the file, held in memory and never trained on

The stream's position (reader position, the packer's open rows and the shuffle buffer, as
positions of their examples in the file, and the shuffle's random state) is a small JSON
object saved in each checkpoint, so a killed run resumes on exactly the rows it would have seen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from loraforge import LoraError, one_line
from loraforge.data.encode import _encode_parts, _join, _row, n_trained
from loraforge.data.records import Example, Pair, _parse_line, parse_record

__all__ = ["OPEN_ROWS", "RowStream", "STREAM_ABOVE_BYTES", "VAL_WINDOW", "open_source", "open_stream", "use_streaming"]

STREAM_ABOVE_BYTES = 256 * 2 ** 20  # --streaming auto: JSONL / Parquet files larger than this stream
VAL_WINDOW = 2000  # streaming validation examples are drawn from the first VAL_WINDOW of the file
OPEN_ROWS = 64  # rows the online packer keeps open
STREAMABLE = (".jsonl", ".parquet")


def use_streaming(setting: str, path: str | Path) -> bool:
    """Whether to stream `path`: --streaming on / off, or auto (a JSONL or Parquet file over
    STREAM_ABOVE_BYTES)."""
    p = Path(path)
    if setting == "off":
        return False
    streamable = p.is_file() and p.suffix.lower() in STREAMABLE
    if setting == "on" and not streamable:
        raise LoraError(f"--streaming on: {path} is not a .jsonl or .parquet file (other formats are read in memory)")
    return streamable and (setting == "on" or p.stat().st_size > STREAM_ABOVE_BYTES)


# ----------------------------------------------------------------------------- readers
class JsonlSource:
    """JSONL read line by line; a position is a line's byte offset, with its line number."""

    def __init__(self, path: Path):
        self.path = path

    def records(self, start: tuple[int, int] = (0, 1)) -> Iterator[tuple[tuple[int, int], str, dict]]:
        """((offset, line), where, record) from position `start` on; blank lines skipped."""
        offset, line = start
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in f:
                here = (offset, line)
                offset, line = offset + len(raw), line + 1
                if raw.strip():
                    yield here, f"{self.path} line {here[1]}", self._parse(raw, here[1])

    def at(self, pos: tuple[int, int]) -> tuple[str, dict]:
        with open(self.path, "rb") as f:
            f.seek(pos[0])
            return f"{self.path} line {pos[1]}", self._parse(f.readline(), pos[1])

    def _parse(self, raw: bytes, line: int) -> dict:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LoraError(f"{self.path} line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        return _parse_line(text, f"{self.path} line {line}")


class ParquetSource:
    """Parquet read one row group at a time; a position is (row group, row in it)."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises its own error types
            raise LoraError(f"{path}: cannot be read as PARQUET ({one_line(err)})") from None
        self.path = path
        self._cache: tuple[int, list[dict]] | None = None

    def records(self, start: tuple[int, int] = (0, 0)) -> Iterator[tuple[tuple[int, int], str, dict]]:
        group, row = start
        for g in range(group, self.file.num_row_groups):
            rows = self._group(g)
            for r in range(row if g == group else 0, len(rows)):
                yield (g, r), self._where(g, r), rows[r]

    def at(self, pos: tuple[int, int]) -> tuple[str, dict]:
        return self._where(*pos), self._group(pos[0])[pos[1]]

    def _group(self, g: int) -> list[dict]:
        if self._cache is None or self._cache[0] != g:  # one row group in memory at a time
            self._cache = (g, self.file.read_row_group(g).to_pylist())
        return self._cache[1]

    def _where(self, g: int, r: int) -> str:
        before = sum(self.file.metadata.row_group(i).num_rows for i in range(g))
        return f"{self.path} row {before + r}"


def open_source(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise LoraError(f"{path}: no such data file")
    return ParquetSource(p) if p.suffix.lower() == ".parquet" else JsonlSource(p)


# ----------------------------------------------------------------------------- the stream
@dataclass
class Row:
    """A packed row being built: its examples' positions in the file and their (ids, labels)."""

    refs: list[list[int]] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    tokens: int = 0

    def add(self, ref, pair: Pair):
        self.refs.append(list(ref))
        self.pairs.append(pair)
        self.tokens += len(pair[0])


class RowStream:
    """Packed training rows of a file, produced in order, `rows_per_step` per optimizer step.

    `encode(record, where) -> Pair | None` turns a record into (ids, labels) (None: dropped);
    `held(i)` says whether example i is held out for validation.
    """

    def __init__(self, source, encode, held, max_tokens: int, shuffle_buffer: int, seed: int):
        self.source, self.encode, self.held = source, encode, held
        self.max_tokens, self.size, self.seed = max_tokens, shuffle_buffer, seed
        self.step = 0
        self._start_pass(0)

    def _start_pass(self, epoch: int):
        self.epoch, self.index, self.draining, self.packed = epoch, 0, False, 0
        self.rng = random.Random(f"stream:{self.seed}:{epoch}")
        self.open: list[Row] = []
        self.buffer: list[Row] = []
        self.out: list[Row] = []
        self.reader = self.source.records()
        self.cursor = None

    def __len__(self) -> int:  # rows of a stream are not counted up front (the run is --max-steps long)
        return 0

    # --- producing rows ---------------------------------------------------------------------
    def next_row(self) -> dict[str, list[int]]:
        while not self.out:
            if not self.draining:
                self._read_one()
            elif self.buffer:
                self.out.append(self.buffer.pop(self.rng.randrange(len(self.buffer))))
            elif self.packed:
                self._start_pass(self.epoch + 1)
            else:
                raise LoraError(f"{self.source.path}: no example keeps an answer token within max_len; raise max_len")
        return _row(self.out.pop(0).pairs)

    def _read_one(self):
        """Read the next record: into the packer, or, at the end of the file, start draining."""
        item = next(self.reader, None)
        if item is None:
            self.buffer += sorted(self.open, key=lambda r: -r.tokens)  # the drain empties the buffer next
            self.open, self.draining = [], True
            return
        pos, where, record = item
        i, self.index = self.index, self.index + 1
        self.cursor = pos
        if self.held(i):
            return
        pair = self.encode(record, where)
        if pair is not None:
            self.packed += 1
            self._pack(pos, pair)

    def _pack(self, pos, pair: Pair):
        """Best fit among the open rows; past OPEN_ROWS, the fullest leaves; a full row leaves."""
        n = len(pair[0])
        fits = [r for r in self.open if r.tokens + n <= self.max_tokens]
        row = max(fits, key=lambda r: r.tokens) if fits else None
        if row is None:
            row = Row()
            self.open.append(row)
        row.add(pos, pair)
        if row.tokens == self.max_tokens or len(self.open) > OPEN_ROWS:
            leaving = row if row.tokens == self.max_tokens else max(self.open, key=lambda r: r.tokens)
            self.open.remove(leaving)
            self._to_buffer(leaving)

    def _to_buffer(self, row: Row):
        self.buffer.append(row)
        if len(self.buffer) > self.size:
            self.out.append(self.buffer.pop(self.rng.randrange(len(self.buffer))))

    def step_batches(self, step: int, batch_size: int, grad_accum: int) -> list[list[dict]]:
        """The micro-batches of optimizer step `step`; steps come in order (resume: restore)."""
        if step != self.step:
            raise LoraError(f"the data stream is at step {self.step}, asked for step {step}")
        rows = [self.next_row() for _ in range(batch_size * grad_accum)]
        self.step += 1
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

    # --- the position, for checkpoints ------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue exactly here, as JSON: positions, not tokens."""
        version, internal, gauss = self.rng.getstate()
        return {"step": self.step, "epoch": self.epoch, "index": self.index, "draining": self.draining,
                "packed": self.packed,
                "cursor": list(self.cursor) if self.cursor is not None else None,
                "rng": [version, list(internal), gauss], "open": [r.refs for r in self.open],
                "buffer": [r.refs for r in self.buffer], "out": [r.refs for r in self.out]}

    def restore(self, state: dict):
        """Continue from `state()` of an earlier run over the same file and settings."""
        try:
            self._start_pass(int(state["epoch"]))
            self.step, self.index, self.draining = int(state["step"]), int(state["index"]), bool(state["draining"])
            self.packed = int(state["packed"])
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
            self.open, self.buffer, self.out = (self._rebuild(state[k]) for k in ("open", "buffer", "out"))
            cursor = state["cursor"]
        except (KeyError, TypeError, ValueError) as err:
            raise LoraError(f"the checkpoint's data stream position is unreadable ({one_line(err)})") from None
        self.cursor = tuple(cursor) if cursor is not None else None
        self.reader = self._after(self.cursor) if not self.draining else iter(())

    def _after(self, cursor) -> Iterator:
        if cursor is None:
            return self.source.records()
        reader = self.source.records(tuple(cursor))
        next(reader, None)  # the record at the cursor was read before the checkpoint
        return reader

    def _rebuild(self, rows: list[list[list[int]]]) -> list[Row]:
        built = []
        for refs in rows:
            row = Row()
            for ref in refs:
                where, record = self.source.at(tuple(ref))
                pair = self.encode(record, where)
                if pair is None:
                    raise LoraError(f"{where}: the data file changed since the checkpoint was written")
                row.add(ref, pair)
            built.append(row)
        return built


# ----------------------------------------------------------------------------- set-up
def stream_encoder(tokenizer: Any, train_on_prompt: bool, max_len: int, columns: dict[str, str]):
    """record -> (ids, labels) as encode_examples makes them (None: no answer token fits)."""
    from loraforge.data.sources import normalise

    first: list[Example] = []

    def encode(record: dict, where: str) -> Pair | None:
        example = parse_record(normalise(record, where, columns), where)
        _check_format(first, example)
        prompt, answer = _encode_parts(example, tokenizer, True)
        if n_trained(_join(prompt, answer, False, max_len)[1]) == 0:
            return None
        return _join(prompt, answer, train_on_prompt, max_len)

    return encode


def _check_format(first: list[Example], example: Example):
    """Every row of a file shares the first row's format (`first`: [] or [the first example])."""
    if first and example.fmt != first[0].fmt:
        raise LoraError(f"{example.where}: row is in {example.fmt} format but {first[0].where} is in "
                        f"{first[0].fmt} format; use one format per file")
    if not first:
        first.append(example)


def held_out(val_fraction: float, seed: int):
    """Whether example i is a validation example: drawn among the first VAL_WINDOW only."""
    def held(i: int) -> bool:
        return i < VAL_WINDOW and val_fraction > 0 and random.Random(f"split:{seed}:{i}").random() < val_fraction
    return held


def head_examples(source, columns: dict[str, str], held, sample: int = 64) -> tuple[list[Example], list[Example]]:
    """(validation examples, the first `sample` training examples) from the file's first VAL_WINDOW."""
    from loraforge.data.sources import normalise

    val, first, fmt = [], [], []
    for i, (_, where, record) in enumerate(source.records()):
        if i >= VAL_WINDOW:
            break
        example = parse_record(normalise(record, where, columns), where)
        _check_format(fmt, example)
        (val if held(i) else first).append(example)
    if not val and not first:
        raise LoraError(f"{source.path} has no examples")
    return val, first[:sample]



def open_stream(path: str | Path, tokenizer: Any, columns: dict[str, str], train_on_prompt: bool, max_len: int,
                max_tokens: int, shuffle_buffer: int, val_fraction: float, seed: int
                ) -> tuple[RowStream, list[dict], list[Example]]:
    """(the training row stream, packed validation rows, the first training examples: for the
    checks made before training)."""
    from loraforge.data.encode import encode_examples, pack

    if max_len < 2:
        raise LoraError(f"max_len must be at least 2, got {max_len}")
    source = open_source(path)
    held = held_out(val_fraction, seed)
    val, first = head_examples(source, columns, held)
    val_rows = pack(encode_examples(val, tokenizer, train_on_prompt, max_len).pairs, max_tokens) if val else []
    encode = stream_encoder(tokenizer, train_on_prompt, max_len, columns)
    return RowStream(source, encode, held, max_tokens, shuffle_buffer, seed), val_rows, first
