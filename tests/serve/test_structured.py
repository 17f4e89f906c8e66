"""Structured output (response_format, vLLM's structured_outputs) through the real `openai` client:
constrained rows share batches with unconstrained ones on other adapters and leave them
byte-identical; every constrained output matches (jsonschema / re as the oracle); bad specs are
one-line 400s naming their field; a failing matcher ends its own row only."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
from factory import tiny_tokenizer
from serve_fixture import ServerThread, build_base, shared_setup

from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.api import create_app
from loraforge.serve.constrain import Constraint, GrammarCompiler
from loraforge.serve.engine import Engine, GenerationRequest, SamplingParams
from loraforge.serve.server import build_state

BASE = "tiny-base"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["city", "count", "ok", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
CHAT = [{"role": "user", "content": "Where is the capital of France?"}]


@pytest.fixture(scope="module")
def paths():
    return shared_setup()


@pytest.fixture(scope="module")
def server(paths):
    state = build_state(str(paths["base"]), str(paths["adapters"]), max_batch=16, max_loaded=3, served_name=BASE)
    with ServerThread(create_app(state)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, model: str, seed: int, constrained: bool, **kwargs):
    extra = {"response_format": JSON_SCHEMA_FORMAT} if constrained else {}
    return client.chat.completions.create(model=model, messages=CHAT, temperature=1.0, seed=seed, max_tokens=120,
                                          **extra, **kwargs).choices[0]


def parallel(fn, jobs: list) -> list:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


# --- the mixed batch ---------------------------------------------------------------------------------
def test_constrained_rows_validate_and_leave_the_others_byte_identical(client):
    models = [BASE, "alpha", "beta"]
    jobs = [(client, models[i % 3], 1000 + i, i % 2 == 0) for i in range(30)]
    together = parallel(chat, jobs)
    plain_jobs = [job for job in jobs if not job[3]]
    alone = parallel(chat, plain_jobs)
    for job, choice in zip(jobs, together):
        if job[3]:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert [c.message.content for c, job in zip(together, jobs) if not job[3]] == [c.message.content for c in alone]
    assert any(c.finish_reason == "length" for c, job in zip(together, jobs) if not job[3])  # the model is random


def test_json_object_greedy_n_and_logprobs(client):
    result = client.chat.completions.create(model="gamma", messages=CHAT, temperature=1.0, max_tokens=200, n=6,
                                            response_format={"type": "json_object"}, seed=3)
    stopped = [c for c in result.choices if c.finish_reason == "stop"]
    assert stopped  # any JSON object: the random model may still run past max_tokens inside a string
    for choice in stopped:
        assert isinstance(json.loads(choice.message.content), dict)
    greedy = client.chat.completions.create(model="alpha", messages=CHAT, temperature=0.0, max_tokens=120, n=2,
                                            response_format=JSON_SCHEMA_FORMAT, logprobs=True, top_logprobs=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    jsonschema.validate(json.loads(greedy.choices[0].message.content), SCHEMA)
    assert len(greedy.choices[0].logprobs.content) == greedy.usage.completion_tokens // 2
    samples = client.chat.completions.create(model="beta", messages=CHAT, temperature=1.0, seed=7, max_tokens=120,
                                             n=4, response_format=JSON_SCHEMA_FORMAT)
    for choice in samples.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({c.message.content for c in samples.choices}) > 1  # each sample its own matcher and seed


def test_streamed_constrained_text_equals_the_whole_answer(client):
    kwargs = {"model": "alpha", "messages": CHAT, "temperature": 1.0, "seed": 11, "max_tokens": 120,
              "response_format": JSON_SCHEMA_FORMAT}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(stream=True, **kwargs)
             if chunk.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), SCHEMA)


# --- choice, regex, grammar, json on completions -------------------------------------------------------
def complete(client, structured: dict, seed: int, model: str = BASE, **kwargs):
    return client.completions.create(model=model, prompt="The answer is", temperature=1.0, seed=seed, max_tokens=60,
                                     extra_body={"structured_outputs": structured}, **kwargs).choices[0]


def test_choice_regex_grammar_and_json_match(client):
    options = ["yes", "no", "maybe not"]
    seen = set()
    for seed in range(6):
        choice = complete(client, {"choice": options}, seed, model=["alpha", BASE][seed % 2])
        assert choice.text in options and choice.finish_reason == "stop"
        seen.add(choice.text)
    assert len(seen) > 1
    pattern = r"[a-c]{3}-[0-9]{2}(x|yz)?"
    for seed in range(4):
        assert re.fullmatch(pattern, complete(client, {"regex": pattern}, seed).text)
    grammar = 'root ::= "x=" digit digit? (";" | "!")\ndigit ::= [0-9]'
    for seed in range(4):
        assert re.fullmatch(r"x=[0-9][0-9]?[;!]", complete(client, {"grammar": grammar}, seed, model="beta").text)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for form in (schema, json.dumps(schema)):  # vLLM takes the schema as an object or as its JSON text
        jsonschema.validate(json.loads(complete(client, {"json": form}, 5).text), schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    text = client.completions.create(model=BASE, prompt="x", max_tokens=40, temperature=0.0,
                                     extra_body={"response_format": fmt}).choices[0].text
    jsonschema.validate(json.loads(text), schema)


# --- bad input: one-line 400s naming the field --------------------------------------------------------
BAD = [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format", "bogus"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format", "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format", "name"),
    ("completions", {"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "regex"),
    ("completions", {"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs", "nothing"),
    ("completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs", "JSON"),
    ("completions", {"structured_outputs": {"json": False}}, "structured_outputs", "schema"),
    ("completions", {"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ("completions", {"structured_outputs": {"lark": "start: 'a'"}}, "structured_outputs", "lark"),
    ("completions", {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs", "either"),
]


@pytest.mark.parametrize("route,extra,param,word", BAD)
def test_bad_structured_output_is_a_one_line_400(server, route, extra, param, word):
    body = {"model": BASE, "max_tokens": 4, **extra}
    body.update({"messages": CHAT} if route == "chat" else {"prompt": "Hello"})
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and word in error["message"] and "\n" not in error["message"], error


# --- the engine: a failing matcher ends its row only ---------------------------------------------------
class FailingGrammar:
    """A grammar whose matcher raises on its third token."""

    def __init__(self, inner):
        self.inner = inner

    def matcher(self):
        real = self.inner.matcher()
        calls = {"n": 0}

        class Broken:
            ended = False

            def mask(self, logits):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("matcher exploded")
                return real.mask(logits)

            def accept(self, token):
                real.accept(token)

        return Broken()


def test_a_failing_matcher_ends_its_row_only(paths):
    tokenizer = tiny_tokenizer()
    engine = Engine(build_base(), tokenizer, AdapterRegistry(paths["adapters"]), max_batch=8)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), engine.eos_ids)
    grammar = compiler.compile(Constraint("json_object"))
    ids = tokenizer("Hello there")["input_ids"]

    def request(adapter, g, seed):
        return GenerationRequest(ids, adapter, SamplingParams(max_tokens=10, temperature=1.0, seed=seed,
                                                              ignore_eos=True, grammar=g))

    def drive(requests):
        events = [[] for _ in requests]
        for i, r in enumerate(requests):
            engine.submit(r, events[i].append)
        while engine.busy:
            engine.step()
        return events

    plain = [request(None, None, 1), request("alpha", None, 2)]
    alone = drive(plain)
    mixed = drive([plain[0], request("beta", FailingGrammar(grammar), 3), plain[1], request(None, grammar, 4)])
    assert mixed[1][-1].kind == "error" and "matcher exploded" in str(mixed[1][-1].error)
    assert [e.text for e in mixed[0]] == [e.text for e in alone[0]]
    assert [e.text for e in mixed[2]] == [e.text for e in alone[1]]
    assert mixed[3][-1].kind == "done"


def test_bitmask_unpacking_matches_the_bit_layout():
    from loraforge.serve.constrain import allowed_numpy, allowed_torch, apply_bitmask

    gen = torch.Generator().manual_seed(0)
    vocab = 70  # not a multiple of 32: the last word is partly padding
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (3,), dtype=torch.int32, generator=gen)
    oracle = torch.tensor([bool((int(words[t // 32]) >> (t % 32)) & 1) for t in range(vocab)])
    assert torch.equal(allowed_numpy(words, vocab), oracle)
    assert torch.equal(allowed_torch(words, vocab, "cpu"), oracle)
    logits = torch.randn(vocab, generator=gen)
    masked = apply_bitmask(logits, words)
    assert torch.equal(masked[oracle], logits[oracle]) and bool((masked[~oracle] == float("-inf")).all())
