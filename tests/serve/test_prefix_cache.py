"""The prefix cache (serve.prefix_cache): a repeated prompt prefix is read from cached KV blocks
instead of being prefilled again, keyed by adapter and version, within an LRU memory budget.
The oracle everywhere is a cold run: the same requests on an engine without the cache give the
same greedy text and logprobs within 1e-5."""
from __future__ import annotations

import math

import pytest
import torch
from factory import tiny_tokenizer
from serve_fixture import build_base, record_event, save_loraforge_adapter, shared_setup
from test_architectures_serve import ADAPTER, serve_engine

from loraforge import LoraError
from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.engine import Engine, GenerationRequest, SamplingParams
from loraforge.serve.prefix_cache import BLOCK, DEFAULT_PREFIX_CACHE_MB, PrefixCache
from loraforge.serve.server import build_state

SYSTEM = ("You are a helpful AI assistant. Answer the question in one short sentence. "
          "Low-rank adaptation trains two small matrices instead of the full weight. ")
TOL = 1e-5


@pytest.fixture(scope="module")
def paths():
    return shared_setup()


def ids_of(text: str) -> list[int]:
    return tiny_tokenizer()(text)["input_ids"]


def engine_for(paths, mb: float = 64.0, registry: AdapterRegistry | None = None) -> Engine:
    registry = registry or AdapterRegistry(paths["adapters"])
    return Engine(build_base(), tiny_tokenizer(), registry, max_batch=8, max_loaded=3, prefix_cache_mb=mb)


def request(ids: list[int], adapter: str | None, n: int = 8, **params) -> GenerationRequest:
    return GenerationRequest(ids, adapter, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                          logprobs=2, **params))


def run(engine: Engine, requests: list[GenerationRequest]) -> list[dict]:
    """Submit all, step until done; each result: text, generated tokens, logprobs (floats)."""
    results = [{"text": "", "done": None} for _ in requests]
    seqs = []
    for req, result in zip(requests, results):
        seqs.append(engine.submit(req, lambda ev, r=result: record_event(r, ev)))
    while any(r["done"] is None for r in results):
        engine.step()
    for seq, result in zip(seqs, results):
        assert result["done"].kind == "done", result["done"].error
        result["tokens"] = seq.generated
        result["logprobs"] = [lp.logprob for lp in result["done"].logprobs]
    return results




def assert_same(got: dict, want: dict):
    assert got["tokens"] == want["tokens"]
    assert got["text"] == want["text"]
    assert len(got["logprobs"]) == len(want["logprobs"])
    for a, b in zip(got["logprobs"], want["logprobs"]):
        assert (a is None and b is None) or abs(a - b) < TOL, (a, b)


def counts(engine: Engine) -> tuple[int, int, int]:
    m = engine.metrics
    return (int(m.prefix_hits._value.get()), int(m.prefix_misses._value.get()),
            int(m.prefix_hit_tokens._value.get()))


def test_a_repeated_request_hits_and_equals_a_cold_run(paths):
    prompt = ids_of(SYSTEM + "What is the capital of France?")
    assert len(prompt) > 2 * BLOCK
    cold = run(engine_for(paths, mb=0), [request(prompt, "alpha")])[0]
    engine = engine_for(paths)
    first = run(engine, [request(prompt, "alpha")])[0]
    assert counts(engine) == (0, 1, 0)
    second = run(engine, [request(prompt, "alpha")])[0]
    reused = (len(prompt) - 1) // BLOCK * BLOCK  # full blocks, the last prompt token always prefilled
    assert counts(engine) == (1, 1, reused)
    assert_same(first, cold)
    assert_same(second, cold)
    text = engine.metrics.render().decode()
    assert "loraforge_prefix_cache_hits_total 1.0" in text
    assert f"loraforge_prefix_cache_bytes {float(engine.prefix.nbytes)}" in text


def test_prompt_logprobs_are_computed_in_full_on_a_warm_cache(paths):
    """A request that scores its prompt needs every position's logits: it reads nothing from
    the cache (only fills it), and its prompt logprobs equal a cold run's."""
    prompt = ids_of(SYSTEM + "Hello")
    cold = run(engine_for(paths, mb=0), [request(prompt, "beta", prompt_logprobs=2)])[0]
    engine = engine_for(paths)
    run(engine, [request(prompt, "beta")])
    warm = run(engine, [request(prompt, "beta", prompt_logprobs=2)])[0]
    assert counts(engine)[0] == 0  # not a hit
    assert_same(warm, cold)
    assert run(engine, [request(prompt, "beta")])[0]["tokens"] == cold["tokens"]
    assert counts(engine)[0] == 1


