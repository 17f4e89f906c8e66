"""loraforge.demo.tasks: deterministic, well-formed, disjoint train/test splits."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import loraforge
from loraforge import LoraError
from loraforge.data import load_examples
from loraforge.demo.tasks import (
    CITIES, EXTRACT_TEMPLATES, JOBS, TASKS, main, make_examples, write_splits,
)


def prompts_and_answers(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_chat_rows(task):
    rows = make_examples(50, seed=7, task=task)
    assert rows == make_examples(50, seed=7, task=task)
    assert rows != make_examples(50, seed=8, task=task)
    assert len({p for p, _ in prompts_and_answers(rows)}) == 50  # no duplicate prompts
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])


def test_extract_answers_are_exact_json_of_the_sentence():
    for prompt, answer in prompts_and_answers(make_examples(300, seed=1)):
        person = json.loads(answer)
        assert list(person) == ["name", "age", "job", "city"]
        assert answer == json.dumps(person)  # one canonical spelling
        assert isinstance(person["age"], int) and 18 <= person["age"] <= 90
        assert person["job"] in JOBS and person["city"] in CITIES
        for value in person.values():
            assert str(value) in prompt
        assert len(answer) < 100  # short answers keep training fast


def test_extract_uses_many_templates():
    assert len(EXTRACT_TEMPLATES) >= 10
    prompts = [p for p, _ in prompts_and_answers(make_examples(600, seed=2))]
    used = set()
    for template in EXTRACT_TEMPLATES:
        pattern = re.escape(template)
        for key in ("name", "first", "age", "job", "a_job", "city"):
            pattern = pattern.replace(re.escape("{" + key + "}"), ".+?")
        if any(re.search(pattern, p) for p in prompts):
            used.add(template)
    assert used == set(EXTRACT_TEMPLATES)
    assert any("an engineer" in p for p in prompts) and not any("a engineer" in p for p in prompts)


def test_dates_answers_are_one_format():
    for prompt, answer in prompts_and_answers(make_examples(300, seed=1, task="dates")):
        assert re.fullmatch(r"[1-9]\d? [A-Z][a-z]+ \d{4}", answer)
        day = datetime.datetime.strptime(answer, "%d %B %Y").date()
        assert str(day.year) in prompt
        iso = re.search(r"\d{4}-\d{2}-\d{2}", prompt)
        if iso:
            assert iso.group() == day.isoformat()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_write_splits_disjoint(tmp_path, task):
    paths = write_splits(tmp_path, n_train=300, n_test=40, seed=3, task=task)
    train, test = (load_examples(paths[k]) for k in ("train", "test"))  # valid loraforge data
    assert (len(train), len(test)) == (300, 40)
    assert not {ex.messages[0]["content"] for ex in train} & {ex.messages[0]["content"] for ex in test}
    if task == "extract":  # held-out people: no full name appears in both splits
        def names(exs):
            return {json.loads(ex.answer)["name"] for ex in exs}
    else:  # held-out calendar dates
        def names(exs):
            return {ex.answer for ex in exs}
    assert not names(train) & names(test)
    assert write_splits(tmp_path / "again", 300, 40, seed=3, task=task)["test"].read_text() == \
        paths["test"].read_text()


def test_unknown_task_and_cli(tmp_path, capsys):
    with pytest.raises(LoraError, match="unknown demo task 'poems'"):
        make_examples(3, task="poems")
    assert main(["--out", str(tmp_path), "--task", "dates", "--n-train", "30", "--n-test", "5", "--seed", "1"]) == 0
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 30
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 5
    assert "wrote 30 train examples" in capsys.readouterr().out


def test_module_runs_as_a_command(tmp_path):
    src = str(Path(loraforge.__file__).parents[1])  # works installed or from a checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "loraforge.demo.tasks", "--out", str(tmp_path / "d"), "--n-train", "20", "--n-test", "4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(load_examples(tmp_path / "d" / "train.jsonl")) == 20
    bad = subprocess.run(cmd[:3] + ["--out", str(tmp_path / "e"), "--task", "poems"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'poems'" in bad.stderr
