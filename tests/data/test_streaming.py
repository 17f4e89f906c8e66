"""data.stream: rows read, tokenized and packed as training goes. Oracles: the in-memory encoder
(every example once per pass, encoded alike), the Parquet copy of the file (the same rows), and
an uninterrupted stream (a restored one continues on the same rows)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from factory import tiny_tokenizer

from loraforge import LoraError
from loraforge import data as D
from loraforge.data import stream as S

MAX_TOKENS, MAX_LEN = 200, 100


def rows_of(n: int) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [{"messages": [{"role": "user", "content": f"question {i}: " + " ".join(words[:i % 8 + 1])},
                          {"role": "assistant", "content": f"answer {i} " + "x" * (i % 13)}]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + ("\n\n" if i % 7 == 3 else "\n") for i, r in enumerate(rows)))
    return path  # a few blank lines: positions are byte offsets, not row numbers


def stream(path: Path, val_fraction: float = 0.1, buffer: int = 8, seed: int = 0):
    return S.open_stream(path, tiny_tokenizer(), {}, False, MAX_LEN, MAX_TOKENS, buffer, val_fraction, seed)


def take(s: S.RowStream, steps: int, start: int = 0, per_step: int = 2) -> list[dict]:
    return [row for step in range(start, start + steps) for mb in s.step_batches(step, per_step, 1) for row in mb]


def split_examples(row: dict) -> list[list[int]]:
    out, at = [], 0
    for n in row["seq_lens"]:
        out.append(row["input_ids"][at:at + n])
        at += n
    return out


def digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def test_one_pass_trains_every_example_once_as_the_in_memory_encoder_does(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(150))
    s, val_rows, _ = stream(path)
    held = S.held_out(0.1, 0)
    examples = D.load_examples(path)
    train = [ex for i, ex in enumerate(examples) if not held(i)]
    expected = Counter(tuple(ids) for ids, _ in D.encode_examples(train, tiny_tokenizer(), max_len=MAX_LEN).pairs)
    seen: Counter = Counter()
    while True:
        row = s.next_row()
        if s.epoch > 0:  # the first row of the second pass
            break
        assert len(row["input_ids"]) <= MAX_TOKENS and row["position_ids"][0] == 0
        seen.update(tuple(e) for e in split_examples(row))
    assert seen == expected  # nothing lost, nothing twice, the validation examples never
    val = [ex for i, ex in enumerate(examples) if held(i)]
    assert val and val_rows == D.pack(D.encode_examples(val, tiny_tokenizer(), max_len=MAX_LEN).pairs, MAX_TOKENS)


def test_memory_is_bounded_by_the_open_rows_and_the_shuffle_buffer(tmp_path):
    s, _, _ = stream(write_jsonl(tmp_path / "d.jsonl", rows_of(400)), buffer=5)
    for step in range(150):  # past the end of the first pass
        s.step_batches(step, 2, 1)
        assert len(s.open) <= S.OPEN_ROWS and len(s.out) <= 1
        assert len(s.open) + len(s.buffer) <= S.OPEN_ROWS + 5  # the buffer takes the open rows at the end


def test_jsonl_and_parquet_stream_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = rows_of(120)
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet), batch_size=32)  # several row groups
    assert digest(take(stream(jsonl)[0], 40)) == digest(take(stream(parquet)[0], 40))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("at", [3, 17, 31, 58])  # mid-pass, at the drain, in the second pass
def test_a_restored_stream_continues_on_the_same_rows(tmp_path, kind, at):
    rows = rows_of(90)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    if kind == "parquet":
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path), batch_size=25)
    uninterrupted = take(stream(path)[0], 70)
    first = stream(path)[0]
    before = take(first, at)
    state = json.loads(json.dumps(first.state()))  # as a checkpoint keeps it
    resumed = stream(path)[0]
    resumed.restore(state)
    assert before + take(resumed, 70 - at, start=at) == uninterrupted


def test_streaming_is_chosen_by_setting_and_size(tmp_path):
    small = write_jsonl(tmp_path / "d.jsonl", rows_of(5))
    assert S.use_streaming("on", small) and not S.use_streaming("auto", small) and not S.use_streaming("off", small)
    with pytest.raises(LoraError, match=r"--streaming on: .*d.csv is not a .jsonl or .parquet file"):
        S.use_streaming("on", tmp_path / "d.csv")


def test_a_bad_line_is_a_one_line_error_naming_it_before_training_or_when_read(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_of(30)) + '{"messages": oops}\n')
    with pytest.raises(LoraError, match=r"d.jsonl line 31: not valid JSON") as err:
        stream(path, val_fraction=0)  # within the first VAL_WINDOW examples: found before training
    assert "\n" not in str(err.value)
    monkeypatch.setattr(S, "VAL_WINDOW", 10)
    s, _, _ = stream(path, val_fraction=0)
    with pytest.raises(LoraError, match=r"d.jsonl line 31: not valid JSON") as err:
        take(s, 40)


def test_a_file_with_nothing_to_train_on_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p " * 200, "completion": "c"}) + "\n")
    s, _, _ = stream(path, val_fraction=0)
    with pytest.raises(LoraError, match="no example keeps an answer token within max_len"):
        take(s, 1)


def test_a_changed_checkpoint_state_is_a_one_line_error(tmp_path):
    s, _, _ = stream(write_jsonl(tmp_path / "d.jsonl", rows_of(20)))
    with pytest.raises(LoraError, match="data stream position is unreadable"):
        s.restore({"epoch": 0})


def test_mixed_formats_and_missing_columns_are_one_line_errors_before_training(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(rows_of(1)[0]) + "\n" + json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(LoraError, match="mixed.jsonl line 2: row is in text format but .* line 1 is in chat format"):
        stream(mixed)
    renamed = tmp_path / "qa.jsonl"
    renamed.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(30)))
    tok = tiny_tokenizer()
    s, _, _ = S.open_stream(renamed, tok, {"prompt": "question", "completion": "answer"}, False, MAX_LEN,
                            MAX_TOKENS, 4, 0.0, 0)
    assert take(s, 1)  # read through the mapping
    with pytest.raises(LoraError, match=r"qa.jsonl line 1: no column 'prompt_text'"):
        S.open_stream(renamed, tok, {"prompt": "prompt_text", "completion": "answer"}, False, MAX_LEN, MAX_TOKENS,
                      4, 0.0, 0)