def test_the_same_prompt_on_another_adapter_misses_and_equals_its_cold_run(paths):
    prompt = ids_of(SYSTEM + "Translate to French: good morning.")
    engine = engine_for(paths)
    run(engine, [request(prompt, "alpha")])
    for adapter in ("beta", None):
        got = run(engine, [request(prompt, adapter)])[0]
        assert_same(got, run(engine_for(paths, mb=0), [request(prompt, adapter)])[0])
    assert counts(engine) == (0, 3, 0)


def test_mixed_batch_of_hits_partial_hits_and_misses_equals_cold(paths):
    """Rows with cached prefixes of different lengths, cold rows and other adapters in one prefill."""
    shared = SYSTEM + "Summarise the text below, then list three key points. "
    system = ids_of(SYSTEM)
    warm = [request(ids_of(shared + "The quick brown fox."), "alpha"), request(ids_of(SYSTEM + "Hi"), "gamma"),
            request(system, "beta")]
    long_text = ids_of("Write a haiku about the sea and the wind in the evening. " * 4)
    batch = [request(system[:BLOCK] + long_text, "beta", n=5),  # one cached block, a long new part...
             request(system[:BLOCK + 2], "beta", n=6),  # ...so this row's cached block is recomputed
             request(ids_of(shared + "Write a haiku about the sea."), "alpha", n=6),
             request(ids_of(SYSTEM + "Hi there, who are you?"), "gamma", n=9),
             request(ids_of("Hello"), "alpha", n=5),
             request(ids_of(shared + "The quick brown fox."), "alpha", n=7),
             request(ids_of(shared + "The quick brown fox."), None, n=7)]
    cold = run(engine_for(paths, mb=0), batch)
    engine = engine_for(paths)
    run(engine, warm)
    for got, want in zip(run(engine, batch), cold):
        assert_same(got, want)
    assert counts(engine)[2] > 0


def test_an_adapter_reloaded_under_the_same_name_misses(paths, tmp_path):
    """Unloading `dyn` and loading other weights under that name must not reuse its KV."""
    old = save_loraforge_adapter(tmp_path / "old", 4, "all-linear", seed=21)
    new = save_loraforge_adapter(tmp_path / "new", 4, "all-linear", seed=22)
    registry = AdapterRegistry(paths["adapters"], [tmp_path])
    engine = engine_for(paths, registry=registry)
    prompt = ids_of(SYSTEM + "What is the capital of France?")
    registry.register("dyn", str(old))
    before = run(engine, [request(prompt, "dyn")])[0]
    engine.adapters.retire("dyn")
    registry.unregister("dyn")
    registry.register("dyn", str(new))
    after = run(engine, [request(prompt, "dyn")])[0]
    assert counts(engine)[0] == 0
    cold_registry = AdapterRegistry(paths["adapters"], [tmp_path])
    cold_registry.register("dyn", str(new))
    assert_same(after, run(engine_for(paths, mb=0, registry=cold_registry), [request(prompt, "dyn")])[0])
    assert after["tokens"] != before["tokens"]


def test_re_registering_the_same_files_is_a_new_version(paths, tmp_path):
    """The registry's version is part of the key, even when the files (their stamp) are unchanged."""
    path = save_loraforge_adapter(tmp_path / "same", 2, ["q_proj"], seed=5)
    registry = AdapterRegistry(None, [tmp_path])
    engine = engine_for(paths, registry=registry)
    registry.register("same", str(path))
    seq = engine.submit(request([5, 6, 7], "same"), lambda ev: None)
    engine.step()
    key = engine._adapter_key(seq)
    engine.adapters.retire("same")
    registry.unregister("same")
    registry.register("same", str(path))
    seq = engine.submit(request([5, 6, 7], "same"), lambda ev: None)
    engine.step()
    assert engine._adapter_key(seq) != key
    assert engine._adapter_key(seq)[2] == key[2]  # same files


def test_lru_eviction_under_a_tiny_budget(paths):
    engine = engine_for(paths)
    prompt_a = ids_of(SYSTEM * 2 + "A?")
    run(engine, [request(prompt_a, "alpha")])
    block_bytes = engine.prefix.nbytes // len(engine.prefix.blocks)
    tiny = engine_for(paths, mb=2.5 * block_bytes / 2 ** 20)  # room for two blocks
    cold = run(engine_for(paths, mb=0), [request(prompt_a, "alpha")])[0]
    assert len(prompt_a) // BLOCK >= 4
    assert_same(run(tiny, [request(prompt_a, "alpha")])[0], cold)
    evicted = int(tiny.metrics.prefix_evictions._value.get())
    assert evicted == len(prompt_a) // BLOCK - 2
    assert len(tiny.prefix.blocks) == 2 and tiny.prefix.nbytes <= tiny.prefix.budget
    again = run(tiny, [request(prompt_a, "alpha")])[0]  # the first two blocks (the chain's head) stayed
    assert counts(tiny) == (1, 1, 2 * BLOCK)
    assert_same(again, cold)
    run(tiny, [request(ids_of("Write a haiku about the sea and the wind in the evening. " * 3), "alpha")])
    assert counts(tiny)[:2] == (1, 2)
    run(tiny, [request(prompt_a, "alpha")])  # the newer prompt took the room: a miss now
    assert counts(tiny)[:2] == (1, 3)


