"""`loraforge serve` over HTTP, driven by the real `openai` client (and httpx for raw bodies):
models list, completions and chat per adapter, streaming, errors, runtime adapters, LRU, a corrupt
adapter, concurrency, the queue limit, API keys, --merge, and the CLI with SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_fixture import CONTEXT, ServerThread, free_port, shared_setup

from loraforge.serve.api import create_app
from loraforge.serve.server import build_state

BASE = "tiny-base"
MODELS = [BASE, "alpha", "beta", "gamma"]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def paths():
    return shared_setup()


def start(paths, api_key: str | None = None, **kwargs) -> ServerThread:
    options = {"max_batch": 8, "max_loaded": 2, "allow_roots": [str(paths["extra"])], "served_name": BASE}
    state = build_state(str(paths["base"]), str(paths["adapters"]), **{**options, **kwargs})
    return ServerThread(create_app(state, api_key=api_key))


@pytest.fixture(scope="module")
def server(paths):
    with start(paths) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, model: str, prompt: str = "The quick brown fox", **kwargs) -> str:
    return client.completions.create(model=model, prompt=prompt, **{**GREEDY, **kwargs}).choices[0].text


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# --- models, completions, chat, streaming -------------------------------------------------------------
def test_models_list_has_the_base_and_every_adapter(client, paths):
    cards = {m.id: m for m in client.models.list().data}
    assert {BASE, "alpha", "beta", "gamma"} <= set(cards)
    assert cards[BASE].parent is None
    for name in ("alpha", "beta", "gamma"):
        assert cards[name].parent == BASE
        assert cards[name].root == str((paths["adapters"] / name).resolve())


def test_completions_and_chat_for_each_model(client):
    texts, chats = {}, {}
    for model in MODELS:
        result = client.completions.create(model=model, prompt="The quick brown fox", **GREEDY)
        assert result.model == model and result.choices[0].finish_reason == "length"
        assert result.usage.completion_tokens == 8
        assert result.usage.total_tokens == result.usage.prompt_tokens + 8
        texts[model] = result.choices[0].text
        chat = client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.prompt_tokens > result.usage.prompt_tokens  # the chat template adds turns
        chats[model] = chat.choices[0].message.content
    assert len(set(texts.values())) == len(MODELS) and len(set(chats.values())) == len(MODELS)


def test_streaming_gives_the_same_text(client):
    for model in ("beta", "gamma"):
        want = complete(client, model)
        chunks = list(client.completions.create(model=model, prompt="The quick brown fox", stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 8
        chat_want = client.chat.completions.create(model=model, messages=CHAT, **GREEDY).choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=CHAT, stream=True, **GREEDY)
        deltas = [c.choices[0].delta for c in stream]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == chat_want


def test_raw_stream_is_server_sent_events(server):
    body = {"model": "alpha", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_concurrent_mixed_requests_match_solo(client):
    jobs = [(model, prompt) for model in MODELS for prompt in ("Hello", "The quick brown fox", "Paris is")]
    solo = [complete(client, m, p) for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(client, *job), jobs))
    assert together == solo


# --- errors -------------------------------------------------------------------------------------------------
def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "nosuch")
    assert err.value.body["code"] == "model_not_found" and err.value.body["type"] == "not_found_error"


@pytest.mark.parametrize("name", ["../alpha", "..", "/etc/passwd", "alpha/../../base", "./alpha", "a b"])
def test_adapter_names_that_are_paths_are_400(client, name):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, name)
    assert set(err.value.body) == {"message", "type", "param", "code"}
    assert err.value.body["param"] == "model"


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b'{"prompt": "hi"}',
    b'{"model": "alpha", "prompt": "hi", "max_tokens": "5"}',
    b'{"model": "alpha", "prompt": "hi", "temperature": "hot"}',
    b'{"model": "alpha", "prompt": "hi", "n": 0}',
    b'{"model": "alpha", "prompt": "hi", "max_tokens": 0}',
    b'{"model": "alpha", "prompt": ["a", 5]}',
    b'{"model": "alpha", "prompt": "hi", "best_of": 2}',
    b'{"model": "alpha", "prompt": [1, 99999999]}',
    b'{"model": 5, "prompt": "hi"}',
])
def test_malformed_completion_bodies_are_400(server, body):
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("body", [{"model": "alpha", "messages": []}, {"model": "alpha", "messages": "hi"},
                                  {"model": "alpha", "messages": [{"role": "user", "content": 3}]}])
def test_malformed_chat_bodies_are_400(server, body):
    assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 400


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt=[5] * CONTEXT, max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="Hello", max_tokens=CONTEXT)


# --- adapters: runtime loading, LRU, corrupt files ---------------------------------------------------------
def test_runtime_load_and_unload(server, client, paths, tmp_path):
    post = lambda path, body: httpx.post(server.url + path, json=body)  # noqa: E731
    outside = post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(paths["outside"] / "evil")})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "path_not_allowed"
    dotdot = str(paths["extra"] / ".." / "outside" / "evil")
    assert post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": dotdot}).status_code == 403
    link = paths["extra"] / "link-out"
    link.symlink_to(paths["outside"] / "evil")
    try:
        assert post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(link)}).status_code == 403
    finally:
        link.unlink()
    assert post("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": str(paths["extra"] / "delta")}
                ).status_code == 400
    assert post("/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(paths["extra"] / "delta")}
                ).status_code == 400  # taken by the adapters directory

    loaded = post("/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": str(paths["extra"] / "delta")})
    assert loaded.status_code == 200, loaded.text
    assert "delta" in {m.id for m in client.models.list().data}
    assert complete(client, "delta") != complete(client, BASE)
    assert post("/v1/unload_lora_adapter", {"lora_name": "delta"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "delta")
    assert post("/v1/unload_lora_adapter", {"lora_name": "delta"}).status_code == 404
    assert post("/v1/unload_lora_adapter", {"lora_name": "alpha"}).status_code == 400  # lives in the directory


def test_lru_evicts_and_reloads_transparently(server, client):
    first = complete(client, "alpha")
    loads = metric(server, "loraforge_adapter_loads_total")
    evictions = metric(server, "loraforge_adapter_evictions_total")
    for model in ("beta", "gamma", "alpha"):  # 2 slots: alpha is evicted, then reloaded
        complete(client, model)
    assert complete(client, "alpha") == first
    assert metric(server, "loraforge_adapter_loads_total") >= loads + 2
    assert metric(server, "loraforge_adapter_evictions_total") >= evictions + 2
    assert metric(server, "loraforge_loaded_adapters") == 2


def test_corrupt_adapter_fails_only_its_own_requests(client):
    want = complete(client, "alpha")

    def call(model):
        try:
            return complete(client, model)
        except openai.BadRequestError as err:
            return err

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, ["broken", "alpha", "otherbase", "alpha", "broken", BASE]))
    for index in (0, 2, 4):
        assert isinstance(results[index], openai.BadRequestError)
        assert results[index].body["code"] == "adapter_load_failed"
    assert "safetensors" in results[0].body["message"] and "base model" in results[2].body["message"]
    assert results[1] == results[3] == want and isinstance(results[5], str)


def test_metrics_and_health(server, client):
    complete(client, "beta")
    text = httpx.get(server.url + "/metrics").text
    for name in ("loraforge_requests_total", "loraforge_generated_tokens_total", "loraforge_queue_depth",
                 "loraforge_loaded_adapters", "loraforge_time_to_first_token_seconds_bucket",
                 "loraforge_time_per_output_token_seconds_bucket"):
        assert name in text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# --- limits, keys, merge --------------------------------------------------------------------------------------
def test_full_queue_is_429_and_a_disconnect_frees_the_slot(paths):
    with start(paths, max_batch=1, max_queue=0) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        stream = client.completions.create(model="alpha", prompt="Hello", max_tokens=CONTEXT - 10, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # the long request now holds the only batch row
        with pytest.raises(openai.RateLimitError) as err:
            complete(client, "beta")
        assert err.value.body["code"] == "queue_full"
        stream.close()  # the client goes away mid-stream
        deadline = time.time() + 10
        while metric(srv, "loraforge_running_requests") > 0 and time.time() < deadline:
            time.sleep(0.05)
        assert metric(srv, "loraforge_running_requests") == 0
        assert complete(client, "beta")  # served again


def test_api_key_is_required_when_set(paths):
    with start(paths, api_key="sekret") as srv:
        missing = httpx.get(srv.url + "/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.post(srv.url + "/v1/completions", content=b"{bad").status_code == 401  # before the body
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert complete(good, "alpha")
        assert httpx.get(srv.url + "/health").status_code == 200


def test_merge_serves_one_model_with_the_same_output(paths, client):
    want = complete(client, "gamma")
    with start(paths, merge="gamma") as srv:
        merged = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in merged.models.list().data] == ["gamma"]
        assert complete(merged, "gamma") == want
        for other in (BASE, "alpha"):
            with pytest.raises(openai.NotFoundError):
                complete(merged, other)
        refused = httpx.post(srv.url + "/v1/load_lora_adapter",
                             json={"lora_name": "delta", "lora_path": str(paths["extra"] / "delta")})
        assert refused.status_code == 400


# --- the command line -----------------------------------------------------------------------------------------
def test_cli_serves_and_finishes_streams_on_sigterm(paths):
    port = free_port()
    command = [sys.executable, "-m", "loraforge", "serve", "--model", str(paths["base"]), "--adapters",
               str(paths["adapters"]), "--port", str(port), "--max-batch", "4", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert str(paths["base"]) in {m.id for m in client.models.list().data}
        chunks = []
        stream = client.completions.create(model="beta", prompt="Hello", max_tokens=300, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        reader = threading.Thread(target=lambda: chunks.extend(stream))
        reader.start()
        deadline = time.time() + 30
        while not chunks and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)  # graceful: the stream in flight still completes
        reader.join(60)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert process.wait(30) == 0
        assert b"Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read().decode())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy")
