"""Scoring through the server (issue 13): completions prompts as texts or token ids (one choice
per prompt), `echo` and `logprobs` in the OpenAI/vLLM shape checked against a direct
transformers forward with the same adapter, `max_tokens: 0` scoring, and scoring rows batched
with other tenants' generating rows without changing either's result."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from factory import tiny_tokenizer
from serve_fixture import ServerThread, build_base, shared_setup
from transformers import LlamaForCausalLM

from loraforge.core.io import load_adapter
from loraforge.core.ops import set_adapter
from loraforge.serve.api import create_app
from loraforge.serve.engine import Engine, GenerationRequest, SamplingParams, TokenLogprob
from loraforge.serve.server import build_state

BASE = "tiny-base"
MODELS = [BASE, "alpha", "beta", "gamma"]
TEXTS = ["The quick brown fox", "What is the capital of France?", "Hello", "Paris is the capital of France."]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def paths():
    return shared_setup()


@pytest.fixture(scope="module")
def server(paths):
    state = build_state(str(paths["base"]), str(paths["adapters"]), max_batch=32, max_loaded=4, served_name=BASE)
    with ServerThread(create_app(state)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def ids_of(text: str) -> list[int]:
    return tiny_tokenizer()(text)["input_ids"]


def reference_model(paths, model: str) -> LlamaForCausalLM:
    """The base model as transformers loads it, with `model`'s adapter attached by loraforge."""
    net = LlamaForCausalLM.from_pretrained(paths["base"]).eval()
    if model != BASE:
        load_adapter(net, paths["adapters"] / model, model)
        set_adapter(net, model)
    return net


