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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run("estimate:cli_estimate"))


def add_demo(sub):
    p = sub.add_parser("demo", help="attach, merge, save and reload an adapter on a tiny model")
    p.add_argument("--out", default="out/demo-adapter")
    p.set_defaults(func=_run("demo:cli_demo"))


COMMANDS = [add_estimate, add_demo]


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