def test_prefix_cache_lru_order_unit():
    cache = PrefixCache(budget_bytes=3 * 2 * 4 * 4, block=2)  # three blocks of one layer, 1 head, dim 2
    kv = [(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2))]
    cache.insert(("a",), [1, 2, 3, 4], kv)
    cache.insert(("b",), [1, 2], [(k[:, :2], v[:, :2]) for k, v in kv])
    assert len(cache.lookup(("a",), [1, 2, 3, 4, 5], 5)) == 2  # refreshes a's chain
    cache.insert(("c",), [9, 9], [(k[:, :2], v[:, :2]) for k, v in kv])
    assert cache.lookup(("b",), [1, 2, 0], 3) == []  # b was least recently used
    assert len(cache.lookup(("a",), [1, 2, 3, 4], 4)) == 2
    assert cache.lookup(("a",), [1, 2, 3, 4], 3) != [] and len(cache.lookup(("a",), [1, 2, 3, 4], 3)) == 1
    with pytest.raises(LoraError, match="budget"):
        PrefixCache(-1)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "opt", "gpt2"])
def test_windowed_and_other_architectures_hit_and_equal_cold(arch, tmp_path_factory):
    """Sliding-window models keep full KV in the engine, so a cached prefix longer than the window is
    exact too; OPT / GPT-2 (learned positions) as well."""
    root = tmp_path_factory.mktemp(f"prefix-{arch}")
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 128, (2 * BLOCK + 3,), generator=gen).tolist()
    prompts = [shared + [5, 6, 7], shared + [9], shared[:BLOCK + 2]]
    cold_engine = serve_engine(arch, root)
    cold = run(cold_engine, [request(p, m, n=12) for p in prompts for m in (ADAPTER, None)])
    engine = serve_engine(arch, root)
    engine.prefix = PrefixCache(64 * 2 ** 20, engine.metrics)
    run(engine, [request(shared + [4], ADAPTER), request(shared + [4], None)])
    got = run(engine, [request(p, m, n=12) for p in prompts for m in (ADAPTER, None)])
    for a, b in zip(got, cold):
        assert_same(a, b)
    assert counts(engine)[0] == 6


@pytest.mark.parametrize("mb", [-1.0, math.nan, math.inf])
def test_bad_prefix_cache_budgets_are_refused(paths, mb):
    with pytest.raises(LoraError, match="--prefix-cache-mb"):
        build_state(str(paths["base"]), str(paths["adapters"]), prefix_cache_mb=mb)


def test_the_server_reports_hits_in_metrics_and_answers_alike(paths):
    """Through HTTP with the default budget: the second request hits, /metrics says so, and the
    texts equal a server started with --prefix-cache-mb 0."""
    import httpx
    from serve_fixture import ServerThread

    from loraforge.serve.api import create_app

    def serve(mb: float) -> ServerThread:
        return ServerThread(create_app(build_state(str(paths["base"]), str(paths["adapters"]), max_batch=4,
                                                   prefix_cache_mb=mb)))

    def complete(url: str, question: str) -> str:
        body = {"model": "alpha", "prompt": SYSTEM + question, "max_tokens": 8, "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    questions = ["Can I cancel?", "Is lunch included?"]
    with serve(0) as cold:
        want = [complete(cold.url, q) for q in questions]
    with serve(DEFAULT_PREFIX_CACHE_MB) as warm:
        got = [complete(warm.url, q) for q in questions]
        lines = httpx.get(warm.url + "/metrics").text.splitlines()
    assert got == want
    assert "loraforge_prefix_cache_hits_total 1.0" in lines
    assert "loraforge_prefix_cache_misses_total 1.0" in lines


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_the_cli_refuses_a_bad_prefix_cache_budget_in_one_line(paths, capsys, value):
    from loraforge.cli import main

    assert main(["serve", "--model", str(paths["base"]), "--prefix-cache-mb", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("loraforge serve: error: --prefix-cache-mb must be")
    assert "Traceback" not in err


def test_the_cli_refuses_a_non_number_prefix_cache_budget(paths, capsys):
    from loraforge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(paths["base"]), "--prefix-cache-mb", "lots"])
    assert exit_.value.code == 2
    assert "--prefix-cache-mb: invalid float value: 'lots'" in capsys.readouterr().err
