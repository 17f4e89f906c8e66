"""Chunked prefill (serve.engine, `prefill_chunk`): a prompt longer than the chunk is prefilled a
piece per step between decode steps. Oracles: transformers' `generate` for the greedy text on
every architecture of the matrix (pieces cross Mistral's / Gemma's sliding window), and an
engine that prefills whole (`prefill_chunk=0`) for logprobs, prompt logprobs and the prefix
cache; the running rows get a token every step while a long prompt is prefilled."""
from __future__ import annotations

import pytest
import torch
from factory import ARCHITECTURES, VOCAB, tiny_tokenizer
from serve_fixture import build_base, shared_setup
from test_architectures_serve import (ADAPTER, adapted_model, drive, generate_text, greedy, serve_engine,
                                      tiny_arch)
from test_prefix_cache import assert_same, counts, request, run

from loraforge import LoraError
from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.engine import DEFAULT_PREFILL_CHUNK, Engine
from loraforge.serve.server import build_state

CHUNK = 5  # shorter than the sliding window (8) and than most test prompts


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chunked-adapters")


@pytest.fixture(scope="module")
def paths():
    return shared_setup()


def long_prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (23, 4, 11, 17)]


def chunked_engine(arch: str, root, chunk: int = CHUNK) -> Engine:
    engine = serve_engine(arch, root)
    engine.prefill_chunk = chunk
    return engine


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_chunked_greedy_text_equals_generate(arch, adapters_dir):
    prompts = long_prompts(seed=len(arch))
    want = {None: [generate_text(tiny_arch(arch), p) for p in prompts]}
    adapted = adapted_model(arch)
    want[ADAPTER] = [generate_text(adapted, p) for p in prompts]
    requests = [greedy(p, m) for p in prompts for m in (ADAPTER, None)]
    expected = [want[m][i] for i in range(len(prompts)) for m in (ADAPTER, None)]
    engine = chunked_engine(arch, adapters_dir)
    assert drive(engine, requests, stagger=0) == expected  # several long prompts queue their pieces
    assert drive(engine, requests, stagger=2) == expected  # long prompts join while others decode
    assert not engine.partial and not engine.running


def tiny_engine(paths, chunk: int, mb: float = 0.0) -> Engine:
    return Engine(build_base(), tiny_tokenizer(), AdapterRegistry(paths["adapters"]), max_batch=8, max_loaded=3,
                  prefix_cache_mb=mb, prefill_chunk=chunk)


def words(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (n,), generator=gen).tolist()


def test_logprobs_and_prompt_logprobs_equal_a_whole_prefill(paths):
    reqs = [request(words(37, 1), "alpha", n=6), request(words(9, 2), None, n=6),
            request(words(26, 3), "beta", n=6, prompt_logprobs=2), request(words(41, 4), None, n=0, prompt_logprobs=1)]
    whole = run(tiny_engine(paths, 0), reqs)
    chunked = run(tiny_engine(paths, 7), reqs)
    for a, b in zip(chunked, whole):
        assert_same(a, b)
    assert len(chunked[2]["logprobs"]) == 26 + 6 and len(chunked[3]["logprobs"]) == 41


def test_running_rows_get_a_token_every_step_while_a_long_prompt_prefills(paths):
    """Without chunks the long prompt is one 60-column forward in one step; with chunk 8 no
    forward reads more than 8 prompt columns, the short row gets a token in each of those steps,
    and the long row's first token comes in the ceil(60 / 8) = 8th step."""
    def trace(chunk: int):
        engine = tiny_engine(paths, chunk)
        widths, results = [], {}
        forward = engine._forward
        engine._forward = lambda ids, *a, **k: (widths.append(ids.shape[1]), forward(ids, *a, **k))[1]
        tokens = {"short": [], "long": []}
        short = engine.submit(request(words(6, 5), "alpha", n=30), lambda ev: None)
        engine.step()
        long_ = engine.submit(request(words(60, 6), "beta", n=4), lambda ev: results.update(long=ev))
        for _ in range(12):
            engine.step()
            tokens["short"].append(len(short.generated))
            tokens["long"].append(len(long_.generated))
        return widths, tokens

    widths, tokens = trace(8)
    assert max(widths[1:]) == 8  # the first forward is the short prompt (6 columns)
    assert tokens["short"] == list(range(3, 15))  # one token per step, every step
    # the eighth piece ends the prompt: its first token, then the same step's decode gives a second
    assert tokens["long"][:7] == [0] * 7 and tokens["long"][7] == 2
    whole_widths, whole_tokens = trace(0)
    assert max(whole_widths) == 60 and whole_tokens["long"][0] == 2


