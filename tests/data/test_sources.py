"""Data in the formats people have (JSONL, JSON array, CSV, Parquet, save_to_disk), read through the
`datasets` library, with column mapping and TRL's layouts; the same rows in every format give the
same packed batches."""
from __future__ import annotations

import hashlib
import json

import pytest
from factory import tiny_tokenizer

from loraforge import LoraError
from loraforge import data as D
from loraforge.data.sources import normalise, parse_columns, read_records

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f" {2 * i}"} for i in range(12)]


def write_all(tmp_path, rows=ROWS) -> dict:
    table = datasets.Dataset.from_list(rows)
    paths = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "csv": tmp_path / "d.csv",
             "parquet": tmp_path / "d.parquet", "disk": tmp_path / "saved", "dict": tmp_path / "saved-dict"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows, indent=1))
    table.to_csv(paths["csv"], index=False)
    table.to_parquet(paths["parquet"])
    table.save_to_disk(paths["disk"])
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(paths["dict"])
    return paths


def packed_digest(records) -> str:
    examples = [D.parse_record(r, w) for w, r in records]
    encoded = D.encode_examples(examples, tiny_tokenizer(), max_len=128)
    batch = D.collate(D.pack(encoded.pairs, 256), tiny_tokenizer().pad_token_id)
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in batch.values())).hexdigest()


def test_every_format_gives_the_same_packed_batches(tmp_path):
    paths = write_all(tmp_path)
    digests = {name: packed_digest(read_records(path)) for name, path in paths.items()}
    assert len(set(digests.values())) == 1, digests


def test_where_names_the_line_or_row(tmp_path):
    paths = write_all(tmp_path)
    assert read_records(paths["jsonl"])[3][0] == f"{paths['jsonl']} line 4"
    assert read_records(paths["csv"])[0][0] == f"{paths['csv']} line 2"  # line 1 is the header
    assert read_records(paths["parquet"])[5][0] == f"{paths['parquet']} row 5"
    assert read_records(paths["json"])[1][0] == f"{paths['json']} item 1"
    assert read_records(paths["dict"], split="test")[1][0] == f"{paths['dict']} [test] row 1"
    assert len(read_records(paths["dict"], split="test")) == 2 and len(read_records(paths["dict"])) == 12


def test_columns_map_other_names_onto_the_formats(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(ROWS)]
    paths = write_all(tmp_path, rows)
    columns = parse_columns("prompt=question,completion=answer")
    (tmp_path / "plain").mkdir()
    reference = packed_digest(read_records(write_all(tmp_path / "plain")["jsonl"]))
    for name in ("parquet", "csv", "disk"):
        assert packed_digest(read_records(paths[name], columns=columns)) == reference, name


def test_trl_conversational_prompt_completion_is_a_chat_row():
    record = normalise({"prompt": [{"role": "user", "content": "hi"}],
                        "completion": [{"role": "assistant", "content": "hello"}]}, "row 0", {})
    example = D.parse_record(record, "row 0")
    assert example.fmt == "chat" and example.answer == "hello" and example.messages[-1]["content"] == "hi"


@pytest.mark.parametrize("text, message", [("prompt", "is not NAME=COLUMN"), ("prompt=", "is not NAME=COLUMN"),
                                           ("prompt=a,prompt=b", "mapped twice")])
def test_bad_column_mappings(text, message):
    with pytest.raises(LoraError, match=message):
        parse_columns(text)


def test_bad_files_are_one_line_errors(tmp_path):
    paths = write_all(tmp_path)
    cases = {
        "missing column": (lambda: read_records(paths["csv"], columns={"prompt": "question"}), "no column 'question'"),
        "no file": (lambda: read_records(tmp_path / "nope.parquet"), "no such data file"),
        "split of a file": (lambda: read_records(paths["csv"], split="test"), "only a save_to_disk directory"),
        "unknown split": (lambda: read_records(paths["dict"], split="dev"), "no split 'dev' (splits: train, test)"),
        "split without splits": (lambda: read_records(paths["disk"], split="train"), "without splits"),
    }
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    cases["broken parquet"] = (lambda: read_records(tmp_path / "broken.parquet"), "cannot be read as PARQUET")
    (tmp_path / "dir").mkdir()
    cases["plain directory"] = (lambda: read_records(tmp_path / "dir"), "not a dataset saved with save_to_disk")
    (tmp_path / "bad.json").write_text("[1, 2]")
    cases["array of numbers"] = (lambda: read_records(tmp_path / "bad.json"), "item 0: expected a JSON object")
    (tmp_path / "cut.json").write_text('[{"text": "a"}, {"te')
    cases["cut json"] = (lambda: read_records(tmp_path / "cut.json"), "not valid JSON")
    for name, (call, message) in cases.items():
        with pytest.raises(LoraError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), name


def test_csv_cells_are_text_and_a_wrong_type_in_parquet_names_the_row(tmp_path):
    (tmp_path / "n.csv").write_text("prompt,completion\nhello,5\nNA,007\n")
    assert [r for _, r in read_records(tmp_path / "n.csv")] == [{"prompt": "hello", "completion": "5"},
                                                                 {"prompt": "NA", "completion": "007"}]
    datasets.Dataset.from_list([{"prompt": "a", "completion": 5}]).to_parquet(tmp_path / "n.parquet")
    where, record = read_records(tmp_path / "n.parquet")[0]
    with pytest.raises(LoraError, match=r"n.parquet row 0: 'completion' must be a string"):
        D.parse_record(record, where)


def test_train_and_eval_read_every_format_from_the_command_line(tmp_path, capsys):
    from cli_helpers import FAST
    from factory import save_tiny_llama

    from loraforge.cli import main

    paths, model = write_all(tmp_path), save_tiny_llama(tmp_path / "model")
    assert main(["train", "--model", str(model), "--data", str(paths["dict"]), "--split", "train", "--out",
                 str(tmp_path / "run"), "--max-steps", "2", "--val-fraction", "0", *FAST]) == 0
    assert main(["eval", "--model", str(model), "--adapter", str(tmp_path / "run"), "--data", str(paths["csv"]),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == len(ROWS)


@pytest.mark.parametrize("flags, message", [
    (["--columns", "prompt=question"], "no column 'question' (columns: prompt, completion)"),
    (["--split", "dev"], "only a save_to_disk directory has splits"),
])
def test_data_flag_mistakes_are_one_line_errors(tmp_path, capsys, flags, message):
    from factory import save_tiny_llama

    from loraforge.cli import main

    paths = write_all(tmp_path)
    assert main(["train", "--model", str(save_tiny_llama(tmp_path / "model")), "--data", str(paths["csv"]),
                 "--out", str(tmp_path / "o"), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and message in lines[-1] and not (tmp_path / "o").exists()
