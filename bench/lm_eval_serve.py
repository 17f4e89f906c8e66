"""lm-evaluation-harness through `loraforge serve`: the demo adapter against the base model.

Trains the demo adapter (or takes --adapter), writes the demo task's held-out people as a local
lm-eval `generate_until` task (exact match of the JSON answer, the chat template applied), starts
`loraforge serve` on 127.0.0.1 and runs lm-eval's `local-chat-completions` model against it for
the base model and for the adapter. Prints a markdown table and the command lines used.

    .venv/bin/python bench/lm_eval_serve.py --steps 30 --limit 40
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loraforge.models.embedded import DEFAULT_MODEL, ensure_default_model

TASK = "loraforge_demo_extract"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_adapter(root: Path, steps: int) -> Path:
    from loraforge.demo.tasks import write_splits

    splits = write_splits(root / "data", n_train=2000, n_test=100, task="extract")
    out = root / "adapters" / "demo"
    subprocess.run([sys.executable, "-m", "loraforge", "train", "--config", "demo", "--data", str(splits["train"]),
                    "--out", str(out), "--max-steps", str(steps), "--no-progress"], check=True)
    return out


def write_task(root: Path, limit: int) -> Path:
    from loraforge.demo.tasks import write_splits

    splits = write_splits(root / "task-data", n_train=10, n_test=max(limit, 10), task="extract")
    rows = [json.loads(line) for line in splits["test"].read_text().splitlines()][:limit]
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps({"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]})
                             + "\n" for r in rows))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {items}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"<|im_end|>\"]\n  max_gen_toks: 64\n  do_sample: false\n  temperature: 0.0\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def serve(adapters: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", "--adapters", str(adapters),
                                "--port", str(port), "--log-level", "warning"])
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(1)
    process.terminate()
    raise RuntimeError("loraforge serve did not start")


def evaluate(task_dir: Path, port: int, model: str) -> tuple[float, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    began = time.perf_counter()
    args = {"model": model, "base_url": f"http://127.0.0.1:{port}/v1/chat/completions",
            "tokenizer_backend": "huggingface", "tokenizer": str(ensure_default_model()), "num_concurrent": 4,
            "max_retries": 1}
    results = lm_eval.simple_evaluate(model="local-chat-completions", model_args=args, tasks=[TASK],
                                      apply_chat_template=True, task_manager=TaskManager(include_path=str(task_dir)))
    return results["results"][TASK]["exact_match,none"], time.perf_counter() - began


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="a trained demo adapter (default: train one)")
    parser.add_argument("--steps", type=int, default=30, help="training steps when no --adapter is given")
    parser.add_argument("--limit", type=int, default=40, help="held-out people scored")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="lm-eval-serve-"))
    if args.adapter:
        # a copy: the server refuses files that resolve outside its adapters directory
        shutil.copytree(args.adapter, root / "adapters" / "demo", ignore=shutil.ignore_patterns("checkpoints"))
    else:
        train_adapter(root, args.steps)
    task_dir, port = write_task(root / "task", args.limit), free_port()
    server = serve(root / "adapters", port)
    try:
        rows = [(name, *evaluate(task_dir, port, name)) for name in (DEFAULT_MODEL, "demo")]
    finally:
        server.terminate()
        server.wait(60)
    print(f"| model (through loraforge serve) | exact match on {args.limit} held-out people | seconds |")
    print("|---|---|---|")
    for name, em, seconds in rows:
        print(f"| {name} | {100 * em:.1f}% | {seconds:.0f} |")
    print(f"\nlm_eval --model local-chat-completions --apply_chat_template --include_path {task_dir} --tasks {TASK} "
          f"--model_args model=demo,base_url=http://127.0.0.1:PORT/v1/chat/completions,tokenizer_backend=huggingface,"
          f"tokenizer={ensure_default_model()},num_concurrent=4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
