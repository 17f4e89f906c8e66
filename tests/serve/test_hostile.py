"""Hostile input: no request may take the server down or change what other tenants get.

A table of hostile requests over the HTTP API and adapter loading, each with the exact status,
error type and param, followed by a normal request that must still get its usual answer; a
subset sent concurrently with a normal request that must not notice; fault isolation inside
the engine (a failing row, a failing prefill); numerically safe sampling; body limits; files
symlinked out of an allowed root; re-registering an adapter while it streams.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from factory import tiny_tokenizer
from safetensors.torch import load_file, save_file
from serve_fixture import CONTEXT, ServerThread, build_base, shared_setup

from loraforge.core import io
from loraforge.core.ops import lora_layers
from loraforge.serve import api
from loraforge.serve import engine as engine_module
from loraforge.serve.adapters import AdapterCache, AdapterLoadFailed, AdapterRegistry
from loraforge.serve.api import create_app
from loraforge.serve.engine import (
    GREEDY_BELOW,
    Engine,
    GenerationRequest,
    SamplingParams,
    Sequence,
    sample_token,
    top_p_filter,
)
from loraforge.serve.kernel import MultiLoraKernel
from loraforge.serve.protocol import MAX_LOGPROBS, MAX_MESSAGES, MAX_CHOICES, MAX_STOP_CHARS, MAX_STOP_STRINGS
from loraforge.serve.server import build_state

BASE = "tiny-base"
BODY_LIMIT = 64 * 1024
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SECRET = "SECRET-7f3a"  # in files the server must never quote
NORMAL = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


# --- the hostile files -------------------------------------------------------------------------------
def poisoned(src: Path, dst: Path, value: float) -> Path:
    """A copy of adapter `src` with one lora_B entry set to `value` (NaN, inf)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS)
    key = min(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    save_file(tensors, dst / WEIGHTS)
    return dst


def with_config(src: Path, dst: Path, text: str) -> Path:
    shutil.copytree(src, dst)
    (dst / CONFIG).write_text(text)
    return dst


def make_hostile(root: Path, setup: dict) -> dict[str, Path]:
    """root/adapters: alpha, beta, gamma plus broken ones served by name; root/allowed: adapters
    for load_lora_adapter, good and bad; root/outside: files the server must never read."""
    good = setup["extra"] / "delta"
    adapters, allowed, outside = root / "adapters", root / "allowed", root / "outside"
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(setup["adapters"] / name, adapters / name)
    outside.mkdir(parents=True)
    (outside / CONFIG).write_text(json.dumps({"peft_type": SECRET, "r": 2}))
    shutil.copy(setup["outside"] / "evil" / WEIGHTS, outside / WEIGHTS)

    poisoned(good, adapters / "nanadapter", float("nan"))
    shutil.copytree(good, adapters / "linked")
    (adapters / "linked" / WEIGHTS).unlink()
    (adapters / "linked" / WEIGHTS).symlink_to(outside / WEIGHTS)

    shutil.copytree(good, allowed / "good")
    poisoned(good, allowed / "nan", float("nan"))
    poisoned(good, allowed / "inf", float("-inf"))
    config = json.loads((good / CONFIG).read_text())
    with_config(good, allowed / "hugealpha", json.dumps({**config, "lora_alpha": 1e300}))
    with_config(good, allowed / "badconfig", json.dumps({**config, "peft_type": SECRET}))
    with_config(good, allowed / "notjson", "{not json " + SECRET)
    with_config(good, allowed / "configarray", "[1, 2]")
    with_config(good, allowed / "deepjson", "[" * 100_000)
    shutil.copytree(good, allowed / "notutf8")
    (allowed / "notutf8" / CONFIG).write_bytes(b'{"r": "\xff\xfe"}')
    shutil.copytree(good, allowed / "truncated")
    data = (good / WEIGHTS).read_bytes()
    (allowed / "truncated" / WEIGHTS).write_bytes(data[: len(data) // 2])
    shutil.copytree(good, allowed / "emptyweights")
    (allowed / "emptyweights" / WEIGHTS).write_bytes(b"")
    shutil.copytree(setup["adapters"] / "otherbase", allowed / "wrongshape")
    (allowed / "noweights").mkdir()
    shutil.copy(good / CONFIG, allowed / "noweights" / CONFIG)
    for name, file, target in (("linkweights", WEIGHTS, outside / WEIGHTS), ("linkjson", CONFIG, outside / CONFIG),
                               ("linkpasswd", CONFIG, Path("/etc/passwd"))):
        shutil.copytree(good, allowed / name)
        (allowed / name / file).unlink()
        (allowed / name / file).symlink_to(target)
    (allowed / "linkdir").symlink_to(allowed / "good")  # a directory link inside the root: fine
    return {"adapters": adapters, "allowed": allowed, "outside": outside, "good": good}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    setup = shared_setup()
    return {**make_hostile(tmp_path_factory.mktemp("hostile"), setup), "base": setup["base"]}


def start(hostile, **kwargs) -> ServerThread:
    options = {"max_batch": 8, "max_loaded": 4, "allow_roots": [str(hostile["allowed"])], "served_name": BASE,
               "max_body_bytes": BODY_LIMIT}
    state = build_state(str(hostile["base"]), str(hostile["adapters"]), **{**options, **kwargs})
    return ServerThread(create_app(state))


@pytest.fixture(scope="module")
def server(hostile):
    with start(hostile) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def normal_text(http, body: dict = NORMAL) -> str:
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(http) -> str:
    return normal_text(http)


# --- the table ---------------------------------------------------------------------------------------
C, CHAT, LOAD, UNLOAD = "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
TOK, DETOK = "/tokenize", "/detokenize"
MSG = [{"role": "user", "content": "Hi"}]


def comp(**fields) -> dict:
    return {"model": BASE, "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields) -> dict:
    return {"model": BASE, "messages": MSG, "max_tokens": 4, **fields}


def raw(text: str) -> bytes:
    """A JSON body written by hand (NaN, 1e400, escapes that json.dumps would not produce)."""
    return text.encode()


def load(name: str, where: str) -> dict:
    return {"lora_name": name, "lora_path": where}


# (id, route, body (dict: JSON; bytes: raw), status, param); `@name` in a lora_path is hostile["allowed"]/name,
# `@@` is the outside directory
CASES = [
    # sampling values the API accepts: must work (defect 1)
    ("temperature-1e-300", C, comp(temperature=1e-300), 200, None),
    ("temperature-1e-45", C, comp(temperature=1e-45), 200, None),
    ("temperature-5e-324", C, comp(temperature=5e-324), 200, None),
    ("temperature-1e-39", C, comp(temperature=1e-39), 200, None),
    ("temperature-just-above-greedy", C, comp(temperature=GREEDY_BELOW * 1.01), 200, None),
    ("top_p-1e-300", C, comp(top_p=1e-300), 200, None),
    ("top_p-1e-45", C, comp(top_p=1e-45), 200, None),
    ("top_p-5e-324", C, comp(top_p=5e-324), 200, None),
    ("both-tiny", C, comp(temperature=1e-300, top_p=1e-300), 200, None),
    ("temperature-2", C, comp(temperature=2.0, top_p=1.0), 200, None),
    ("chat-temperature-1e-300", CHAT, chat(temperature=1e-300, top_p=1e-45), 200, None),
    ("stream-temperature-1e-300", C, comp(temperature=1e-300, stream=True), 200, None),
    # sampling values it refuses
    ("temperature-negative", C, comp(temperature=-1e-300), 400, "temperature"),
    ("temperature-above-2", C, comp(temperature=2.0000001), 400, "temperature"),
    ("temperature-string", C, comp(temperature="0.5"), 400, "temperature"),
    ("temperature-1e400", C, raw('{"model": "tiny-base", "prompt": "Hi", "temperature": 1e400}'), 400, "temperature"),
    ("temperature-NaN", C, raw('{"model": "tiny-base", "prompt": "Hi", "temperature": NaN}'), 400, "temperature"),
    ("temperature-Infinity", C, raw('{"model": "tiny-base", "prompt": "Hi", "temperature": -Infinity}'), 400,
     "temperature"),
    ("top_p-zero", C, comp(top_p=0), 400, "top_p"),
    ("top_p-negative", C, comp(top_p=-1e-300), 400, "top_p"),
    ("top_p-above-1", C, comp(top_p=1.5), 400, "top_p"),
    ("top_p-NaN", C, raw('{"model": "tiny-base", "prompt": "Hi", "top_p": NaN}'), 400, "top_p"),
    ("top_p-string", C, comp(top_p="1"), 400, "top_p"),
    # seeds (defect 4)
    ("seed-2**64", C, comp(seed=2 ** 64, temperature=1), 400, "seed"),
    ("seed-below-int64", C, comp(seed=-(2 ** 63) - 1, temperature=1), 400, "seed"),
    ("seed-2**200", C, comp(seed=2 ** 200), 400, "seed"),
    ("seed-float", C, comp(seed=1.5), 400, "seed"),
    ("seed-string", C, comp(seed="1"), 400, "seed"),
    ("seed-bool", C, comp(seed=True), 400, "seed"),
    ("seed-max", C, comp(seed=2 ** 64 - 1, temperature=1), 200, None),
    ("seed-min", C, comp(seed=-(2 ** 63), temperature=1), 200, None),
    # text that is not Unicode, control characters (defect 4)
    ("prompt-lone-surrogate", C, raw('{"model": "tiny-base", "prompt": "\\ud800"}'), 400, "prompt"),
    ("prompt-low-surrogate", C, raw('{"model": "tiny-base", "prompt": "a\\udfffb"}'), 400, "prompt"),
    ("prompt-list-surrogate", C, raw('{"model": "tiny-base", "prompt": ["\\ud800"]}'), 400, "prompt"),
    ("stop-surrogate", C, raw('{"model": "tiny-base", "prompt": "Hi", "stop": ["x", "\\ud800"]}'), 400, "stop"),
    ("model-surrogate", C, raw('{"model": "\\ud800", "prompt": "Hi"}'), 400, "model"),
    ("extra-field-surrogate", C, raw('{"model": "tiny-base", "prompt": "Hi", "user": "\\udc00"}'), 400, "user"),
    ("extra-key-surrogate", C, raw('{"model": "tiny-base", "prompt": "Hi", "\\ud800": 1}'), 400, None),
    ("chat-content-surrogate", CHAT, raw('{"model": "tiny-base", "messages": [{"role": "user", '
                                         '"content": "\\ud83d"}]}'), 400, "messages"),
    ("prompt-NUL", C, comp(prompt="a\x00b"), 200, None),
    ("stop-NUL", C, comp(stop=["\x00"]), 200, None),
    ("model-NUL", C, comp(model="alpha\x00"), 400, "model"),
    ("prompt-invalid-utf8-bytes", C, b'{"model": "tiny-base", "prompt": "\xff\xfe"}', 400, None),
    # prompts of the wrong shape
    ("prompt-empty", C, comp(prompt=""), 400, "prompt"),
    ("prompt-empty-list", C, comp(prompt=[]), 400, "prompt"),
    ("prompt-negative-id", C, comp(prompt=[-1]), 400, "prompt"),
    ("prompt-huge-id", C, comp(prompt=[2 ** 70]), 400, "prompt"),
    ("prompt-float-ids", C, comp(prompt=[1.5]), 400, "prompt"),
    ("prompt-two-strings", C, comp(prompt=["a", "b"]), 200, None),
    ("prompt-two-id-lists", C, comp(prompt=[[5, 6], [7]]), 200, None),
    ("prompt-ids-and-lists-mixed", C, comp(prompt=[5, [6]]), 400, "prompt"),
    ("prompt-strings-and-ids-mixed", C, comp(prompt=["a", 5]), 400, "prompt"),
    ("prompt-empty-id-list", C, comp(prompt=[[5], []]), 400, "prompt"),
    ("prompt-negative-id-in-list", C, comp(prompt=[[5], [-1]]), 400, "prompt"),
    ("prompt-id-beyond-vocab-in-list", C, comp(prompt=[[5], [10 ** 6]]), 400, "prompt"),
    ("prompt-bool-ids", C, comp(prompt=[True, False]), 400, "prompt"),
    ("prompt-nested-too-deep", C, comp(prompt=[[[5]]]), 400, "prompt"),
    ("prompt-too-many", C, comp(prompt=["a"] * (MAX_CHOICES + 1)), 400, "prompt"),
    ("prompt-too-many-id-lists", C, comp(prompt=[[5]] * (MAX_CHOICES + 1)), 400, "prompt"),
    ("prompt-list-beyond-context", C, comp(prompt=[[5], [5] * CONTEXT]), 400, "prompt"),
    ("prompt-null", C, comp(prompt=None), 400, "prompt"),
    ("prompt-object", C, comp(prompt={"a": 1}), 400, "prompt"),
    ("prompt-number", C, comp(prompt=5), 400, "prompt"),
    ("prompt-missing", C, {"model": BASE}, 400, "prompt"),
    # models
    ("model-number", C, comp(model=5), 400, "model"),
    ("model-5000-chars", C, comp(model="x" * 5000), 400, "model"),
    ("model-path", C, comp(model="../alpha"), 400, "model"),
    ("model-unknown", C, comp(model="nosuch"), 404, "model"),
    ("model-missing", C, {"prompt": "Hi"}, 400, "model"),
    ("model-nan-adapter", C, comp(model="nanadapter"), 400, "model"),  # defect 2
    ("model-weights-symlinked-outside", C, comp(model="linked"), 400, "model"),  # defect 5
    # lengths (defect 9)
    ("max_tokens-context", C, comp(max_tokens=CONTEXT), 400, "max_tokens"),
    ("max_tokens-1e30", C, comp(max_tokens=10 ** 30), 400, "max_tokens"),
    ("max_tokens-rest-of-context-plus-1", C, comp(prompt=[5, 6], max_tokens=CONTEXT - 1), 400, "max_tokens"),
    ("max_tokens-zero", C, comp(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-zero-echo", C, comp(max_tokens=0, echo=True, logprobs=1), 200, None),
    ("max_tokens-negative-echo", C, comp(max_tokens=-1, echo=True), 400, "max_tokens"),
    ("chat-max_tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-negative", C, comp(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens-string", C, comp(max_tokens="5"), 400, "max_tokens"),
    ("max_tokens-bool", C, comp(max_tokens=True), 400, "max_tokens"),
    ("max_tokens-fills-context", C, comp(prompt=[5, 6], max_tokens=CONTEXT - 2), 200, None),
    ("prompt-ids-beyond-context", C, comp(prompt=[5] * CONTEXT), 400, "prompt"),
    ("prompt-chars-beyond-context", C, comp(prompt="x " * 20_000), 400, "prompt"),
    ("prompt-tokens-beyond-context", C, comp(prompt="hello there " * 400), 400, "prompt"),
    ("chat-chars-beyond-context", CHAT, chat(messages=[{"role": "user", "content": "x " * 20_000}]), 400, "messages"),
    ("chat-max_completion_tokens-context", CHAT, chat(max_completion_tokens=CONTEXT), 400, "max_tokens"),
    ("stop-too-many", C, comp(stop=["a"] * (MAX_STOP_STRINGS + 1)), 400, "stop"),
    ("stop-too-long", C, comp(stop="s" * (MAX_STOP_CHARS + 1)), 400, "stop"),
    ("stop-list-item-too-long", C, comp(stop=["a", "s" * (MAX_STOP_CHARS + 1)]), 400, "stop"),
    ("stop-at-the-bounds", C, comp(stop=["q" * MAX_STOP_CHARS] * MAX_STOP_STRINGS), 200, None),
    ("stop-5000-strings", C, comp(stop=["s" * 400] * 5000), 413, None),  # over the body limit
    ("stop-number", C, comp(stop=5), 400, "stop"),
    ("stop-list-of-numbers", C, comp(stop=[1]), 400, "stop"),
    ("chat-too-many-messages", CHAT, chat(messages=MSG * (MAX_MESSAGES + 1)), 400, "messages"),
    # other fields
    ("n-2", C, comp(n=2, temperature=1, seed=3), 200, None),
    ("chat-n-2", CHAT, chat(n=2, temperature=1), 200, None),
    ("n-negative", C, comp(n=-1), 400, "n"),
    ("n-string", C, comp(n="2"), 400, "n"),
    ("n-float", C, comp(n=2.0), 400, "n"),
    ("n-over-max", C, comp(n=MAX_CHOICES + 1), 400, "n"),
    ("n-times-prompts-over-max", C, comp(prompt=["a", "b"], n=MAX_CHOICES // 2 + 1), 400, "n"),
    ("stream-n-2", C, comp(stream=True, n=2), 400, "n"),
    ("chat-stream-n-2", CHAT, chat(stream=True, n=2), 400, "n"),
    ("echo-string", C, comp(echo="yes"), 400, "echo"),
    ("echo-number", C, comp(echo=1), 400, "echo"),
    ("logprobs-21", C, comp(logprobs=MAX_LOGPROBS + 1), 400, "logprobs"),
    ("logprobs-negative", C, comp(logprobs=-1), 400, "logprobs"),
    ("logprobs-bool", C, comp(logprobs=True), 400, "logprobs"),
    ("logprobs-float", C, comp(logprobs=1.5), 400, "logprobs"),
    ("logprobs-max", C, comp(logprobs=MAX_LOGPROBS, echo=True), 200, None),
    ("stream-echo", C, comp(stream=True, echo=True), 400, "echo"),
    ("stream-logprobs", C, comp(stream=True, logprobs=1), 400, "logprobs"),
    ("stream-two-prompts", C, comp(stream=True, prompt=["a", "b"]), 400, "prompt"),
    ("best_of", C, comp(best_of=2), 400, "best_of"),
    ("unknown-field", C, comp(frobnicate=1), 400, "frobnicate"),
    ("suffix", C, comp(suffix="x"), 400, "suffix"),
    ("chat-echo", CHAT, chat(echo=True), 400, "echo"),
    ("chat-logprobs", CHAT, chat(logprobs=True, top_logprobs=MAX_LOGPROBS), 200, None),
    ("chat-logprobs-int", CHAT, chat(logprobs=1), 400, "logprobs"),
    ("chat-logprobs-string", CHAT, chat(logprobs="true"), 400, "logprobs"),
    ("chat-top_logprobs-21", CHAT, chat(logprobs=True, top_logprobs=MAX_LOGPROBS + 1), 400, "top_logprobs"),
    ("chat-top_logprobs-negative", CHAT, chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
    ("chat-top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat-stream-logprobs", CHAT, chat(stream=True, logprobs=True), 400, "logprobs"),
    ("chat-tools", CHAT, chat(tools=[]), 400, "tools"),
    ("chat-message-unknown-field", CHAT, chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]), 400,
     "messages"),
    ("n-0", C, comp(n=0), 400, "n"),
    ("stream-string", C, comp(stream="yes"), 400, "stream"),
    ("stream_options-string", C, comp(stream_options="x"), 400, "stream_options"),
    ("ignore_eos-string", C, comp(ignore_eos="no"), 400, "ignore_eos"),
    ("chat-messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    ("chat-role-number", CHAT, chat(messages=[{"role": 5, "content": "x"}]), 400, "messages"),
    ("chat-content-part-type", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image", "text": "x"}]}]),
     400, "messages"),
    # the tokenizer routes
    ("tokenize-prompt", TOK, {"model": BASE, "prompt": "Hello"}, 200, None),
    ("tokenize-messages", TOK, {"model": "alpha", "messages": MSG}, 200, None),
    ("tokenize-both", TOK, {"model": BASE, "prompt": "Hi", "messages": MSG}, 400, "prompt"),
    ("tokenize-neither", TOK, {"model": BASE}, 400, "prompt"),
    ("tokenize-prompt-ids", TOK, {"model": BASE, "prompt": [5, 6]}, 400, "prompt"),
    ("tokenize-messages-empty", TOK, {"model": BASE, "messages": []}, 400, "messages"),
    ("tokenize-unknown-model", TOK, {"model": "nosuch", "prompt": "Hi"}, 404, "model"),
    ("tokenize-model-path", TOK, {"model": "../alpha", "prompt": "Hi"}, 400, "model"),
    ("tokenize-chars-beyond-context", TOK, {"model": BASE, "prompt": "x " * 20_000}, 400, "prompt"),
    ("tokenize-surrogate", TOK, raw('{"model": "tiny-base", "prompt": "\\ud800"}'), 400, "prompt"),
    ("tokenize-unknown-field", TOK, {"model": BASE, "prompt": "Hi", "return_token_strs": True}, 400,
     "return_token_strs"),
    ("detokenize", DETOK, {"model": BASE, "tokens": [5, 6]}, 200, None),
    ("detokenize-negative", DETOK, {"model": BASE, "tokens": [5, -1]}, 400, "tokens"),
    ("detokenize-beyond-vocab", DETOK, {"model": BASE, "tokens": [10 ** 6]}, 400, "tokens"),
    ("detokenize-beyond-context", DETOK, {"model": BASE, "tokens": [5] * (CONTEXT + 1)}, 400, "tokens"),
    ("detokenize-strings", DETOK, {"model": BASE, "tokens": ["a"]}, 400, "tokens"),
    ("detokenize-floats", DETOK, {"model": BASE, "tokens": [1.0]}, 400, "tokens"),
    ("detokenize-missing", DETOK, {"model": BASE}, 400, "tokens"),
    ("detokenize-unknown-model", DETOK, {"model": "nosuch", "tokens": [5]}, 404, "model"),
    # bodies
    ("json-malformed", C, b"{not json", 400, None),
    ("json-array", C, b"[1, 2]", 400, None),
    ("json-null", C, b"null", 400, None),
    ("json-empty", C, b"", 400, None),
    ("json-deeply-nested", C, b'{"model": "tiny-base", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, None),
    ("body-over-limit", C, comp(prompt="x" * (BODY_LIMIT + 1)), 413, None),  # defect 3
    ("chat-body-over-limit", CHAT, chat(messages=[{"role": "user", "content": "y" * BODY_LIMIT}]), 413, None),
    # adapter loading (defects 2, 5, 6)
    ("load-good", LOAD, load("rt-good", "@good"), 200, None),
    ("load-directory-link-inside-root", LOAD, load("rt-linkdir", "@linkdir"), 200, None),
    ("load-nan", LOAD, load("rt-nan", "@nan"), 400, "lora_path"),
    ("load-inf", LOAD, load("rt-inf", "@inf"), 400, "lora_path"),
    ("load-scaling-overflows", LOAD, load("rt-alpha", "@hugealpha"), 400, "lora_path"),
    ("load-truncated-weights", LOAD, load("rt-trunc", "@truncated"), 400, "lora_path"),
    ("load-empty-weights", LOAD, load("rt-empty", "@emptyweights"), 400, "lora_path"),
    ("load-config-not-json", LOAD, load("rt-notjson", "@notjson"), 400, "lora_path"),
    ("load-config-array", LOAD, load("rt-array", "@configarray"), 400, "lora_path"),
    ("load-config-deep", LOAD, load("rt-deep", "@deepjson"), 400, "lora_path"),
    ("load-config-not-utf8", LOAD, load("rt-utf8", "@notutf8"), 400, "lora_path"),
    ("load-config-bad-field", LOAD, load("rt-badcfg", "@badconfig"), 400, "lora_path"),
    ("load-other-base", LOAD, load("rt-shape", "@wrongshape"), 400, "lora_path"),
    ("load-no-weights", LOAD, load("rt-nowt", "@noweights"), 400, "lora_path"),
    ("load-weights-symlinked-outside", LOAD, load("rt-lw", "@linkweights"), 403, "lora_path"),
    ("load-config-symlinked-outside", LOAD, load("rt-lj", "@linkjson"), 403, "lora_path"),
    ("load-config-symlinked-to-etc-passwd", LOAD, load("rt-lp", "@linkpasswd"), 403, "lora_path"),
    ("load-outside-root", LOAD, load("rt-out", "@@"), 403, "lora_path"),
    ("load-dotdot-out", LOAD, load("rt-dd", "@../outside"), 403, "lora_path"),
    ("load-path-component-too-long", LOAD, load("rt-long", "@" + "x" * 4000), 400, "lora_path"),
    ("load-path-5000-chars", LOAD, load("rt-long2", "/" + "x" * 5000), 400, "lora_path"),
    ("load-path-NUL", LOAD, load("rt-nul", "/tmp/a\x00b"), 400, "lora_path"),
    ("load-path-empty", LOAD, load("rt-e", ""), 400, "lora_path"),
    ("load-path-number", LOAD, {"lora_name": "rt-n", "lora_path": 5}, 400, "lora_path"),
    ("load-path-missing", LOAD, {"lora_name": "rt-m"}, 400, "lora_path"),
    ("load-path-surrogate", LOAD, raw('{"lora_name": "rt-s", "lora_path": "/tmp/\\ud800"}'), 400, "lora_path"),
    ("load-name-5000-chars", LOAD, load("x" * 5000, "@good"), 400, "lora_name"),
    ("load-name-path", LOAD, load("../x", "@good"), 400, "lora_name"),
    ("load-name-NUL", LOAD, load("a\x00", "@good"), 400, "lora_name"),
    ("load-name-base", LOAD, load(BASE, "@good"), 400, "lora_name"),
    ("load-name-taken", LOAD, load("alpha", "@good"), 400, "lora_name"),
    ("load-json-malformed", LOAD, b"{", 400, None),
    ("unload-name-5000-chars", UNLOAD, {"lora_name": "y" * 5000}, 400, "lora_name"),
    ("unload-unknown", UNLOAD, {"lora_name": "nosuch"}, 404, "lora_name"),
    ("unload-directory-adapter", UNLOAD, {"lora_name": "alpha"}, 400, "lora_name"),
]
CASE_IDS = [case[0] for case in CASES]
assert len(set(CASE_IDS)) == len(CASES)
TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
         500: "server_error"}


def send(http, hostile, route: str, body, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, dict) and "lora_path" in body and isinstance(body["lora_path"], str):
        path = body["lora_path"]
        if path == "@@":
            path = str(hostile["outside"])
        elif path.startswith("@"):
            path = str(hostile["allowed"] / path[1:])
        body = {**body, "lora_path": path}
    if isinstance(body, bytes):
        return http.post(route, content=body, headers={"content-type": "application/json", **(headers or {})})
    return http.post(route, json=body, headers=headers)


def check_response(response: httpx.Response, status: int, param: str | None, route: str, body):
    assert response.status_code == status, response.text[:500]
    if status == 200:
        if route == LOAD:
            assert response.text.startswith("Success")
        elif route == TOK:
            assert response.json()["count"] == len(response.json()["tokens"]) > 0
        elif route == DETOK:
            assert isinstance(response.json()["prompt"], str)
        elif isinstance(body, dict) and body.get("stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == TYPES[status] and error["param"] == param, error
    message = error["message"]
    assert message and len(message) < 600 and "Traceback" not in message
    assert SECRET not in message and "root:" not in message  # never quotes a file


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hostile_request_gets_its_error_and_the_server_goes_on(http, hostile, reference, case):
    _, route, body, status, param = case
    response = send(http, hostile, route, body)
    check_response(response, status, param, route, body)
    if route == LOAD and status == 200:
        assert normal_text(http, {**NORMAL, "model": body["lora_name"]})
        assert http.post(UNLOAD, json={"lora_name": body["lora_name"]}).status_code == 200
    assert normal_text(http) == reference
    assert http.get("/health").json() == {"status": "ok"}


CONCURRENT = ["temperature-1e-300", "top_p-1e-300", "seed-2**64", "prompt-lone-surrogate", "model-5000-chars",
              "model-nan-adapter", "model-weights-symlinked-outside", "load-nan", "load-config-symlinked-to-etc-passwd",
              "load-truncated-weights", "body-over-limit", "stop-at-the-bounds", "json-deeply-nested",
              "prompt-chars-beyond-context", "prompt-two-id-lists", "logprobs-max", "max_tokens-zero-echo"]


@pytest.mark.parametrize("case_id", CONCURRENT)
def test_a_normal_request_does_not_notice_a_concurrent_hostile_one(http, hostile, reference, case_id):
    _, route, body, status, param = CASES[CASE_IDS.index(case_id)]
    long_normal = {**NORMAL, "max_tokens": 24}
    want = normal_text(http, long_normal)
    with ThreadPoolExecutor(2) as pool:
        normal = pool.submit(normal_text, http, long_normal)
        time.sleep(0.01)  # the normal request is in flight first
        response = pool.submit(send, http, hostile, route, body).result()
        assert normal.result() == want
    check_response(response, status, param, route, body)


def test_no_request_for_a_hostile_file_quotes_it(http, hostile):
    """An outside JSON file's field, /etc/passwd, the adapter's own bad config: never in a message."""
    for name in ("linkjson", "linkpasswd", "badconfig", "notjson"):
        message = send(http, hostile, LOAD, load(f"q-{name}", f"@{name}")).json()["error"]["message"]
        assert SECRET not in message and "root:x" not in message and "not json" not in message


def test_a_nan_adapter_names_the_tensor_also_without_the_core_check(hostile, monkeypatch):
    """serve/adapters.py checks the factors it reads itself, whatever core.io does."""
    monkeypatch.setattr(io, "check_finite", lambda *args, **kwargs: None, raising=False)
    model = build_base()
    registry = AdapterRegistry(hostile["adapters"], [hostile["allowed"]])
    kernel = MultiLoraKernel(2)
    kernel.install([layer for _, layer in lora_layers(model)])
    cache = AdapterCache(model, kernel, registry)
    with pytest.raises(AdapterLoadFailed, match=r"tensor .*lora_B holds NaN or infinite"):
        cache.acquire("nanadapter")
    registry.register("inf", str(hostile["allowed"] / "inf"))
    with pytest.raises(AdapterLoadFailed, match=r"lora_B holds NaN or infinite"):
        cache.acquire("inf")
    registry.register("hugealpha", str(hostile["allowed"] / "hugealpha"))
    with pytest.raises(AdapterLoadFailed, match=r"lora_B x scaling holds NaN or infinite"):
        cache.acquire("hugealpha")
    assert cache.acquire("alpha") is not None and not cache.pins["nanadapter"]


# --- re-registering while the old adapter streams (defect 6) --------------------------------------------
def stream_first_chunk(server, model: str, max_tokens: int):
    client = httpx.Client(base_url=server.url, timeout=60)
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    context = client.stream("POST", C, json=body)
    response = context.__enter__()
    lines = response.iter_lines()
    first = next(line for line in lines if line)
    return client, context, first, lines


def stream_text(first: str, lines) -> tuple[str, str]:
    text, finish = "", None
    for line in [first, *lines]:
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish


@pytest.mark.parametrize("same_path", [True, False], ids=["same-path", "new-path"])
def test_reregistering_a_corrupt_adapter_while_the_old_one_streams_is_refused(server, http, hostile, tmp_path,
                                                                              same_path):
    name = f"rereg-{int(same_path)}"
    first_dir = hostile["allowed"] / name
    shutil.copytree(hostile["good"], first_dir)
    assert send(http, hostile, LOAD, load(name, f"@{name}")).status_code == 200
    solo = normal_text(http, {**NORMAL, "model": name, "prompt": "Hello", "max_tokens": 40})
    client, context, first, lines = stream_first_chunk(server, name, 40)
    try:
        assert http.post(UNLOAD, json={"lora_name": name}).status_code == 200
        second_dir = first_dir if same_path else hostile["allowed"] / f"{name}-b"
        if not same_path:
            shutil.copytree(hostile["good"], second_dir)
        data = (second_dir / WEIGHTS).read_bytes()
        (second_dir / WEIGHTS).write_bytes(data[: len(data) // 3])  # truncated
        refused = http.post(LOAD, json=load(name, str(second_dir)))
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_load_failed"
        assert "safetensors" in refused.json()["error"]["message"]
        assert stream_text(first, lines) == (solo, "length")  # the old copy streams on, unharmed
    finally:
        context.__exit__(None, None, None)
        client.close()
    (second_dir / WEIGHTS).write_bytes(data)  # repaired: now it loads and serves the same text
    assert http.post(LOAD, json=load(name, str(second_dir))).status_code == 200
    assert normal_text(http, {**NORMAL, "model": name, "prompt": "Hello", "max_tokens": 40}) == solo
    assert http.post(UNLOAD, json={"lora_name": name}).status_code == 200


# --- fault isolation -------------------------------------------------------------------------------------
FAULT_SEED = 4242


def test_eight_tenants_keep_their_answers_while_a_ninth_fails_three_ways(server, http, hostile, monkeypatch):
    """A row whose sampling raises, a NaN adapter, an oversized body: the 8 others are unaffected."""
    real = engine_module.sample_token

    def faulty(logits, greedy, seq):
        if seq.params.seed == FAULT_SEED:
            raise RuntimeError("injected sampling fault")
        return real(logits, greedy, seq)

    jobs = [{**NORMAL, "model": model, "prompt": prompt, "max_tokens": 16}
            for model in ("alpha", "beta", "gamma", BASE) for prompt in ("Hello", "Paris is")]
    solo = [normal_text(http, job) for job in jobs]
    monkeypatch.setattr(engine_module, "sample_token", faulty)
    hostile_requests = [
        comp(temperature=1e-300, seed=FAULT_SEED, max_tokens=16),
        comp(model="nanadapter"),
        comp(prompt="z" * (BODY_LIMIT * 2)),
    ]
    with ThreadPoolExecutor(len(jobs) + len(hostile_requests)) as pool:
        normal = [pool.submit(normal_text, http, job) for job in jobs]
        bad = [pool.submit(send, http, hostile, C, body) for body in hostile_requests]
        results = [f.result() for f in normal]
        statuses = [f.result().status_code for f in bad]
    assert results == solo
    assert statuses == [500, 400, 413]
    error = bad[0].result().json()["error"]
    assert error["code"] == "generation_failed" and "injected sampling fault" in error["message"]


def test_a_failing_row_ends_only_that_row_mid_stream(server, http, monkeypatch):
    """The fault hits after some tokens: the stream ends with an error event, the others finish."""
    real, counts = engine_module.sample_token, {}

    def faulty(logits, greedy, seq):
        if seq.params.seed == FAULT_SEED:
            counts[seq.id] = counts.get(seq.id, 0) + 1
            if counts[seq.id] == 3:
                raise ValueError("injected fault after two tokens")
        return real(logits, greedy, seq)

    job = {**NORMAL, "model": "beta", "max_tokens": 20}
    want = normal_text(http, job)
    monkeypatch.setattr(engine_module, "sample_token", faulty)
    body = comp(temperature=0, seed=FAULT_SEED, max_tokens=20, ignore_eos=True, stream=True)
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(normal_text, http, job)
        streamed = http.post(C, json=body).text
        assert other.result() == want
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "generation_failed" and "[DONE]" not in streamed


def test_a_failing_prefill_fails_only_its_own_request(hostile):
    """A forward pass that fails on one prompt: the chunk is retried row by row."""
    engine = Engine(build_base(), tiny_tokenizer(), AdapterRegistry(hostile["adapters"]), max_batch=8)
    prefill = engine._prefill_rows

    def fails_on_poison(seqs):
        if any(s.params.seed == FAULT_SEED for s in seqs):
            raise RuntimeError("injected prefill fault")
        return prefill(seqs)

    def request(prompt, adapter, seed=None):
        params = SamplingParams(max_tokens=8, temperature=0.0, seed=seed, ignore_eos=True)
        return GenerationRequest(engine.tokenizer(prompt)["input_ids"], adapter, params)

    def drive(requests):
        events = [[] for _ in requests]
        for i, req in enumerate(requests):
            engine.submit(req, events[i].append)
        while any(not ev or ev[-1].kind == "delta" for ev in events):
            engine.step()
        return [("".join(e.text for e in ev), ev[-1].kind) for ev in events]

    normal = [request("Hello", "alpha"), request("Paris is", None), request("The sea", "gamma")]
    solo = [drive([req])[0] for req in normal]
    engine._prefill_rows = fails_on_poison
    together = drive([normal[0], request("Hi", "beta", seed=FAULT_SEED), normal[1], normal[2]])
    assert together[1][1] == "error"
    assert [together[0], together[2], together[3]] == solo


# --- sampling is numerically safe ------------------------------------------------------------------------
def seq_with(temperature: float, top_p: float = 1.0, seed: int = 0) -> Sequence:
    return Sequence(GenerationRequest([1], None, SamplingParams(temperature=temperature, top_p=top_p, seed=seed)),
                    lambda event: None)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-39, GREEDY_BELOW / 2])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e37])
def test_tiny_temperatures_are_greedy_at_any_logit_scale(temperature, scale):
    logits = torch.randn(97, generator=torch.Generator().manual_seed(1)) * scale
    best = int(logits.argmax())
    assert sample_token(logits, best, seq_with(temperature)) == best


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-3, 0.7, 2.0])
@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-45, 0.5, 1.0])
def test_sampling_never_fails_for_accepted_values(temperature, top_p):
    logits = torch.randn(97, generator=torch.Generator().manual_seed(2)) * 1e30
    logits[5] = float("-inf")  # masked tokens are fine
    token = sample_token(logits, int(logits.argmax()), seq_with(temperature, top_p))
    assert 0 <= token < 97 and token != 5
    if top_p < 1e-10:
        assert token == int(logits.argmax())  # the nucleus is the top token alone


def test_top_p_always_keeps_the_most_likely_token():
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(3)), dim=-1)
    for top_p in (5e-324, 1e-300, 1e-45, 1e-8):
        kept = top_p_filter(probs.clone(), top_p)
        assert kept.nonzero().flatten().tolist() == [int(probs.argmax())]


def test_nan_logits_fail_only_their_row():
    """A row whose logits are NaN ends with a clear error; the other rows of the step go on."""
    engine = Engine(build_base(), tiny_tokenizer(), None, max_batch=4)
    forward = engine._forward

    def nan_in_row_one(*args, **kwargs):
        logits = forward(*args, **kwargs).clone()
        if logits.shape[0] > 1:
            logits[1] = float("nan")
        return logits

    events = [[], []]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for sink in events:
        engine.submit(GenerationRequest([5, 6, 7], None, params), sink.append)
    engine._forward = nan_in_row_one
    while any(not ev or ev[-1].kind == "delta" for ev in events):
        engine.step()
    assert events[0][-1].kind == "done" and events[0][-1].completion_tokens == 4
    assert events[1][-1].kind == "error" and "NaN or infinite logits" in str(events[1][-1].error)


# --- bodies: limits, memory, the event loop (defect 3) ------------------------------------------------------
def test_body_limit_covers_chunked_bodies_and_is_configurable(server, http):
    def chunks():
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    response = http.post(C, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    just_under = comp(prompt="w" * (BODY_LIMIT - 200), max_tokens=1)
    assert len(json.dumps(just_under)) < BODY_LIMIT
    assert send(http, {}, C, just_under).json()["error"]["code"] == "context_length_exceeded"  # read, then refused


def rss_bytes(pid: str = "self") -> int:
    """Resident memory of a process (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_a_huge_prompt_neither_freezes_the_server_nor_keeps_memory(hostile):
    """Default limit (8 MiB): a 50 MB body is refused unread; a 7 MiB prompt is refused before
    tokenizing; /health answers throughout; memory returns near where it was."""
    with start(hostile, max_body_bytes=8 * 2 ** 20) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        normal_text(client)
        before = rss_bytes()
        big = json.dumps(comp(prompt="a" * (7 * 2 ** 20))).encode()
        with ThreadPoolExecutor(2) as pool:
            started = time.perf_counter()
            pending = pool.submit(client.post, C, content=big, headers={"content-type": "application/json"})
            health = [client.get("/health").status_code for _ in range(5)]
            refused = pending.result()
            elapsed = time.perf_counter() - started
        assert health == [200] * 5 and elapsed < 10
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert declared_but_unsent(srv.port, 50 * 10 ** 6).startswith(b"HTTP/1.1 413")
        too_big = client.post(C, content=b"x" * (8 * 2 ** 20 + 1), headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        assert normal_text(client)
        del big
        after = rss_bytes()
        assert after - before < 200 * 2 ** 20, (before, after)


def test_tokenizing_does_not_block_the_event_loop(server, http, monkeypatch):
    """A slow tokenization (a long prompt) runs in a worker thread: /health answers meanwhile."""
    real = api.completion_prompts

    def slow(state, prompt):
        time.sleep(1.5)
        return real(state, prompt)

    monkeypatch.setattr(api, "completion_prompts", slow)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, C, json=comp())
        time.sleep(0.2)
        started = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert time.perf_counter() - started < 0.8 and not pending.done()
        assert pending.result().status_code == 200


def declared_but_unsent(port: int, length: int) -> bytes:
    """The server's answer to headers declaring `length` body bytes, none of which are sent."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {C} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {length}\r\n\r\n".encode())
        return sock.recv(65536)


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    """Far over the limit: answered at once, unread (a body a little over is read and dropped,
    so that a client still sending it gets the 413 instead of a reset connection)."""
    assert declared_but_unsent(server.port, 5 * BODY_LIMIT).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("headers", [{"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                                     {}], ids=["text-plain", "form", "none"])
def test_wrong_content_types_are_json_400s(server, headers):
    response = httpx.post(server.url + C, content=json.dumps(comp()).encode(), headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_are_json_errors(server):
    for method, path, status in (("GET", C, 405), ("POST", "/v1/nosuch", 404), ("DELETE", "/v1/models", 405)):
        response = httpx.request(method, server.url + path)
        assert response.status_code == status and response.json()["error"]["type"] in TYPES.values()


def test_an_unexpected_error_is_a_json_500_without_a_traceback(server, http, monkeypatch):
    def explode(*args, **kwargs):
        raise KeyError("internal detail")

    monkeypatch.setattr(api, "completion_prompts", explode)
    response = http.post(C, json=comp())
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "internal detail" not in error["message"] and "Traceback" not in response.text
