"""The command line: parse arguments and hand them to one handler. Nothing else lives here.

Results go to stdout (what a command was asked for: a table, a JSON line, generated text);
progress and status messages from the library's ``logging`` go to stderr, like the progress bars.

Each command has an ``add_<name>`` function that declares its flags and names the handler that
runs it (``loraforge.<module>.cli_<name>(args)``, next to the library code it calls: the handler
calls the library and prints what it returns), imported lazily so that
``loraforge estimate`` does not pay for importing the training or serving stack.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loraforge import LoraError
from loraforge.models.embedded import DEFAULT_MODEL  # no torch import: `loraforge --help` stays quick


def _run(target: str):
    """Return a handler that imports ``module:function`` on use and calls it with args."""

    def handler(args):
        module, func = target.split(":")
        return getattr(importlib.import_module(f"loraforge.{module}"), func)(args)

    return handler


def add_estimate(sub):
    p = sub.add_parser("estimate", help="count trainable parameters and memory before training")
    p.add_argument("--model", default="smollm2-135m", help="model directory (config.json) or a shape preset")
    p.add_argument("--rank", "-r", type=int, default=8)
    p.add_argument("--targets", default="all-linear", help="all-linear | attention | mlp | comma list of module names")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the frozen base weights")
    p.add_argument("--optimizer", default="adamw", help="adamw | adamw8bit | sgd")
    p.add_argument("--quantize", default=None, choices=[None, "nf4", "int8"], help="4-bit / 8-bit base weights")
    p.add_argument("--adapter-dtype", default="float32", help="dtype of the trainable adapter weights")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="GPU memory in GiB: print whether the run fits, and the margin")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run("tools.estimate:cli_estimate"))


def add_demo(sub):
    p = sub.add_parser("demo", help="score, fine-tune and re-score the embedded model on the demo task")
    _model_flag(p)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--task", default="extract", help="demo task (loraforge.demo.tasks.TASKS)")
    p.add_argument("--n-train", dest="n_train", type=int, default=2000)
    p.add_argument("--n-test", dest="n_test", type=int, default=100)
    p.add_argument("--max-steps", dest="max_steps", type=int, default=0, help="0: the recipe's epochs")
    p.set_defaults(func=_run("demo.run:cli_demo"))


def _model_flag(p):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local transformers directory, hub id, or the embedded default")


def _inference_flags(p):
    """--model, --adapter and --quantize: the base and adapter that eval and generate run."""
    _model_flag(p)
    p.add_argument("--adapter", default=None, help="adapter directory (ours or PEFT's)")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None, help="4-bit / 8-bit base weights")


def _base_weights_flag(p):
    p.add_argument("--base-weights", dest="base_weights", default="auto", choices=["auto", "original", "dequantized"],
                   help="merge into the original float weights, or into the dequantized 4-/8-bit weights an adapter "
                        "was trained over (auto: dequantized when its train_config.yaml records --quantize)")


def _output_flags(p, what: str):
    """--out (required) and --force: what a command that writes a model or file must be told."""
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--force", action="store_true", help="overwrite an existing, non-empty --out")


def add_train(sub):
    from loraforge.train.config import add_arguments

    p = sub.add_parser("train", help="fine-tune a LoRA adapter on a JSONL file")
    p.add_argument("--config", default=None, help="YAML recipe (file or bundled name); flags override it")
    add_arguments(p)  # one flag per TrainConfig field
    p.set_defaults(func=_run("train.loop:cli_train"))


def add_eval(sub):
    p = sub.add_parser("eval", help="loss, perplexity and exact match of a base model or an adapter")
    _inference_flags(p)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=_run("eval.score:cli_eval"))


def add_merge(sub):
    p = sub.add_parser("merge", help="fold an adapter into the base weights: a standalone model")
    _model_flag(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--dtype", default="float32", help="dtype of the merged weights")
    _base_weights_flag(p)
    _output_flags(p, "output directory of the merged model")
    p.set_defaults(func=_run("tools.merge:cli_merge"))


def add_generate(sub):
    p = sub.add_parser("generate", help="complete a prompt (greedy by default)")
    _inference_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="apply the chat template (default: raw text)")
    p.set_defaults(func=_run("models.generate:cli_generate"))


def add_inspect(sub):
    p = sub.add_parser("inspect", help="per-module norms, singular values and effective rank of an adapter")
    p.add_argument("adapter", help="adapter directory (loraforge or PEFT format)")
    p.add_argument("--model", default=None, help="base model: also print ||dW|| / ||W|| per module")
    p.add_argument("--plot", default=None, help="write a heat map PNG (layers x module types) of ||dW||")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run("tools.inspect:cli_inspect"))


def add_resize(sub):
    p = sub.add_parser("resize", help="shrink an adapter to a lower rank by truncated SVD")
    p.add_argument("adapter", help="adapter directory (loraforge or PEFT format)")
    p.add_argument("--rank", "-r", type=int, default=None, help="new rank (capped at the adapter's rank)")
    p.add_argument("--energy", type=float, default=None,
                   help="per module, the smallest rank keeping this fraction of sum(sigma^2), e.g. 0.99")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.set_defaults(func=_run("tools.resize:cli_resize"))


def add_combine(sub):
    p = sub.add_parser("combine", help="combine adapters into one (cat, svd, ties, dare)")
    p.add_argument("adapters", nargs="+", help="adapter directories (same base model and targets)")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per adapter (default 1)")
    p.add_argument("--method", default="cat", choices=["cat", "svd", "ties", "dare"])
    p.add_argument("--rank", "-r", type=int, default=None,
                   help="rank of the result for svd/ties/dare (default: sum of ranks, capped by the matrix size)")
    p.add_argument("--density", type=float, default=0.5, help="ties: fraction kept; dare: keep probability")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    p.add_argument("--allow-different-targets", action="store_true",
                   help="combine adapters of different module sets (a missing module counts as dW = 0)")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.set_defaults(func=_run("tools.combine:cli_combine"))


def add_sweep(sub):
    p = sub.add_parser("sweep", help="train several targets:rank configurations on the same data and compare")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--configs", required=True, help="comma list of targets:rank, e.g. attention:16,all-linear:8 "
                                                    "(join module names with +: q_proj+v_proj:8)")
    p.add_argument("--budget-from", dest="budget_from", default=None,
                   help="reference targets:rank for the parameter ratio (default: the first config)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per configuration")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--eval-data", dest="eval_data", default=None,
                   help="JSONL to score on (default: the validation split held out of --data)")
    p.add_argument("--eval-limit", dest="eval_limit", type=int, default=0, help="score only the first N rows")
    p.add_argument("--out", default="out/sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="tokens per packed row")
    p.set_defaults(func=_run("tools.sweep:cli_sweep"))


def add_serve(sub):
    p = sub.add_parser("serve", help="serve the base model and many adapters over an OpenAI-compatible API")
    _model_flag(p)
    p.add_argument("--adapters", default=None, help="directory whose subdirectories are adapters, served by name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-loaded", dest="max_loaded", type=int, default=8, help="adapters kept in memory (LRU)")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=256,
                   help="requests waiting for a batch slot before new ones get 429")
    p.add_argument("--api-key", dest="api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--merge", default=None, metavar="NAME",
                   help="fold adapter NAME into the base weights and serve only it (single tenant)")
    p.add_argument("--allow-root", dest="allow_root", action="append", metavar="PATH",
                   help="directory from which /v1/load_lora_adapter may load adapters (repeatable)")
    p.add_argument("--served-model-name", dest="served_model_name", default=None,
                   help="the base model's name in the API (default: --model)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=8 * 2**20,
                   help="refuse request bodies larger than this many bytes with 413 (default 8 MiB)")
    p.add_argument("--prefix-cache-mb", dest="prefix_cache_mb", type=float, default=None,
                   help="MiB of prompt KV kept for reuse by later prompts on the same adapter (LRU, default 512); "
                        "0 disables")
    p.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, default=None,
                   help="prefill prompts longer than this many tokens in pieces of this size, one per step, "
                        "between decode steps (default 512); 0 prefills every prompt whole")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--log-level", dest="log_level", default="info")
    p.set_defaults(func=_run("serve.server:cli_serve"))


def add_export(sub):
    p = sub.add_parser("export", help="write an adapter, a merged model or the base as GGUF (llama.cpp, Ollama)")
    p.add_argument("--adapter", default=None, help="adapter directory (omit to export the base model alone)")
    _model_flag(p)
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--merged", action="store_true", help="fold the adapter into the base: one standalone model")
    p.add_argument("--dtype", default="f32", help="f32 | f16 | bf16 | q8_0 (q8_0: model files only)")
    p.add_argument("--ollama", action="store_true", help="also write a Modelfile next to --out")
    _base_weights_flag(p)
    p.add_argument("--base-gguf", dest="base_gguf", default=None,
                   help="with --ollama and an adapter: the base GGUF to name in FROM (default: export it)")
    _output_flags(p, "output .gguf file")
    p.set_defaults(func=_run("tools.export:cli_export"))


COMMANDS = [add_estimate, add_train, add_eval, add_merge, add_generate, add_demo, add_serve]
COMMANDS += [add_inspect, add_resize, add_combine, add_sweep, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


class _StatusToStderr(logging.Handler):
    """Each loraforge log record as one plain line on the current sys.stderr."""

    def emit(self, record: logging.LogRecord):
        print(self.format(record), file=sys.stderr, flush=True)


def route_status_messages():
    """Send the library's INFO messages to stderr (once per process; a library user who
    imports loraforge configures logging as they like instead)."""
    logger = logging.getLogger("loraforge")
    if not any(isinstance(h, _StatusToStderr) for h in logger.handlers):
        logger.addHandler(_StatusToStderr())
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    route_status_messages()
    try:
        result = args.func(args)
    except LoraError as err:
        print(f"loraforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraforge {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
