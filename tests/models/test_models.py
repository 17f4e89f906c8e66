"""Tests for loraforge.models: resolving, device/dtype choice, the atomic cache, generation.

Fast tests use a tiny random Llama and a word-level tokenizer built on the spot; tests marked
``slow`` use the embedded SmolLM2-135M-Instruct (converted once into the user cache).
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraforge import LoraError
from loraforge.models import device, embedded, generate, loading

WORDS = ["hello", "world", "the", "capital", "of", "france", "is", "paris", "what", "?", "a", "b", "c"]
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def save_tiny_model(out_dir: Path, with_pad: bool = False) -> None:
    """A tiny random LlamaForCausalLM + word-level tokenizer, saved as a transformers directory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<unk>" if with_pad else None,
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> SimpleNamespace:
    """An empty loraforge cache, and a fake converter that writes the tiny model (counting calls)."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    calls = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        save_tiny_model(out_dir)

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    return SimpleNamespace(root=tmp_path / "cache", calls=calls)


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# --------------------------------------------------------------------------- resolving


def test_missing_local_dir_is_one_line_error(tmp_path):
    with pytest.raises(LoraError) as err:
        loading.resolve_model_path(tmp_path / "no" / "such" / "model")
    assert "does not exist" in assert_one_line(err)


def test_relative_missing_dir_is_not_sent_to_the_hub():
    with pytest.raises(LoraError, match="does not exist"):
        loading.resolve_model_path("./models/missing-model")


def test_dir_without_config_json(tmp_path):
    with pytest.raises(LoraError) as err:
        loading.resolve_model_path(tmp_path)
    assert "no config.json" in assert_one_line(err)


def test_file_is_not_a_model(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(LoraError, match="is a file"):
        loading.resolve_model_path(file)


def test_local_model_dir_resolves_to_itself(tiny_dir):
    assert loading.resolve_model_path(tiny_dir) == str(tiny_dir)


def test_unknown_hub_id_offline_is_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    start = time.perf_counter()
    with pytest.raises(LoraError) as err:
        loading.resolve_model_path("nobody-here/no-such-model-xyz")
    message = assert_one_line(err)
    assert message.startswith("cannot load model 'nobody-here/no-such-model-xyz': not a local directory")
    assert "unreachable" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no deep traceback chain
    assert time.perf_counter() - start < 10


def test_invalid_hub_id_is_one_line_error():
    with pytest.raises(LoraError) as err:
        loading.resolve_model_path("not a valid id!")
    assert "not a local directory" in assert_one_line(err)


def test_missing_embedded_package_is_clear(monkeypatch):
    monkeypatch.setattr(embedded, "EMBEDDED_PACKAGE", "no_such_package_for_loraforge")
    with pytest.raises(LoraError, match="pip install"):
        embedded.embedded_gguf_path()


# --------------------------------------------------------------------------- cache


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "lf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "lf"
    monkeypatch.delenv("LORAFORGE_CACHE")
    assert embedded.cache_root() == tmp_path / "xdg" / "loraforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert embedded.cache_root() == tmp_path / "home" / ".cache" / "loraforge"


def test_default_model_is_converted_once_atomically(cache):
    path = Path(loading.resolve_model_path(embedded.DEFAULT_MODEL))
    assert path == cache.root / "models" / embedded.DEFAULT_MODEL
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert len(cache.calls) == 1 and cache.calls[0].parent == path.parent and cache.calls[0] != path
    assert sorted(p.name for p in path.parent.iterdir()) == [embedded.DEFAULT_MODEL]  # temp dir gone
    assert loading.resolve_model_path(embedded.DEFAULT_MODEL.upper()) == str(path)
    assert len(cache.calls) == 1

    model = loading.load_model(embedded.DEFAULT_MODEL)
    assert not model.training and model.config.use_cache
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = loading.load_tokenizer(embedded.DEFAULT_MODEL)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"


def test_bfloat16_load_reads_an_exact_bf16_copy(cache):
    """A bf16 load of the default model reads its bf16 copy (made once), whose weights equal the
    float32 weights cast at load time, bit for bit."""
    full = loading.load_model(embedded.DEFAULT_MODEL, dtype="float32")
    half = loading.load_model(embedded.DEFAULT_MODEL, dtype="bfloat16")
    copy = cache.root / "models" / f"{embedded.DEFAULT_MODEL}-bf16"
    assert Path(loading.resolve_model_path(embedded.DEFAULT_MODEL, torch.bfloat16)) == copy
    source = cache.root / "models" / embedded.DEFAULT_MODEL
    assert {p.name for p in source.iterdir() if p.suffix != ".safetensors"} <= {p.name for p in copy.iterdir()}
    weights = copy / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    full_state, half_state = full.state_dict(), half.state_dict()
    assert full_state.keys() == half_state.keys()
    for key in full_state:
        assert half_state[key].dtype == torch.bfloat16 and torch.equal(half_state[key], full_state[key].bfloat16()), key
    assert half.lm_head.weight.data_ptr() == half.model.embed_tokens.weight.data_ptr()  # still tied
    assert len(cache.calls) == 1  # the GGUF is converted once; the copy is made from the float32 directory
    assert loading.load_tokenizer(embedded.DEFAULT_MODEL).eos_token == "</s>"


def test_build_discards_own_copy_when_another_process_wins(tmp_path):
    dest = tmp_path / "models" / "m"

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{\"mine\": true}")
        dest.mkdir()  # another process renames its finished copy into place meanwhile
        (dest / "config.json").write_text("{\"theirs\": true}")

    assert embedded.build_cached(dest, build) == dest
    assert (dest / "config.json").read_text() == "{\"theirs\": true}"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_failed_build_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "models" / "m"

    def build(tmp: Path) -> None:
        (tmp / "half-written.safetensors").write_bytes(b"\0" * 10)
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError):
        embedded.build_cached(dest, build)
    assert list(dest.parent.iterdir()) == []


def test_stale_temp_dirs_are_removed_fresh_ones_kept(tmp_path):
    dest = tmp_path / "m"
    stale, fresh = tmp_path / ".m.tmp-old", tmp_path / ".m.tmp-busy"
    stale.mkdir(), fresh.mkdir()
    old = time.time() - 2 * embedded.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    embedded.build_cached(dest, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert not stale.exists() and fresh.exists() and (dest / "config.json").exists()


def test_incomplete_cache_dir_is_reported(cache):
    (cache.root / "models" / embedded.DEFAULT_MODEL).mkdir(parents=True)
    with pytest.raises(LoraError, match="incomplete"):
        loading.resolve_model_path(embedded.DEFAULT_MODEL)


# --------------------------------------------------------------------------- device and dtype


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.pick_device() == torch.device("cpu")
    assert device.pick_device("cpu") == torch.device("cpu")
    assert device.pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(LoraError, match="CUDA is not available"):
        device.pick_device("cuda")
    with pytest.raises(LoraError, match="unknown device"):
        device.pick_device("gpu-please")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.pick_device("auto") == torch.device("cuda")


def test_pick_dtype_names_and_auto(monkeypatch):
    assert device.pick_dtype("float32") is torch.float32
    assert device.pick_dtype("bf16") is torch.bfloat16
    assert device.pick_dtype("torch.float16") is torch.float16
    assert device.pick_dtype(torch.bfloat16) is torch.bfloat16
    assert device.pick_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "bf16_supported", lambda device: True)
    assert device.pick_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(device, "bf16_supported", lambda device: False)
    assert device.pick_dtype("auto", "cuda") is torch.float16
    with pytest.raises(LoraError, match="unknown dtype 'int3'"):
        device.pick_dtype("int3")


def test_bf16_supported_on_cpu_uses_cpu_flags(monkeypatch):
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert device.bf16_supported("cpu")
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert device.bf16_supported(torch.device("cpu"))
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not device.bf16_supported("cpu")


def test_bf16_check_falls_back_without_cpuinfo(monkeypatch):
    monkeypatch.setattr(device, "_cpu_flags", lambda: None)
    assert isinstance(device.bf16_supported("cpu"), bool)
    assert device._bf16_works_on_cpu() is True  # bf16 always runs on CPU, if only emulated


def test_autocast_dtype(monkeypatch):
    monkeypatch.setattr(device, "bf16_supported", lambda device: True)
    assert device.autocast_dtype("cpu") is torch.bfloat16
    assert device.autocast_dtype("cpu", "float32") is None
    assert device.autocast_dtype("cpu", None) is None
    assert device.autocast_dtype("cpu", "none") is None
    monkeypatch.setattr(device, "bf16_supported", lambda device: False)
    assert device.autocast_dtype("cpu") is None
    assert device.autocast_dtype("cpu", "bfloat16") is torch.bfloat16  # explicit request wins
    assert device.autocast_dtype("cpu", "fp16") is torch.float16


def test_load_model_dtype_and_bad_dir(tiny_dir, tmp_path):
    model = loading.load_model(tiny_dir, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(LoraError) as err:
        loading.load_model(broken)
    assert "cannot load model" in assert_one_line(err)


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return loading.load_model(tiny_dir), loading.load_tokenizer(tiny_dir)


def test_tokenizer_gets_pad_and_left_padding(tiny):
    _, tokenizer = tiny
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"


def test_generate_is_batched_greedy_and_returns_only_new_text(tiny):
    model, tokenizer = tiny
    prompts = ["hello world", "what is the capital of france ?"]
    batched = generate.generate_text(model, tokenizer, prompts, max_new_tokens=6)
    single = [generate.generate_text(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single  # left padding does not change greedy answers
    assert batched == generate.generate_text(model, tokenizer, prompts, max_new_tokens=6)  # deterministic
    for text in batched:
        assert "</s>" not in text and "<unk>" not in text
        assert len(text.split()) <= 6
    assert generate.generate_text(model, tokenizer, []) == []


def test_generate_chat_and_restores_modes(tiny):
    model, tokenizer = tiny
    tokenizer.padding_side = "right"
    model.train()
    try:
        out = generate.generate_text(model, tokenizer, ["what is the capital of france ?", "hello"],
                                   max_new_tokens=4, chat=True)
        assert len(out) == 2 and all(isinstance(t, str) for t in out)
        assert model.training and tokenizer.padding_side == "right"
    finally:
        model.eval()
        tokenizer.padding_side = "left"


def test_generate_chat_without_template_is_clear(tiny):
    model, tokenizer = tiny
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(LoraError, match="no chat template"):
            generate.generate_text(model, tokenizer, ["hi"], chat=True)
    finally:
        tokenizer.chat_template = template


# --------------------------------------------------------------------------- the embedded model (slow)

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec(embedded.EMBEDDED_PACKAGE) is None,
    reason=f"{embedded.EMBEDDED_DIST} is not installed",
)


@pytest.fixture(scope="module")
def smollm():
    return loading.load_model(embedded.DEFAULT_MODEL), loading.load_tokenizer(embedded.DEFAULT_MODEL)


@pytest.mark.slow
@needs_embedded
def test_embedded_model_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    answers = generate.generate_text(
        model, tokenizer, ["What is the capital of France?", "What is 2 + 2?"], max_new_tokens=24, chat=True
    )
    assert "Paris" in answers[0]
    assert answers[1]


@pytest.mark.slow
@needs_embedded
def test_cached_dir_loads_with_plain_transformers(smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(loading.resolve_model_path(embedded.DEFAULT_MODEL))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.config.tie_word_embeddings
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.model_max_length == 8192

    model, _ = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4)


def test_generated_text_is_decoded_by_the_one_rule_nothing_stripped(tiny):
    """generate, eval and serve share models.generate.completion_text: special tokens dropped, a
    leading space kept (serve streams it; stripping only the non-streamed text would disagree)."""
    model, tokenizer = tiny
    ids = tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert generate.generate_text(model, tokenizer, ["hello world"], max_new_tokens=6) == [expected]
    assert generate.completion_text(tokenizer, [tokenizer.eos_token_id] + new) == expected
