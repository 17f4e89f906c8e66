"""`serve` on every architecture of the model matrix (tests/factory.py ARCHITECTURES): greedy text
of concurrent requests (base and adapter rows mixed, left padded, joining mid-flight) equals
transformers' `generate` decoded by the one text rule (models.generate.completion_text), with
prompts + outputs longer than the sliding window of Mistral / Gemma2 / Gemma3, and the prefill
logits equal the model's own forward. Architectures the engine cannot serve are refused in one
line (REFUSED pins the message)."""
from __future__ import annotations

import functools

import pytest
import torch
from factory import ARCHITECTURES, VOCAB, WINDOW, randomize_adapters, tiny_arch
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.core.io import save_adapter
from loraforge.core.ops import attach
from loraforge.models.generate import completion_text
from loraforge.serve.adapters import AdapterRegistry
from loraforge.serve.engine import Engine, GenerationRequest, SamplingParams

ADAPTER = "adapted"
NEW_TOKENS = 10
# Prompt lengths around the window (8): 3 + 10 new tokens and 17 + 10 both cross it.
LENGTHS = [3, 9, 17, 12]
REFUSED: dict[str, str] = {}  # architecture -> the start of its refusal (none today: all 13 serve)
# all-linear adapters that reach MoE experts (fused 3-D parameters) are refused per request by the
# serving kernel; these architectures are served here with attention adapters, the refusal is pinned.


@functools.lru_cache(maxsize=None)
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary ("w0" .. "w127"): every id decodes
    to a whole word, so streamed text equals the decoded text whatever the model picks."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0")


def prompt_ids(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def adapted_model(arch: str, targets=None):
    """tiny_arch(arch) with adapter ADAPTER (all-linear, or attention where experts are refused),
    random non-zero lora_B, active."""
    model = tiny_arch(arch)
    targets = targets or "all-linear"  # expert adapters included (tests/serve/test_moe_serve.py)
    attach(model, LoraConfig(r=4, alpha=8, target_modules=targets), ADAPTER)
    return randomize_adapters(model, seed=3).eval()


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("arch-adapters")


def serve_engine(arch: str, root, targets=None) -> Engine:
    path = root / arch / ADAPTER
    if not path.is_dir():
        save_adapter(adapted_model(arch, targets), path, ADAPTER)
    return Engine(tiny_arch(arch), word_tokenizer(), AdapterRegistry(root / arch), max_batch=8, max_loaded=2,
                  prefill_tokens=4096)


def generate_text(model, ids: list[int]) -> str:
    """transformers' greedy generate, alone (no padding), eos disabled, then the one text rule."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return completion_text(word_tokenizer(), out[0, x.shape[1]:].tolist())


def drive(engine: Engine, requests: list[GenerationRequest], stagger: int, errors_ok: bool = False) -> list:
    """Run the engine without its thread; request i joins after i * stagger steps."""
    texts, done, pending, step = [""] * len(requests), [None] * len(requests), list(enumerate(requests)), 0

    def sink(i):
        def record(event):
            if event.kind == "delta":
                texts[i] += event.text
            else:
                done[i] = event
        return record

    while pending or any(d is None for d in done):
        while pending and pending[0][0] * stagger <= step:
            i, request = pending.pop(0)
            engine.submit(request, sink(i))
        engine.step()
        step += 1
    if errors_ok:
        return [str(d.error) if d.kind == "error" else text for d, text in zip(done, texts)]
    errors = [d.error for d in done if d.kind == "error"]
    assert not errors, errors
    return texts


def greedy(ids: list[int], adapter: str | None) -> GenerationRequest:
    return GenerationRequest(ids, adapter, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_serve_greedy_text_equals_generate(arch, adapters_dir):
    if arch in REFUSED:
        with pytest.raises(LoraError, match=REFUSED[arch]):
            serve_engine(arch, adapters_dir)
        return
    engine = serve_engine(arch, adapters_dir)
    prompts = prompt_ids(seed=len(arch))
    want = {None: [generate_text(tiny_arch(arch), p) for p in prompts]}
    adapted = adapted_model(arch)
    want[ADAPTER] = [generate_text(adapted, p) for p in prompts]
    assert want[None] != want[ADAPTER]  # the adapter changes the output
    requests = [greedy(p, m) for p in prompts for m in (ADAPTER, None)]
    expected = [want[m][i] for i in range(len(prompts)) for m in (ADAPTER, None)]
    assert drive(engine, requests, stagger=0) == expected  # one batch, left padded
    assert drive(engine, requests, stagger=2) == expected  # rows join between decode steps


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_windowed_prefill_and_decode_logits_equal_the_models_forward(arch, adapters_dir):
    """The logprobs the engine records for a row longer than the window, next to a shorter row,
    equal log_softmax of the model's own forward on that row alone (float tolerance)."""
    engine = serve_engine(arch, adapters_dir)
    model = adapted_model(arch)
    long_ids, short_ids = prompt_ids(seed=5)[2], prompt_ids(seed=5)[0]
    assert len(long_ids) > 2 * WINDOW
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    events = {}

    def keep_done(key):
        return lambda event: events.setdefault(key, event) if event.kind != "delta" else None

    engine.submit(GenerationRequest(short_ids, ADAPTER, params), keep_done("short"))
    seq = engine.submit(GenerationRequest(long_ids, ADAPTER, params), keep_done("long"))
    while len(events) < 2:
        engine.step()
        for layer in engine.batch.cache.layers:  # sliding layers: memory bounded by the window
            if engine.batch.rows and layer.keys is not None:
                held = layer.keys.shape[-2]
                assert held == (min(engine.batch.width, WINDOW - 1) if layer.is_sliding else engine.batch.width)
    assert events["long"].kind == "done", events["long"].error
    full = torch.tensor([long_ids + seq.generated])
    with torch.no_grad():
        want = torch.log_softmax(model(full).logits[0].float(), dim=-1)
    got = [lp.logprob for lp in events["long"].logprobs[1:]]  # prompt tokens 1.., then generated tokens
    tokens = (long_ids + seq.generated)[1:]
    expected = [float(want[i, t]) for i, t in enumerate(tokens)]
    assert len(got) == len(expected)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4


def test_unsupported_cache_layouts_are_refused_in_one_line():
    from loraforge.serve.kvcache import new_cache

    config = tiny_arch("mistral").config
    config.layer_types = ["chunked_attention"] * config.num_hidden_layers
    config.attention_chunk_size = 4
    with pytest.raises(LoraError, match="chunked_attention") as err:
        new_cache(config)
    assert "\n" not in str(err.value)
