"""The command line: parse arguments, call one function, print. Nothing else lives here.

Each command has an ``add_<name>`` function that declares its flags and names the function
that runs it (``loraforge.<module>.<function>(args)``), imported lazily so that
``loraforge estimate`` does not pay for importing the training or serving stack.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from loraforge import LoraError


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
    p.set_defaults(func=_run("estimate:cli_estimate"))


def add_demo(sub):
    p = sub.add_parser("demo", help="attach, merge, save and reload an adapter on a tiny model")
    p.add_argument("--out", default="out/demo-adapter")
    p.set_defaults(func=_run("demo:cli_demo"))


def _model_flag(p):
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="local transformers directory, hub id, or the embedded default")


def add_train(sub):
    p = sub.add_parser("train", help="fine-tune a LoRA adapter on a JSONL file")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="JSONL: chat, alpaca, prompt/completion or text rows")
    p.add_argument("--out", default=None, help="output directory (adapter, metrics.jsonl, loss.png)")
    p.add_argument("--config", default=None, help="YAML recipe (file or bundled name); flags override it")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--targets", help="all-linear | attention | mlp | comma list of module names")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="packed rows per optimizer step")
    p.add_argument("--grad-accum", dest="grad_accum", type=int)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="tokens per packed row")
    p.add_argument("--max-len", dest="max_len", type=int, help="an example is cut to this many tokens")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "bf16-base"])
    p.add_argument("--device")
    p.add_argument("--quantize", choices=["nf4", "int8"])
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=True)
    p.add_argument("--dora", dest="use_dora", action="store_const", const=True)
    p.add_argument("--rslora", dest="use_rslora", action="store_const", const=True)
    p.add_argument("--loraplus-ratio", dest="loraplus_ratio", type=float, help="LoRA+: lr of B = lr x ratio")
    p.add_argument("--train-on-prompt", dest="train_on_prompt", action="store_const", const=True)
    p.add_argument("--val-fraction", dest="val_fraction", type=float)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--resume", action="store_const", const=True, help="continue from the last checkpoint in --out")
    p.add_argument("--nproc", type=int, help="data-parallel processes (torch.distributed)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.set_defaults(func=_run("train:cli_train"))


def add_eval(sub):
    p = sub.add_parser("eval", help="loss, perplexity and exact match of a base model or an adapter")
    _model_flag(p)
    p.add_argument("--adapter", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=_run("evaluate:cli_eval"))


def add_merge(sub):
    p = sub.add_parser("merge", help="fold an adapter into the base weights: a standalone model")
    _model_flag(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", help="dtype of the merged weights")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=_run("evaluate:cli_merge"))


def add_generate(sub):
    p = sub.add_parser("generate", help="complete a prompt (greedy by default)")
    _model_flag(p)
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="apply the chat template (default: raw text)")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None)
    p.set_defaults(func=_run("evaluate:cli_generate"))


COMMANDS = [add_estimate, add_train, add_eval, add_merge, add_generate, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
