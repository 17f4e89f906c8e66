"""lm-evaluation-harness scores an adapter through the server exactly as it scores it in process:
a local multiple-choice task (a JSONL file and a task YAML, nothing from the hub) run with
`local-completions` against `/v1/completions` and with `hf` + `peft` on the same files gives
the same loglikelihood for every choice of every item, and the same accuracy."""
from __future__ import annotations

import json

import pytest
from serve_fixture import CONTEXT, ServerThread, shared_setup

from loraforge.serve.api import create_app
from loraforge.serve.server import build_state

lm_eval = pytest.importorskip("lm_eval")  # the `test` extra installs it

ADAPTER = "gamma"  # saved by PEFT, so that lm-eval's `peft=` loads it as it is
TASK = "loraforge_tiny_mc"
ITEMS = [
    ("What is the capital of France?", ["Paris", "London", "Rome"], 0),
    ("The quick brown fox jumps over the", ["lazy dog", "sea", "wind"], 0),
    ("Translate to French: good morning.", ["Hello", "Bonjour", "Paris"], 1),
    ("Write a haiku about the", ["sea and the wind", "capital of France", "lazy dog"], 0),
    ("Low-rank adaptation trains two small", ["matrices", "dogs", "points"], 0),
    ("Summarise the text below, then list three key", ["words", "points", "foxes"], 1),
]


def write_task(root) -> str:
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    return str(root)


def evaluate(task_dir: str, model: str, model_args: dict) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], batch_size=1,
                                   log_samples=True, task_manager=TaskManager(include_path=task_dir))


def loglikelihoods(results: dict) -> dict[int, list[float]]:
    """doc id -> the loglikelihood of each of its choices."""
    return {s["doc_id"]: [resp[0][0] for resp in s["resps"]] for s in results["samples"][TASK]}


def test_lm_eval_scores_through_the_server_as_in_process(tmp_path):
    paths = shared_setup()
    task_dir = write_task(tmp_path)
    state = build_state(str(paths["base"]), str(paths["adapters"]), max_batch=8, max_loaded=2,
                        served_name="tiny-base")
    with ServerThread(create_app(state)) as server:
        def through_server(model: str) -> dict:
            return evaluate(task_dir, "local-completions", {
                "base_url": f"{server.url}/v1/completions", "model": model, "tokenizer_backend": "huggingface",
                "tokenizer": str(paths["base"]), "max_length": CONTEXT, "num_concurrent": 1, "max_retries": 1})

        served, base = through_server(ADAPTER), through_server("tiny-base")
    local = evaluate(task_dir, "hf", {"pretrained": str(paths["base"]), "peft": str(paths["adapters"] / ADAPTER),
                                      "device": "cpu", "dtype": "float32", "max_length": CONTEXT})
    got, want = loglikelihoods(served), loglikelihoods(local)
    assert sorted(got) == list(range(len(ITEMS))) and sorted(want) == sorted(got)
    diffs = [abs(a - b) for doc in want for a, b in zip(got[doc], want[doc], strict=True)]
    assert len(diffs) == sum(len(choices) for _, choices, _ in ITEMS)
    assert max(diffs) < 1e-4, max(diffs)
    base_ll = loglikelihoods(base)  # the adapter matters: both sides really apply it
    assert max(abs(a - b) for doc in want for a, b in zip(base_ll[doc], want[doc])) > 1e-2
    assert served["results"][TASK]["acc,none"] == local["results"][TASK]["acc,none"]
    print(f"lm-eval: max per-choice |loglikelihood diff| = {max(diffs):.2e}, "
          f"acc = {served['results'][TASK]['acc,none']}")