def test_a_chunked_prompt_reads_and_fills_the_prefix_cache(paths):
    """A long repeated prompt: the second run reads its prefix from the cache (only its tail is
    prefilled, whole), and equals a run without any cache or chunks."""
    prompt = words(70, 7)
    cold = run(tiny_engine(paths, 0), [request(prompt, "alpha", n=8)])[0]
    engine = tiny_engine(paths, 16, mb=64)
    first = run(engine, [request(prompt, "alpha", n=8)])[0]
    widths = []
    forward = engine._forward
    engine._forward = lambda ids, *a, **k: (widths.append(ids.shape[1]), forward(ids, *a, **k))[1]
    second = run(engine, [request(prompt, "alpha", n=8)])[0]
    assert_same(first, cold)
    assert_same(second, cold)
    assert counts(engine)[0] == 1  # one hit
    assert widths[0] <= 16  # the uncached tail (70 - 64 tokens)
    edited = prompt[:40] + words(30, 8)  # shares 2 full blocks (32 tokens): 38 uncached > 16
    assert_same(run(engine, [request(edited, "alpha", n=8)])[0],
                run(tiny_engine(paths, 0), [request(edited, "alpha", n=8)])[0])


def test_a_cancelled_long_prompt_leaves_and_the_others_are_untouched(paths):
    others = [request(words(8, 9), "alpha", n=10), request(words(12, 10), None, n=10)]
    want = run(tiny_engine(paths, 0), others)
    engine = tiny_engine(paths, 4)
    events = []
    long_ = engine.submit(request(words(50, 11), "beta", n=5), events.append)
    engine.step()
    assert engine.partial and engine.partial[0].seq is long_
    engine.cancel(long_)
    got = run(engine, others)
    assert [e.kind for e in events] == ["done"] and events[0].finish_reason == "abort"
    assert not engine.partial and engine.in_batch == 0
    for a, b in zip(got, want):
        assert_same(a, b)


def test_a_failing_piece_fails_that_request_only(paths):
    marker = 3
    others = [request(words(9, 12), "alpha", n=10), request(words(30, 13), None, n=10)]
    want = run(tiny_engine(paths, 0), others)
    engine = tiny_engine(paths, 6)
    forward = engine._forward

    def broken(ids, *a, **k):
        if (ids == marker).any():
            raise RuntimeError("simulated kernel failure")
        return forward(ids, *a, **k)

    engine._forward = broken
    bad = words(40, 14)
    bad[20] = marker  # inside the fourth piece
    events = []
    engine.submit(request(bad, "beta", n=5), events.append)
    got = run(engine, others)
    while not events:
        engine.step()
    assert events[-1].kind == "error" and "simulated kernel failure" in str(events[-1].error)
    assert "\n" not in str(events[-1].error)
    for a, b in zip(got, want):
        assert_same(a, b)
    assert not engine.partial and engine.in_batch == 0


def test_the_default_chunk_and_bad_values(paths):
    assert Engine(build_base(), tiny_tokenizer()).prefill_chunk == DEFAULT_PREFILL_CHUNK == 512
    for bad in (-1, 2.5, "8"):
        with pytest.raises(LoraError, match="prefill_chunk must be"):
            Engine(build_base(), tiny_tokenizer(), prefill_chunk=bad)
    with pytest.raises(LoraError, match="--prefill-chunk must be"):
        build_state(str(paths["base"]), str(paths["adapters"]), prefill_chunk=-3)


def test_the_cli_refuses_a_bad_prefill_chunk_in_one_line(paths, capsys):
    from loraforge.cli import main

    assert main(["serve", "--model", str(paths["base"]), "--prefill-chunk", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("loraforge serve: error: --prefill-chunk must be")
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(paths["base"]), "--prefill-chunk", "many"])
    assert exit_.value.code == 2
    assert "--prefill-chunk: invalid int value: 'many'" in capsys.readouterr().err
