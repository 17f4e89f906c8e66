"""Constrained decoding: a request's output held to a JSON schema, a regex, a choice of strings or
a grammar (GBNF or Lark), through llguidance (chosen among xgrammar, llguidance and
outlines-core by measurement: docs/serve.md, "Structured output"; bench/constrained.py).

The API compiles a request's `Constraint` into a `Grammar` once (an invalid one is a 400 naming its
field); each engine row gets its own `Matcher` of it, which masks that row's logits before the
token is chosen and advances with the chosen token. Rows without one are never touched.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import torch

from loraforge import LoraError, one_line

class BadConstraint(LoraError):
    """400: a structured-output spec (schema, regex, grammar, choice) that cannot be compiled."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """What one request's output must match. `kind` and its `spec`: json_schema, a JSON schema
    (dict or true); json_object, None (any JSON object); regex, the pattern; choice, the
    strings; grammar, GBNF or Lark text; tagged_json (tool calls), (prefix, JSON schema, suffix).
    `param`: the request field it came from (named in errors)."""

    kind: str
    spec: object = None
    param: str = "response_format"


def json_schema_text(schema) -> str:
    return json.dumps(schema, ensure_ascii=False)


class Grammar:
    """A compiled constraint, shared by the rows of one request (n > 1): an llguidance matcher
    at its start, which each row copies (the copies share its compiled grammar and lexer)."""

    def __init__(self, start, compiler: "GrammarCompiler"):
        self.start, self.compiler = start, compiler

    def matcher(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    """One row's place in its grammar: masks that row's logits, advances with each chosen token."""

    def __init__(self, grammar: Grammar):
        compiler = grammar.compiler
        self.state = grammar.start.deep_copy()
        self.bitmask = torch.full((1, (compiler.vocab_size + 31) // 32), -1, dtype=torch.int32)  # 1 bit per token
        self.fill = compiler.fill

    def check(self):
        if self.state.is_error():
            raise LoraError(f"the grammar failed: {self.state.get_error()}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of one row's logits (vocab,) with every token the grammar forbids at -inf."""
        self.fill(self.state, self.bitmask, 0)
        self.check()
        if not self.bitmask.any():
            raise LoraError("the grammar allows no token here")
        return apply_bitmask(logits.detach().float(), self.bitmask[0])

    def accept(self, token: int):
        if not self.state.consume_token(token):
            raise LoraError(f"the grammar refused token {token}: {self.state.get_error()}")

    @property
    def ended(self) -> bool:
        """True once the grammar is complete and can take nothing more (its end is reached)."""
        return self.state.is_stopped()


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (vocab,) with the tokens whose bit is 0 in bitmask (ceil(vocab / 32),) int32 at -inf
    (a new tensor; bit j of word i is token 32 i + j, llguidance's layout)."""
    vocab = logits.shape[-1]
    allowed = allowed_numpy(bitmask, vocab) if logits.device.type == "cpu" else allowed_torch(bitmask, vocab,
                                                                                           logits.device)
    return torch.where(allowed, logits, float("-inf"))


def allowed_numpy(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The bits as booleans (vocab,), unpacked by numpy (on the CPU, faster than torch's shifts)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.view(np.bool_))


def allowed_torch(bitmask: torch.Tensor, vocab: int, device) -> torch.Tensor:
    """The bits as booleans (vocab,), unpacked by torch on `device` (a GPU: only the words move)."""
    words = bitmask.to(device)
    return ((words.unsqueeze(-1) >> _BITS.to(device)) & 1).bool().view(-1)[:vocab]


class GrammarCompiler:
    """Compiles constraints for one tokenizer into llguidance grammars. `vocab_size`: the width
    of the model's logits (may exceed the tokenizer's vocabulary); `stop_ids`: the tokens that
    end a complete grammar (the engine's eos ids)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        try:
            import llguidance
            import llguidance.hf
            import llguidance.torch
        except ImportError as err:
            raise LoraError("structured output needs the package llguidance: pip install 'loraforge[serve]'") from err
        self.llg, self.vocab_size = llguidance, vocab_size
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(stop_ids))
        except Exception as err:  # noqa: BLE001 - e.g. a slow (Python) tokenizer, a vocabulary wider than the logits
            raise LoraError(f"structured output is not available for this tokenizer: {library_message(err)}") from None
        self.fill = llguidance.torch.fill_next_token_bitmask

    def compile(self, constraint: Constraint) -> Grammar:
        """The Grammar of `constraint`; BadConstraint (naming its field) when it does not compile."""
        try:
            start = self.llg.LLMatcher(self.tokenizer, self.grammar_text(constraint), log_level=0)
            error = start.get_error() if start.is_error() else ""
        except BadConstraint:
            raise
        except Exception as err:  # noqa: BLE001 - the library's parse errors are the client's
            error = str(err)
        if error:
            raise BadConstraint(constraint.param, f"{constraint.param}: invalid {describe(constraint.kind)}: "
                                                  f"{library_message(error)}")
        return Grammar(start, self)

    def grammar_text(self, constraint: Constraint) -> str:
        """The llguidance grammar (its JSON text) of a constraint."""
        matcher, kind, spec = self.llg.LLMatcher, constraint.kind, constraint.spec
        if kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind == "json_schema":
            return matcher.grammar_from_json_schema(json_schema_text(spec), defaults=JSON_OPTIONS)
        if kind == "regex":
            return matcher.grammar_from_regex(spec)
        if kind == "choice":
            return matcher.grammar_from_lark(choice_lark(spec, constraint.param))
        if kind == "grammar":  # GBNF (llama.cpp's EBNF) or Lark
            from llguidance.gbnf_to_lark import any_to_lark

            return matcher.grammar_from_lark(any_to_lark(spec))
        if kind == "tagged_json":  # tool calls: the JSON schema between a prefix and a suffix
            prefix, schema, suffix = spec
            embedded = json.dumps(schema_of(schema), ensure_ascii=False)
            return matcher.grammar_from_lark(f"start: {lark_string(prefix)} call {lark_string(suffix)}\n"
                                             f"call: %json {embedded}")
        raise BadConstraint(constraint.param, f"{constraint.param}: unknown constraint kind {kind!r}")


# Compact JSON as json.dumps writes it (", " and ": ", no other whitespace: a weak model could
# otherwise emit whitespace without end).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_of(schema) -> dict:
    """A schema (with llguidance's "x-guidance" options merged in) for embedding with %json."""
    schema = {} if schema is True else dict(schema)
    schema["x-guidance"] = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
    return schema


def choice_lark(choices: list[str], param: str) -> str:
    if not choices:
        raise BadConstraint(param, f"{param}: choice needs at least one string")
    return "start: " + " | ".join(lark_string(c) for c in choices)


def lark_string(text: str) -> str:
    """A Lark string literal of `text` (JSON escapes, which llguidance's Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


def describe(kind: str) -> str:
    return {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex", "choice": "choice",
            "grammar": "grammar", "tagged_json": "tool parameters schema"}.get(kind, kind)


def library_message(err: Exception | str) -> str:
    """The library's message on one line, without its own prefixes."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = re.sub(r"^(error: |Error: )", "", text)
    return one_line(LoraError(text or type(err).__name__), limit=240)
