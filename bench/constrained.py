"""Benchmark constrained decoding's per-token mask cost (not a test). Prints a markdown table.

For a JSON schema (an object with an enum, an integer, a boolean and an array of short strings),
B rows each follow a different valid document token by token (teacher-forced: the tokens are
the document's, the logits random), and each step every row (1) has its grammar fill its token
bitmask, (2) gets the mask applied to its logits (loraforge's apply, the same for every library)
and (3) advances with its token. That is the work structured output adds to a decode step; the
forward pass is not included. Columns: ms per token (step time / rows) and ms per decode step
(all rows), at batch 1 and 16, for the library loraforge uses (llguidance, through
serve.constrain: exactly the serving path) and, when installed, xgrammar and outlines-core;
compile: ms to compile the schema for the tokenizer (first time, before any cache); valid
outputs: of random rollouts (random logits, tokens sampled under the library's mask), how many
parse and match the schema (jsonschema), and how many reached the grammar's end.

Tokenizers: the tiny test tokenizer (512 tokens) and SmolLM2's (49,152; the embedded default
model's, loaded once: a while on first use).

    .venv/bin/python bench/constrained.py            # both tokenizers, 16 documents each
    .venv/bin/python bench/constrained.py --quick    # the tiny tokenizer, 3 rounds: a smoke run
    .venv/bin/python bench/constrained.py --clock cpu --rounds 9   # on a busy machine
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from loraforge.serve.constrain import Constraint, GrammarCompiler, apply_bitmask  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by --clock

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo", "Reykjavik"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 100000},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["city", "count", "ok", "tags"],
    "additionalProperties": False,
}
WORDS = ["alpha", "beta", "sea", "wind", "haiku", "lora", "rank", "fox", "capital", "night"]


def documents(n: int, seed: int = 0) -> list[str]:
    """n different valid documents, written as the constrained grammar writes them (compact)."""
    rng = random.Random(seed)
    return [json.dumps({"city": rng.choice(SCHEMA["properties"]["city"]["enum"]), "count": rng.randrange(100000),
                        "ok": rng.random() < 0.5, "tags": rng.sample(WORDS, rng.randrange(5))})
            for _ in range(n)]


# --- one adapter per library: make(tokenizer, vocab, eos) -> (compile(schema) -> new_row() -> Row) --------
class LlguidanceRows:
    """loraforge's own path (serve.constrain)."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, eos: int):
        self.compiler = GrammarCompiler(tokenizer, vocab, [eos])

    def compile(self, schema):
        grammar = self.compiler.compile(Constraint("json_schema", schema))
        return grammar.matcher

    @staticmethod
    def mask(row, logits: torch.Tensor) -> torch.Tensor:
        return row.mask(logits)

    @staticmethod
    def accept(row, token: int) -> bool:
        row.accept(token)
        return row.ended


class XgrammarRows:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, eos: int):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

        def new_row():
            return self.xgr.GrammarMatcher(compiled), self.xgr.allocate_token_bitmask(1, self.vocab)
        return new_row

    @staticmethod
    def mask(row, logits: torch.Tensor) -> torch.Tensor:
        matcher, bitmask = row
        matcher.fill_next_token_bitmask(bitmask, 0)
        return apply_bitmask(logits, bitmask[0])

    @staticmethod
    def accept(row, token: int) -> bool:
        if not row[0].accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")
        return row[0].is_terminated()


