"""The project's own demo tasks: small skills SmolLM2-135M-Instruct lacks and a LoRA adapter
learns in a few minutes of CPU training.

- ``extract``: structured extraction into an exact JSON format.
  "Extract the person as JSON: Maria Lopez is a 34-year-old pilot from Lisbon."
  -> ``{"name": "Maria Lopez", "age": 34, "job": "pilot", "city": "Lisbon"}``
- ``dates``: date reformatting into one fixed format.
  "Rewrite the date 2021-03-04 as day month year." -> ``4 March 2021``

- ``extract`` pairs, for preference tuning (DPO / ORPO): the same prompts, chosen = the answer on
  one line, rejected = the same JSON pretty-printed over several lines (a style, not a fact, to prefer).

Everything is deterministic in ``seed``. Train and test never share an item: every task
splits its item space (full names, calendar dates) into disjoint train and test halves by a
stable hash, so the test set measures generalisation rather than recall.

    python -m loraforge.demo.tasks --out data/extract --task extract --n-train 2000 --n-test 100
    python -m loraforge.demo.tasks --out data/prefs --pairs --n-train 400 --n-test 50
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import zlib
from pathlib import Path
from typing import Callable

from loraforge import LoraError

TEST_BUCKETS = 10  # one item in TEST_BUCKETS (by stable hash) is reserved for the test split

FIRST_NAMES = [
    "Maria", "James", "Aisha", "Chen", "Olga", "Pedro", "Fatima", "Liam", "Yuki", "Noah",
    "Sofia", "Ahmed", "Emma", "Ivan", "Priya", "Lucas", "Amara", "Mateo", "Ingrid", "Omar",
    "Hannah", "Kenji", "Zara", "Diego", "Elena", "Tariq", "Grace", "Mikhail", "Leila", "Oscar",
    "Nadia", "Samuel", "Chloe", "Rafael", "Anya", "Tomas", "Mei", "Victor", "Lena", "Kwame",
]
LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Wang", "Petrova", "Silva", "Haddad", "Murphy", "Tanaka", "Brown",
    "Rossi", "Hassan", "Schmidt", "Ivanov", "Patel", "Martin", "Okafor", "Garcia", "Larsen", "Farouk",
    "Weber", "Sato", "Ali", "Fernandez", "Novak", "Aziz", "Kelly", "Volkov", "Nasser", "Berg",
    "Dubois", "Cohen", "Moreau", "Costa", "Kowalski", "Horvat", "Lin", "Reyes", "Fischer", "Mensah",
]
JOBS = [
    "pilot", "teacher", "nurse", "engineer", "baker", "lawyer", "chef", "architect", "farmer",
    "journalist", "dentist", "electrician", "pharmacist", "librarian", "plumber", "photographer",
    "accountant", "carpenter", "surgeon", "translator", "firefighter", "painter", "mechanic",
    "economist", "gardener", "optician", "designer", "veterinarian", "tailor", "biologist",
]
CITIES = [
    "Lisbon", "Tokyo", "Nairobi", "Oslo", "Lima", "Cairo", "Toronto", "Madrid", "Seoul", "Dublin",
    "Berlin", "Mumbai", "Sydney", "Warsaw", "Bogota", "Accra", "Vienna", "Hanoi", "Denver", "Porto",
    "Kyoto", "Athens", "Quito", "Prague", "Manila", "Zurich", "Dakar", "Helsinki", "Austin", "Tunis",
]
# {name}, {first}, {age}, {job}, {a_job} ("a pilot" / "an engineer"), {city}
EXTRACT_TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as {a_job} in {city}.",
    "{city} is home to {name}, a {age}-year-old {job}.",
    "At {age}, {name} works as {a_job} in {city}.",
    "The {job} {name} ({age}) lives in {city}.",
    "{name}, aged {age}, is {a_job} based in {city}.",
    "In {city}, {age}-year-old {name} earns a living as {a_job}.",
    "{name} ({age}) is {a_job} living in {city}.",
    "{name} has lived in {city} for years; {first} is {age} and works as {a_job}.",
    "Name: {name}. City: {city}. Occupation: {job}. Age: {age}.",
    "{name} moved to {city} to work as {a_job}. {first} is {age} years old.",
    "Our {job} in {city} is {name}, who just turned {age}.",
    "Age {age}, from {city}: {name} is {a_job}.",
    "Working as {a_job} in {city}, {name} celebrated turning {age}.",
]
EXTRACT_INSTRUCTIONS = [
    "Extract the person as JSON: {sentence}",
    "Extract the person as JSON with keys name, age, job, city: {sentence}",
    "Return the person's details as JSON.\n{sentence}",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
# Input spellings of a date; the answer is always "4 March 2021" (day month year).
DATE_FORMATS: list[Callable[[datetime.date], str]] = [
    lambda d: d.isoformat(),                                   # 2021-03-04
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",           # 2021/03/04
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",      # March 4, 2021
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",           # 04.03.2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",   # Mar 4 2021
    lambda d: f"{d.year}{d.month:02d}{d.day:02d}",             # 20210304
]
DATE_INSTRUCTIONS = [
    "Rewrite the date {date} as day month year.",
    "Convert {date} to the format '4 March 2021'.",
    "Reformat this date as day, full month name, year: {date}",
]
FIRST_DATE = datetime.date(1950, 1, 1)
N_DAYS = (datetime.date(2049, 12, 31) - FIRST_DATE).days + 1


def _is_test_item(key: str) -> bool:
    """Stable (not salted like hash()) assignment of an item to the test split."""
    return zlib.crc32(key.encode("utf-8")) % TEST_BUCKETS == 0


def _in_split(key: str, split: str) -> bool:
    return split == "all" or _is_test_item(key) == (split == "test")


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def extract_item(rng: random.Random, split: str = "all") -> tuple[str, str]:
    """One (prompt, answer) pair of the extraction task; the full name decides the split."""
    while True:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        if _in_split(f"{first} {last}", split):
            break
    name, age, job, city = f"{first} {last}", rng.randint(18, 90), rng.choice(JOBS), rng.choice(CITIES)
    sentence = rng.choice(EXTRACT_TEMPLATES).format(
        name=name, first=first, age=age, job=job, a_job=_article(job), city=city)
    prompt = rng.choice(EXTRACT_INSTRUCTIONS).format(sentence=sentence)
    answer = json.dumps({"name": name, "age": age, "job": job, "city": city})
    return prompt, answer


def dates_item(rng: random.Random, split: str = "all") -> tuple[str, str]:
    """One (prompt, answer) pair of the date task; the calendar date decides the split."""
    while True:
        day = FIRST_DATE + datetime.timedelta(days=rng.randrange(N_DAYS))
        if _in_split(day.isoformat(), split):
            break
    shown = rng.choice(DATE_FORMATS)(day)
    prompt = rng.choice(DATE_INSTRUCTIONS).format(date=shown)
    return prompt, f"{day.day} {MONTHS[day.month - 1]} {day.year}"


TASKS: dict[str, Callable[[random.Random, str], tuple[str, str]]] = {
    "extract": extract_item,
    "dates": dates_item,
}


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def make_examples(n: int, seed: int = 0, task: str = "extract", split: str = "all") -> list[dict]:
    """n distinct chat-format examples of ``task``; ``split`` is "all", "train" or "test"."""
    if task not in TASKS:
        raise LoraError(f"unknown demo task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in ("all", "train", "test"):
        raise LoraError(f"unknown split {split!r}; choose all, train or test")
    rng = random.Random(f"{task}:{split}:{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    for _ in range(20 * n + 100):  # the item spaces are far larger than any sensible n
        if len(out) == n:
            break
        prompt, answer = TASKS[task](rng, split)
        if prompt not in seen:
            seen.add(prompt)
            out.append(_chat(prompt, answer))
    if len(out) < n:
        raise LoraError(f"demo task {task!r} could only make {len(out)} distinct examples, asked {n}")
    return out


def pair_of(row: dict) -> dict:
    """A preference row from an ``extract`` example: chosen one-line JSON, rejected the same
    object pretty-printed (TRL's standard prompt / chosen / rejected form)."""
    prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    return {"prompt": prompt, "chosen": answer, "rejected": json.dumps(json.loads(answer), indent=2)}


def make_pairs(n: int, seed: int = 0, split: str = "all") -> list[dict]:
    """n preference rows over the ``extract`` task's items (the same items as make_examples)."""
    return [pair_of(row) for row in make_examples(n, seed, "extract", split)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_splits(out_dir: str | Path, n_train: int = 2000, n_test: int = 100, seed: int = 0,
                 task: str = "extract") -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (disjoint items) into out_dir; return their paths."""
    train = make_examples(n_train, seed, task, split="train")
    test = make_examples(n_test, seed, task, split="test")
    train_prompts = {row["messages"][0]["content"] for row in train}
    assert not train_prompts & {row["messages"][0]["content"] for row in test}, "train/test overlap"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["test"], test)
    return paths


def write_pair_splits(out_dir: str | Path, n_train: int = 400, n_test: int = 50, seed: int = 0) -> dict[str, Path]:
    """``train.jsonl`` and ``test.jsonl`` of extract preference pairs (disjoint items) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    _write_jsonl(paths["train"], make_pairs(n_train, seed, "train"))
    _write_jsonl(paths["test"], make_pairs(n_test, seed, "test"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.demo.tasks",
                                     description="write train.jsonl and test.jsonl of a demo task")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--task", default="extract", choices=sorted(TASKS))
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", action="store_true", help="extract preference pairs (prompt, chosen, rejected)")
    args = parser.parse_args(argv)
    try:
        paths = (write_pair_splits(args.out, args.n_train, args.n_test, args.seed) if args.pairs
                 else write_splits(args.out, args.n_train, args.n_test, args.seed, args.task))
    except LoraError as err:
        print(f"demotask: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.n_train} train examples to {paths['train']}")
    print(f"wrote {args.n_test} test examples to {paths['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
