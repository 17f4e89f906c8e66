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


GEN_TASK = "loraforge_tiny_gen"


def write_generate_task(root) -> str:
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": c[a]}) + "\n" for q, c, a in ITEMS))
    (root / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"<|im_end|>\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0.0\n"
        "metric_list:\n  - metric: exact_match\n")
    return str(root)


def generations(results: dict) -> dict[int, str]:
    return {s["doc_id"]: s["resps"][0][0] for s in results["samples"][GEN_TASK]}


def test_lm_eval_generate_until_is_the_same_through_completions_chat_and_in_process(tmp_path):
    """Greedy generations of a generate_until task: local-completions == hf on the raw prompt, and
    local-chat-completions == hf with the chat template applied."""
    from lm_eval.tasks import TaskManager

    paths = shared_setup()
    task_dir = write_generate_task(tmp_path)
    tasks = TaskManager(include_path=task_dir)

    def run(model: str, model_args: dict, chat: bool) -> dict[int, str]:
        return generations(lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[GEN_TASK], batch_size=1,
                                                   log_samples=True, task_manager=tasks, apply_chat_template=chat))

    state = build_state(str(paths["base"]), str(paths["adapters"]), max_batch=8, max_loaded=2, served_name="tiny-base")
    common = {"model": ADAPTER, "tokenizer_backend": "huggingface", "tokenizer": str(paths["base"]),
              "max_length": CONTEXT, "num_concurrent": 1, "max_retries": 1}
    with ServerThread(create_app(state)) as server:
        completions = run("local-completions", {**common, "base_url": f"{server.url}/v1/completions"}, chat=False)
        chat = run("local-chat-completions", {**common, "base_url": f"{server.url}/v1/chat/completions"}, chat=True)
    local = {"pretrained": str(paths["base"]), "peft": str(paths["adapters"] / ADAPTER), "device": "cpu",
             "dtype": "float32", "max_length": CONTEXT}
    assert completions == run("hf", local, chat=False)
    assert chat == run("hf", local, chat=True)
    assert len(completions) == len(ITEMS) and any(completions.values())


@pytest.mark.slow
def test_lm_eval_through_the_server_on_the_embedded_model(tmp_path):
    """The same equality on the embedded SmolLM2-135M-Instruct with an adapter saved by PEFT."""
    from factory import randomize_adapters
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from loraforge.models import ensure_default_model, load_model

    base = ensure_default_model()
    peft_model = get_peft_model(load_model(base, dtype="float32"),
                                PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(peft_model, seed=2, std=0.02)
    peft_model.save_pretrained(str(tmp_path / "adapters" / "smol"))
    task_dir = write_task(tmp_path)
    state = build_state(str(base), str(tmp_path / "adapters"), max_batch=8, max_loaded=2, served_name="smol-base",
                        dtype="float32")
    with ServerThread(create_app(state)) as server:
        served = evaluate(task_dir, "local-completions", {
            "base_url": f"{server.url}/v1/completions", "model": "smol", "tokenizer_backend": "huggingface",
            "tokenizer": str(base), "max_length": 512, "num_concurrent": 1, "max_retries": 1})
    local = evaluate(task_dir, "hf", {"pretrained": str(base), "peft": str(tmp_path / "adapters" / "smol"),
                                      "device": "cpu", "dtype": "float32", "max_length": 512})
    got, want = loglikelihoods(served), loglikelihoods(local)
    assert max(abs(a - b) for doc in want for a, b in zip(got[doc], want[doc], strict=True)) < 1e-4
    assert served["results"][TASK]["acc,none"] == local["results"][TASK]["acc,none"]