def reference_logprobs(net: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits for `ids`: row i is the distribution of token i + 1."""
    with torch.no_grad():
        logits = net(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def greedy_continuation(net: LlamaForCausalLM, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(reference_logprobs(net, ids)[-1].argmax()))
    return ids


def post(http, **body) -> dict:
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- prompts ------------------------------------------------------------------------------------------
def test_every_prompt_shape_gives_one_choice_per_prompt_in_order(http):
    greedy = {"model": "alpha", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    alone = [post(http, prompt=text, **greedy)["choices"][0]["text"] for text in TEXTS]
    as_texts = post(http, prompt=TEXTS, **greedy)
    as_ids = post(http, prompt=[ids_of(text) for text in TEXTS], **greedy)
    assert [c["index"] for c in as_texts["choices"]] == list(range(len(TEXTS)))
    assert [c["text"] for c in as_texts["choices"]] == alone
    assert [c["text"] for c in as_ids["choices"]] == alone
    assert post(http, prompt=ids_of(TEXTS[1]), **greedy)["choices"][0]["text"] == alone[1]
    assert as_texts["usage"]["completion_tokens"] == 6 * len(TEXTS)
    assert as_texts["usage"]["prompt_tokens"] == sum(len(ids_of(text)) for text in TEXTS)
    assert len(set(alone)) > 1


# --- echo and logprobs --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_echo_logprobs_equal_transformers_for_prompt_and_greedy_tokens(client, paths, model):
    prompt = ids_of(TEXTS[3])
    result = client.completions.create(model=model, prompt=[prompt], max_tokens=5, temperature=0, echo=True,
                                       logprobs=3, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(prompt) + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    net = reference_model(paths, model)
    everything = greedy_continuation(net, prompt, 5)
    want = reference_logprobs(net, everything)
    assert lp.tokens == [tiny_tokenizer().decode([t]) for t in everything]
    diffs = [abs(lp.token_logprobs[i] - float(want[i - 1, everything[i]])) for i in range(1, len(everything))]
    assert max(diffs) < TOLERANCE, max(diffs)
    for i in range(len(prompt), len(everything)):  # greedy: the chosen token is the most likely
        assert everything[i] == int(want[i - 1].argmax())
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-6)
    for i in range(1, len(everything)):  # tokens with the same text (byte pieces) share one key
        best = want[i - 1].topk(3).values.tolist()
        assert 1 <= len(lp.top_logprobs[i]) <= 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(best[0], abs=TOLERANCE)
        assert all(min(abs(v - b) for b in best) < TOLERANCE for v in lp.top_logprobs[i].values())
    print(f"{model}: max |logprob - transformers| = {max(diffs):.2e}")


def test_logprobs_without_echo_cover_the_generated_tokens_only(http):
    text = TEXTS[0]
    out = post(http, model="beta", prompt=text, max_tokens=4, temperature=0, logprobs=2, ignore_eos=True)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(len(top) == 2 for top in lp["top_logprobs"])
    assert all(value <= 0 and math.isfinite(value) for value in lp["token_logprobs"])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == len(text)
    assert [b - a for a, b in zip(lp["text_offset"], lp["text_offset"][1:])] == [len(t) for t in lp["tokens"][:-1]]


def test_echo_without_logprobs_prepends_the_prompt(http):
    plain = post(http, model="gamma", prompt=TEXTS[2], max_tokens=3, temperature=0, ignore_eos=True)
    echoed = post(http, model="gamma", prompt=TEXTS[2], max_tokens=3, temperature=0, ignore_eos=True, echo=True)
    assert echoed["choices"][0]["text"] == TEXTS[2] + plain["choices"][0]["text"]
    assert echoed["choices"][0]["logprobs"] is None


def test_max_tokens_zero_with_echo_scores_the_prompt_only(http, paths):
    prompt = ids_of(TEXTS[1])
    out = post(http, model="alpha", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = out["choices"][0]
    assert choice["text"] == tiny_tokenizer().decode(prompt)
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    want = reference_logprobs(reference_model(paths, "alpha"), prompt)
    assert lp["tokens"] == [tiny_tokenizer().decode([t]) for t in prompt]
    assert lp["text_offset"][0] == 0
    got = torch.tensor(lp["token_logprobs"][1:])
    assert torch.allclose(got, want[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=TOLERANCE)


# --- scoring beside generating ------------------------------------------------------------------------
def score(http, model: str, text: str) -> list:
    return post(http, model=model, prompt=text, max_tokens=0, echo=True, logprobs=2)["choices"][0]["logprobs"]


def generate(http, model: str, text: str) -> str:
    return post(http, model=model, prompt=text, max_tokens=8, temperature=0, ignore_eos=True)["choices"][0]["text"]


def test_scoring_rows_beside_generating_rows_change_neither(http):
    jobs = [(kind, model, text) for kind in ("score", "generate") for model in MODELS for text in TEXTS]
    assert len(jobs) == 32

    def one(job):
        kind, model, text = job
        return score(http, model, text) if kind == "score" else generate(http, model, text)

    alone = [one(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    for job, want, got in zip(jobs, alone, together):
        if job[0] == "generate":
            assert got == want, job  # token for token
        else:  # the same tokens and top tokens; scores equal up to float32 rounding of a padded batch
            assert got["tokens"] == want["tokens"], job
            assert scores_of(got) == pytest.approx(scores_of(want), abs=1e-5), job


def scores_of(logprobs: dict) -> list[float]:
    """Every number of a scored prompt (its first token has none), top tokens in key order."""
    values = list(logprobs["token_logprobs"][1:])
    for top in logprobs["top_logprobs"][1:]:
        values += [top[key] for key in sorted(top)]
    return values


# --- n samples per prompt -------------------------------------------------------------------------------
SAMPLED = {"max_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True}


def texts(out: dict) -> list[str]:
    assert [c["index"] for c in out["choices"]] == list(range(len(out["choices"])))
    return [c.get("text", c.get("message", {}).get("content")) for c in out["choices"]]


def test_n_samples_are_distinct_reproducible_and_sample_0_is_the_n_1_answer(http):
    four = post(http, model="beta", prompt=TEXTS[0], n=4, **SAMPLED)
    assert len(set(texts(four))) == 4
    assert texts(post(http, model="beta", prompt=TEXTS[0], n=4, **SAMPLED)) == texts(four)
    assert texts(post(http, model="beta", prompt=TEXTS[0], n=1, **SAMPLED)) == texts(four)[:1]
    assert four["usage"]["prompt_tokens"] == len(ids_of(TEXTS[0]))  # the prompt counts once
    assert four["usage"]["completion_tokens"] == 4 * 8


def test_n_with_several_prompts_orders_choices_prompt_by_prompt(http):
    both = post(http, model="alpha", prompt=TEXTS[:2], n=3, **SAMPLED)
    each = [texts(post(http, model="alpha", prompt=text, n=3, **SAMPLED)) for text in TEXTS[:2]]
    assert texts(both) == each[0] + each[1]


def test_chat_n_samples(client):
    messages = [{"role": "user", "content": TEXTS[1]}]
    first, again = (client.chat.completions.create(model="gamma", messages=messages, n=3, max_tokens=8,
                                                   temperature=1.0, seed=11) for _ in range(2))
    got = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(got)) == 3 and got == [c.message.content for c in again.choices]


# --- chat logprobs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["alpha", "gamma"])
def test_chat_logprobs_equal_transformers_for_greedy_tokens(client, paths, model):
    messages = [{"role": "user", "content": TEXTS[1]}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=4, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    tokenizer = tiny_tokenizer()
    prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    net = reference_model(paths, model)
    everything = greedy_continuation(net, prompt, 5)
    want = reference_logprobs(net, everything)
    assert [entry.token for entry in content] == [tokenizer.decode([t]) for t in everything[len(prompt):]]
    for k, entry in enumerate(content):
        position = len(prompt) + k - 1
        assert abs(entry.logprob - float(want[position, everything[position + 1]])) < TOLERANCE
        assert entry.bytes == list(entry.token.encode("utf-8"))
        best = want[position].topk(4).values.tolist()
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(best, abs=TOLERANCE)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == out.choices[0].message.content


# --- /tokenize and /detokenize --------------------------------------------------------------------------
def test_tokenize_and_detokenize_in_vllm_shapes(http):
    tokenizer = tiny_tokenizer()
    out = http.post("/tokenize", json={"model": "alpha", "prompt": TEXTS[1]}).json()
    assert out == {"count": len(ids_of(TEXTS[1])), "max_model_len": 512, "tokens": ids_of(TEXTS[1])}
    messages = [{"role": "user", "content": TEXTS[0]}]
    chat = http.post("/tokenize", json={"model": BASE, "messages": messages}).json()
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer(template, add_special_tokens=False)["input_ids"]
    bare = http.post("/tokenize", json={"model": BASE, "messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][:bare["count"]] and bare["count"] < chat["count"]
    back = http.post("/detokenize", json={"model": "gamma", "tokens": out["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(out["tokens"])}
    scored = post(http, model="alpha", prompt=chat["tokens"], max_tokens=0, echo=True)
    assert scored["choices"][0]["text"] == tokenizer.decode(chat["tokens"])


def test_the_tokenizer_routes_need_the_api_key(paths):
    state = build_state(str(paths["base"]), str(paths["adapters"]), max_batch=2, served_name=BASE)
    with ServerThread(create_app(state, api_key="k")) as srv:
        for route, body in (("/tokenize", {"model": BASE, "prompt": "Hi"}), ("/detokenize", {"model": BASE,
                                                                                             "tokens": [5]})):
            assert httpx.post(srv.url + route, json=body).status_code == 401
            assert httpx.post(srv.url + route, json=body, headers={"Authorization": "Bearer k"}).status_code == 200


# --- the engine: prompt logits only for the rows that score ---------------------------------------------
def test_only_scoring_rows_keep_every_prompt_position_and_nan_fails_only_its_row():
    engine = Engine(build_base(), tiny_tokenizer(), None, max_batch=8)
    forward, calls = engine._forward, []

    def nan_for_broken(ids, *args, **kwargs):
        """Records (rows, every_position); the row whose prompt ends in token 10 gets NaN logits."""
        calls.append((ids.shape[0], kwargs.get("every_position", False)))
        logits = forward(ids, *args, **kwargs).clone()
        logits[ids[:, -1] == 10] = float("nan")
        return logits

    events = {name: [] for name in ("plain1", "score", "plain2", "broken")}
    plain = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=1)
    for name, params in (("plain1", plain), ("score", scoring), ("plain2", plain), ("broken", scoring)):
        engine.submit(GenerationRequest([9, 10] if name == "broken" else [5, 6, 7], None, params),
                      events[name].append)
    engine._forward = nan_for_broken
    engine.step()
    # plain rows together, scoring rows apart (every position), retried alone when one fails, then decode
    assert calls == [(2, False), (2, True), (1, True), (1, True), (2, False)]
    while any(not ev or ev[-1].kind == "delta" for ev in events.values()):
        engine.step()
    assert [events[name][-1].kind for name in events] == ["done", "done", "done", "error"]
    assert "NaN or infinite logits" in str(events["broken"][-1].error)
    assert events["plain1"][-1].logprobs == [] and events["plain1"][-1].completion_tokens == 2
    done = events["score"][-1]
    assert done.completion_tokens == 0 and len(done.logprobs) == 3
    assert done.logprobs[0] == TokenLogprob(5, None, None)
    assert all(e.logprob <= 0 and len(e.top) == 1 for e in done.logprobs[1:])
