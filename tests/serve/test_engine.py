"""The serving engine without HTTP: the batched multi-adapter kernel, continuous batching with
mixed adapters (greedy output identical to solo runs), the adapter LRU, names and file format."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from serve_fixture import ADAPTERS, build_base, record_event, shared_setup
from factory import tiny_tokenizer

from loraforge.core.io import load_adapter
from loraforge.core.ops import mixed_batch, set_adapter
from loraforge.serve.adapters import (AdapterCache, AdapterNotFound, AdapterRegistry, BadAdapterName, check_name)
from loraforge.serve.engine import (Engine, GenerationRequest, QueueFull, SamplingParams, find_stop, held_back,
                                    top_p_filter)

PROMPTS = ["The quick brown fox", "What is the capital of France?", "Hello",
           "Write a haiku about the sea and the wind in the evening. " * 3]
MODELS = [None, *ADAPTERS]


@pytest.fixture(scope="module")
def paths():
    return shared_setup()


def make_engine(paths, **kwargs) -> Engine:
    model = build_base()
    return Engine(model, tiny_tokenizer(), AdapterRegistry(paths["adapters"]), **kwargs)


def run(engine: Engine, requests: list[GenerationRequest], stagger: int = 0) -> list[dict]:
    """Drive the engine (no thread) until all requests finish. With `stagger`, request i is
    submitted after i * stagger steps, so that requests join a batch already decoding."""
    results = [{"text": "", "tokens": None, "done": None} for _ in requests]
    pending = list(enumerate(requests))
    seqs, step = {}, 0
    while pending or any(r["done"] is None for r in results):
        while pending and pending[0][0] * stagger <= step:
            i, req = pending.pop(0)
            seqs[i] = engine.submit(req, lambda ev, r=results[i]: record_event(r, ev))
        engine.step()
        step += 1
    for i, r in enumerate(results):
        r["tokens"] = seqs[i].generated
    return results




def greedy(prompt: str, adapter: str | None, n: int = 12) -> GenerationRequest:
    ids = tiny_tokenizer()(prompt)["input_ids"]
    return GenerationRequest(ids, adapter, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


# --- the kernel ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plan,rows", [
    ("one", ["alpha"] * 4),
    ("groups", ["alpha", None, "beta", "gamma", "alpha"]),
    ("gather", ["alpha", None, "beta", "gamma", "alpha"]),
    ("rows", ["gamma", "beta", None, "alpha", "beta"]),
])
def test_router_kernel_equals_mixed_batch(paths, plan, rows):
    reference = build_base()
    for name in ADAPTERS:
        load_adapter(reference, paths["adapters"] / name, name, activate=False)
    engine = make_engine(paths, max_loaded=3)
    engine.kernel.group_limit = 4 if plan == "groups" else 0
    engine.kernel.rows_per_group = 1
    slots = {name: engine.adapters.acquire(name) for name in ADAPTERS}
    ids = torch.randint(0, 400, (len(rows), 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), mixed_batch(reference, rows):
        want = reference(ids).logits
    engine.kernel.set_rows([slots[r] if r else 0 for r in rows], reuse=plan == "rows")
    assert engine.kernel.plan[0] == plan
    with torch.no_grad():
        got = engine.model(ids).logits
        again = engine.model(ids).logits  # "rows" reuses its gathered weights
    engine.kernel.reset_rows()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.equal(got, again)
    with torch.no_grad():
        bare = build_base()(ids).logits
    assert torch.allclose(engine.model(ids).logits, bare, atol=1e-6)  # no rows set: the base model


# --- continuous batching ---------------------------------------------------------------------------
def test_batched_mixed_decode_equals_solo_token_for_token(paths):
    engine = make_engine(paths, max_batch=16, max_loaded=3, prefill_tokens=48)
    requests = [greedy(p, m, n=10 + 3 * i) for i, p in enumerate(PROMPTS) for m in MODELS]
    solo = [run(engine, [r])[0] for r in requests]
    together = run(engine, requests)
    engine.kernel.rows_per_group = 1  # per-adapter groups whenever there are at most 8 adapters
    staggered = run(engine, requests, stagger=2)  # joins between decode steps, leaves at different times
    engine.kernel.group_limit = 0  # the gathered-rows kernel path as well
    gathered = run(engine, requests, stagger=1)
    for i, want in enumerate(solo):
        assert want["done"].finish_reason == "length"
        assert together[i]["tokens"] == want["tokens"]
        assert staggered[i]["tokens"] == want["tokens"]
        assert gathered[i]["tokens"] == want["tokens"]
        assert together[i]["text"] == want["text"]
    outputs = {tuple(r["tokens"]) for r in solo[:len(MODELS)]}
    assert len(outputs) == len(MODELS)  # every adapter changes the output


def test_engine_output_equals_transformers_generate(paths):
    """Greedy tokens from the engine = transformers `generate` with the adapter attached."""
    engine = make_engine(paths, max_loaded=3)
    prompt = PROMPTS[1]
    ids = torch.tensor([tiny_tokenizer()(prompt)["input_ids"]])
    for name in MODELS:
        model = build_base()
        if name:
            load_adapter(model, paths["adapters"] / name, name)
            set_adapter(model, name)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert run(engine, [greedy(prompt, name, n=8)])[0]["tokens"] == out[0, ids.shape[1]:].tolist(), name


def test_broken_adapter_fails_only_its_requests(paths):
    engine = make_engine(paths, max_loaded=3)
    results = run(engine, [greedy("Hello", "alpha"), greedy("Hello", "broken"), greedy("Hello", None),
                           greedy("Hello", "otherbase"), greedy("Hello", "nosuch")])
    assert [r["done"].kind for r in results] == ["done", "error", "done", "error", "error"]
    assert "safetensors" in str(results[1]["done"].error)
    assert "another base model" in str(results[3]["done"].error)
    assert isinstance(results[4]["done"].error, AdapterNotFound)
    assert len(engine.adapters.loaded) == 1


# --- the adapter LRU ----------------------------------------------------------------------------------
def test_lru_evicts_least_recent_unpinned_and_reloads(paths):
    engine = make_engine(paths, max_loaded=2)
    cache: AdapterCache = engine.adapters
    first = run(engine, [greedy("Hello", "alpha")])[0]["tokens"]
    run(engine, [greedy("Hello", "beta")])
    run(engine, [greedy("Hello", "gamma")])  # evicts alpha (least recently used)
    assert list(cache.loaded) == ["beta", "gamma"] and cache.evictions == 1
    assert run(engine, [greedy("Hello", "alpha")])[0]["tokens"] == first  # reloaded transparently
    assert cache.loads == 4 and list(cache.loaded) == ["gamma", "alpha"]
    a, g = cache.acquire("alpha"), cache.acquire("gamma")  # both pinned: no slot for beta
    assert cache.acquire("beta") is None
    cache.release("alpha")
    assert cache.acquire("beta") == a  # alpha's slot, once unpinned
    cache.release("beta"), cache.release("gamma")
    assert g != a


def test_requests_wait_for_a_slot_when_all_are_pinned(paths):
    engine = make_engine(paths, max_batch=8, max_loaded=1)
    requests = [greedy("Hello", name, n=6) for name in ("alpha", "beta", "alpha", None)]
    solo = [run(engine, [r])[0]["tokens"] for r in requests]
    assert [r["tokens"] for r in run(engine, requests)] == solo


# --- queue, cancel, sampling, text ----------------------------------------------------------------------
def test_queue_limit_and_cancel(paths):
    engine = make_engine(paths, max_batch=1, max_queue=1)
    events = []
    first = engine.submit(greedy("Hello", None, n=50), events.append)
    engine.submit(greedy("Hello", None, n=50), events.append)
    with pytest.raises(QueueFull):
        engine.submit(greedy("Hello", None), events.append)
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 1
    engine.cancel(first)
    engine.step()
    assert engine.running[0] is not first and not engine.waiting
    assert any(e.kind == "done" and e.finish_reason == "abort" for e in events)


def test_seeded_sampling_repeats(paths):
    engine = make_engine(paths)
    ids = tiny_tokenizer()("Hello")["input_ids"]

    def sampled(seed):
        params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True)
        return run(engine, [GenerationRequest(ids, "alpha", params)])[0]["tokens"]

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


def test_stop_strings_and_held_back_text():
    assert find_stop("hello world", ["wor"], 0) == 6
    assert find_stop("hello", ["xyz", ""], 0) is None
    assert held_back("hello wo", ["world"]) == 2  # "wo" may become "world"
    assert held_back("hello", ["world"]) == 0
    assert held_back("caf\ufffd", []) == 1  # an incomplete character waits for its next byte
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert (top_p_filter(probs.clone(), 0.7) > 0).tolist() == [True, True, False, False]
    assert top_p_filter(probs.clone(), 1.0).tolist() == probs.tolist()


def test_stop_string_cuts_the_text(paths):
    engine = make_engine(paths)
    full = run(engine, [greedy("Hello", "beta", n=12)])[0]
    stop = full["text"][3:6]
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True)
    cut = run(engine, [GenerationRequest(tiny_tokenizer()("Hello")["input_ids"], "beta", params)])[0]
    assert cut["done"].finish_reason == "stop"
    assert cut["text"] == full["text"][:full["text"].find(stop)]


# --- names and files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../alpha", "..", "/etc/passwd", "a/b", "a\\b", ".hidden", "a..b", "", "x" * 200,
                                  "alpha\x00", "~root"])
def test_adapter_names_outside_the_directory_are_refused_without_file_access(paths, monkeypatch, name):
    registry = AdapterRegistry(paths["adapters"])

    def no_fs(*args, **kwargs):
        raise AssertionError("the file system was touched")

    for attr in ("resolve", "is_file", "is_dir", "exists", "stat", "iterdir"):
        monkeypatch.setattr(Path, attr, no_fs)
    with pytest.raises(BadAdapterName):
        registry.path_of(name)
    with pytest.raises(BadAdapterName):
        check_name(name)


def test_registry_lists_adapters_and_refuses_escapes(paths, tmp_path):
    registry = AdapterRegistry(paths["adapters"], [paths["extra"]])
    assert {"alpha", "beta", "gamma", "broken"} <= set(registry.available())
    assert registry.path_of("alpha").name == "alpha"
    assert check_name("my.adapter-v1_2") == "my.adapter-v1_2"
    with pytest.raises(AdapterNotFound):
        registry.path_of("nosuch")
    link_root = tmp_path / "adapters"
    link_root.mkdir()
    (link_root / "sneaky").symlink_to(paths["outside"] / "evil")  # a link leading out of the directory
    linked = AdapterRegistry(link_root)
    assert "sneaky" not in linked.available()
    with pytest.raises(BadAdapterName):
        linked.path_of("sneaky")


def test_adapter_files_carry_what_vllm_reads(paths):
    """vLLM's LoRA loader reads adapter_config.json (peft_type, r, lora_alpha, target_modules) and
    safetensors keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`."""
    model = build_base()
    modules = dict(model.named_modules())
    for name, (rank, _, writer) in ADAPTERS.items():
        folder = paths["adapters"] / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == rank and config["lora_alpha"] == 2 * rank
        targets = config["target_modules"]
        assert isinstance(targets, list) and targets
        assert all(any(m.endswith("." + t) for m in modules) for t in targets), targets
        tensors = load_file(folder / "adapter_model.safetensors")
        for key, tensor in tensors.items():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            assert match, f"{writer} key {key}"
            module = modules[match.group(1)]
            assert match.group(1).split(".")[-1] in targets
            expected = (rank, module.in_features) if match.group(2) == "A" else (module.out_features, rank)
            assert tuple(tensor.shape) == expected


def test_a_failing_step_fails_only_the_requests_in_flight(paths):
    import queue

    engine = make_engine(paths).start()
    events: queue.Queue = queue.Queue()
    forward, calls = engine._forward, []

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return forward(*args, **kwargs)

    engine._forward = broken_once
    try:
        engine.submit(greedy("Hello", "alpha"), events.put)
        failed = events.get(timeout=30)
        assert failed.kind == "error" and "simulated kernel failure" in str(failed.error)
        engine.submit(greedy("Hello", "alpha"), events.put)
        while (event := events.get(timeout=30)).kind == "delta":
            pass
        assert event.kind == "done" and engine.in_batch == 0
    finally:
        engine.stop()