class OutlinesRows:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int, eos: int):
        import outlines_core

        self.oc, self.vocab, self.eos = outlines_core, vocab, eos
        pieces: dict[str, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for token, index in tokenizer.get_vocab().items():
            if index not in special:
                pieces.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(index)
        self.vocabulary = outlines_core.Vocabulary(eos, pieces)

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        index = self.oc.Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern="[ ]?"), self.vocabulary)

        def new_row():
            return self.oc.Guide(index), torch.full((1, (self.vocab + 31) // 32), -1, dtype=torch.int32)
        return new_row

    @staticmethod
    def mask(row, logits: torch.Tensor) -> torch.Tensor:
        guide, bitmask = row
        guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
        return apply_bitmask(logits, bitmask[0])

    def accept(self, row, token: int) -> bool:
        if token == self.eos and row[0].is_finished():  # a finished guide has no state for eos
            return True
        row[0].advance(token)
        return False


LIBRARIES = [LlguidanceRows, XgrammarRows, OutlinesRows]


def measure(rows_of, new_row, docs: list[list[int]], batch: int, vocab: int, rounds: int) -> tuple[float, float]:
    """(ms per token, ms per step): `batch` rows through their documents, the median of `rounds`
    (after one untimed round: lazily built lexer states and caches are warm, as in a server)."""
    per_token, per_step = [], []
    logits = torch.randn(batch, vocab)
    for r in range(-1, rounds):
        group = [docs[(r * batch + i) % len(docs)] for i in range(batch)]
        rows = [new_row() for _ in group]
        tokens = steps = 0
        start = clock()
        for t in range(max(len(d) for d in group)):
            live = [i for i, d in enumerate(group) if t < len(d)]
            for i in live:
                rows_of.mask(rows[i], logits[i])
                rows_of.accept(rows[i], group[i][t])
            tokens, steps = tokens + len(live), steps + 1
        seconds = clock() - start
        if r < 0:
            continue
        per_token.append(seconds / tokens * 1e3)
        per_step.append(seconds / steps * 1e3)
    return statistics.median(per_token), statistics.median(per_step)


def valid_share(rows_of, new_row, tokenizer, vocab: int, eos: int, samples: int, limit: int = 200) -> str:
    """How many of `samples` rollouts (random logits, tokens sampled under the mask: what a
    weak model does) end within `limit` tokens as text that parses and matches SCHEMA."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    gen, valid, ended = torch.Generator().manual_seed(0), 0, 0
    for _ in range(samples):
        row, tokens, done = new_row(), [], False
        while not done and len(tokens) < limit:
            masked = rows_of.mask(row, torch.randn(vocab, generator=gen) * 3)
            token = int(torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=gen))
            done = rows_of.accept(row, token) or token == eos
            tokens.append(token)
        ended += done
        try:
            value = json.loads(tokenizer.decode([t for t in tokens if t != eos]))
            if jsonschema is not None:
                jsonschema.validate(value, SCHEMA)
            valid += 1
        except Exception:  # noqa: BLE001 - any parse or schema failure counts as invalid
            pass
    return f"{valid}/{samples} ({ended} ended)"


def tokenizers(quick: bool):
    from factory import tiny_tokenizer

    yield "tiny (512)", tiny_tokenizer()
    if not quick:
        from loraforge.models import DEFAULT_MODEL, load_tokenizer

        tokenizer = load_tokenizer(DEFAULT_MODEL)
        yield f"SmolLM2 ({len(tokenizer):,})", tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny tokenizer only, 3 rounds (a smoke run)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=50, help="random rollouts checked for valid output")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="cpu: this process's CPU time (steadier on a shared machine; one thread)")
    args = p.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    print("| tokenizer | library | compile ms | ms/token, batch 1 | ms/step, batch 1 | ms/token, batch 16 "
          "| ms/step, batch 16 | valid outputs |")
    print("|---|---|---|---|---|---|---|---|")
    for label, tokenizer in tokenizers(args.quick):
        vocab, eos = len(tokenizer), tokenizer.eos_token_id
        docs = [tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in documents(64)]
        for library in LIBRARIES:
            try:
                rows_of = library(tokenizer, vocab, eos)
            except ImportError:
                print(f"| {label} | {library.name} | not installed | | | | | |")
                continue
            start = time.perf_counter()
            new_row = rows_of.compile(SCHEMA)
            compile_ms = (time.perf_counter() - start) * 1e3
            one = measure(rows_of, new_row, docs, 1, vocab, rounds)
            sixteen = measure(rows_of, new_row, docs, 16, vocab, rounds)
            valid = valid_share(rows_of, new_row, tokenizer, vocab, eos, 10 if args.quick else args.samples)
            print(f"| {label} | {library.name} | {compile_ms:.1f} | {one[0]:.3f} | {one[1]:.3f} | {sixteen[0]:.3f} "
                  f"| {sixteen[1]:.3f} | {valid} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
