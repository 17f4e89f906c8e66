"""GGUF export (tools/export.py), checked against llama.cpp itself (llama-cpp-python, a test
dependency): merged and adapter files must give loraforge's logits and greedy tokens."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from cli_helpers import one_line_error, run_cli
from factory import randomize_adapters, save_tiny_llama, tiny_gpt2, tiny_tokenizer
from transformers import AutoModelForCausalLM

from loraforge import LoraError
from loraforge.cli import main
from loraforge.core.config import LoraConfig
from loraforge.core.io import save_adapter
from loraforge.core.ops import attach
from loraforge.models.loading import load_for_inference
from loraforge.tools.export import embedded_note, export_gguf, modelfile_text, qk_row_order

PROMPTS = [[5, 17, 42, 99, 7, 300, 11], [1, 250, 251, 252, 60], [400, 3, 3, 3, 3, 88, 120, 9, 2, 77]]
F32_TOL = 1e-4  # max |logit diff| llama.cpp (f32 GGUF, f32 KV cache) vs loraforge
F32 = 0  # GGML_TYPE_F32, for the KV cache


# --- models and adapters ----------------------------------------------------------------------
def _qwen_dir(out: Path, cls, config_cls, seed: int = 0, **extra) -> Path:
    """A tiny random model of another family (Qwen2 / Qwen3 / Mistral) with the tiny tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=len(tok), max_position_embeddings=512,
                        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=None, **extra)
    model = cls(config).eval()
    _sharpen(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _sharpen(model: torch.nn.Module, seed: int = 3):
    """Random weights large enough that logits have clear winners (greedy tokens are stable) and
    non-zero biases (Qwen2's q/k/v)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif p.ndim == 2:
                p.mul_(6.0)


def _llama_dir(out: Path, tied: bool = False) -> Path:
    save_tiny_llama(out, tied=tied)
    model = AutoModelForCausalLM.from_pretrained(out)
    _sharpen(model)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"llama": _llama_dir(root / "llama"), "llama-tied": _llama_dir(root / "llama-tied", tied=True),
            "qwen2": _qwen_dir(root / "qwen2", tf.Qwen2ForCausalLM, tf.Qwen2Config),
            "qwen3": _qwen_dir(root / "qwen3", tf.Qwen3ForCausalLM, tf.Qwen3Config, head_dim=16),
            "mistral": _qwen_dir(root / "mistral", tf.MistralForCausalLM, tf.MistralConfig, sliding_window=None)}


def make_adapter(base: Path, out: Path, seed: int = 1, std: float = 0.3, **config) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    options = {"r": 4, "alpha": 8.0, "target_modules": "all-linear", **config}
    torch.manual_seed(seed)
    attach(model, LoraConfig(**options))
    randomize_adapters(model, seed=seed, std=std)
    return save_adapter(model, out)


def loraforge_logits(base: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    model, _ = load_for_inference(str(base), str(adapter) if adapter else None)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


# --- llama.cpp ----------------------------------------------------------------------------------
def llama(path: Path, lora: Path | None = None, scale: float = 1.0):
    llama_cpp = pytest.importorskip("llama_cpp")
    kwargs = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1,
                           type_k=F32, type_v=F32,  # an f16 KV cache alone costs ~3e-3 on these logits
                           n_threads_batch=1, seed=0, **kwargs)


def skip_if_llama_cpp_crashes(path: Path, ids: list[int]):
    """Evaluate `path` with llama.cpp in a child process first: some llama-cpp-python source builds
    (0.3.36 built on this machine in session 4) die with SIGSEGV in their q8_0 kernels, which would
    take the whole test run down. A crash of the oracle itself is a skip that names it."""
    import subprocess
    import sys

    llama_cpp = pytest.importorskip("llama_cpp")
    code = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, verbose=False, "
            "n_threads=1, n_threads_batch=1); llm.eval([int(t) for t in sys.argv[2:]])")
    child = subprocess.run([sys.executable, "-c", code, str(path), *map(str, ids)], capture_output=True, timeout=300)
    if child.returncode < 0:
        pytest.skip(f"llama-cpp-python {llama_cpp.__version__} crashed (signal {-child.returncode}) "
                    f"evaluating a q8_0 GGUF on this machine")


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def cpp_greedy(llm, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        new.append(token)
        llm.eval([token])
    return new


def hf_greedy(base: Path, adapter: Path | None, ids: list[int], n: int) -> list[int]:
    model, _ = load_for_inference(str(base), str(adapter) if adapter else None)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def max_diff(llm, base: Path, adapter: Path | None) -> float:
    return max(float(np.abs(cpp_logits(llm, ids) - loraforge_logits(base, adapter, ids)).max()) for ids in PROMPTS)


def export(tmp: Path, name: str, base: Path, adapter: Path | None = None, **kwargs) -> Path:
    out = tmp / name
    export_gguf(out, str(base), adapter, **kwargs)
    return out


# --- merged and adapter files against llama.cpp -------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_f32_gives_loraforges_logits_and_greedy_tokens(bases, tmp_path, arch):
    adapter = make_adapter(bases[arch], tmp_path / "adapter")
    merged = export(tmp_path, "merged.gguf", bases[arch], adapter, merged=True)
    llm = llama(merged)
    assert max_diff(llm, bases[arch], adapter) < F32_TOL
    for ids in PROMPTS:
        assert cpp_greedy(llm, ids, 12) == hf_greedy(bases[arch], adapter, ids, 12)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_base_plus_adapter_gguf_equals_merged_and_differs_from_base(bases, tmp_path, arch):
    adapter = make_adapter(bases[arch], tmp_path / "adapter")
    base = export(tmp_path, "base.gguf", bases[arch])
    lora = export(tmp_path, "adapter.gguf", bases[arch], adapter)
    merged = export(tmp_path, "merged.gguf", bases[arch], adapter, merged=True)
    with_lora, alone, folded = llama(base, lora), llama(base), llama(merged)
    for ids in PROMPTS:
        a, m, b = cpp_logits(with_lora, ids), cpp_logits(folded, ids), cpp_logits(alone, ids)
        assert np.abs(a - m).max() < F32_TOL
        assert np.abs(a - b).max() > 0.1
    assert max_diff(with_lora, bases[arch], adapter) < F32_TOL
    assert max_diff(alone, bases[arch], None) < F32_TOL


def test_lora_scale_half_equals_loraforge_at_half_alpha(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    half = tmp_path / "half"
    shutil.copytree(adapter, half)
    config = json.loads((half / "adapter_config.json").read_text())
    config["lora_alpha"] /= 2
    (half / "adapter_config.json").write_text(json.dumps(config))
    base = export(tmp_path, "base.gguf", bases["llama"])
    lora = export(tmp_path, "adapter.gguf", bases["llama"], adapter)
    assert max_diff(llama(base, lora, scale=0.5), bases["llama"], half) < F32_TOL


ADAPTERS = {
    "q_k_only": {"target_modules": ["q_proj", "k_proj"]},  # the rotary row permutation of B
    "rslora": {"use_rslora": True, "r": 8, "alpha": 4.0},
    "patterns": {"rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3.0, "up_proj": 20.0}},
    "embedding": {"target_modules": ["embed_tokens", "q_proj", "lm_head"]},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapter_gguf_variants_match_loraforge(bases, tmp_path, arch, kind):
    adapter = make_adapter(bases[arch], tmp_path / "adapter", **ADAPTERS[kind])
    base = export(tmp_path, "base.gguf", bases[arch])
    lora = export(tmp_path, "adapter.gguf", bases[arch], adapter)
    assert max_diff(llama(base, lora), bases[arch], adapter) < F32_TOL


def test_adapter_gguf_layout(bases, tmp_path):
    import gguf

    adapter = make_adapter(bases["llama"], tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"],
                           rank_pattern={"q_proj": 2})
    reader = gguf.GGUFReader(export(tmp_path, "adapter.gguf", bases["llama"], adapter))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: ne0 first
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 2) and shapes["blk.0.attn_q.weight.lora_b"] == (2, 64)
    assert shapes["token_embd.weight.lora_a"] == (4, len(tiny_tokenizer()))
    assert shapes["token_embd.weight.lora_b"] == (4, 64)
    assert all(name.endswith((".lora_a", ".lora_b")) for name in shapes)


def test_qk_row_order_interleaves_the_rotary_halves():
    assert qk_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q8_0_merged_agrees_on_most_greedy_tokens(bases, tmp_path):
    import gguf

    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    path = export(tmp_path, "merged-q8.gguf", bases["llama"], adapter, merged=True, dtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    skip_if_llama_cpp_crashes(path, PROMPTS[0])
    llm, agree, total = llama(path), 0, 0
    for ids in PROMPTS:  # teacher-forced on loraforge's greedy continuation: per-token agreement
        want = hf_greedy(bases["llama"], adapter, ids, 16)
        scores = cpp_logits(llm, ids + want)[len(ids) - 1:-1]
        agree += sum(int(np.argmax(s)) == w for s, w in zip(scores, want))
        total += len(want)
    assert agree / total >= 0.9, f"q8_0 greedy agreement {agree}/{total}"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_merged_loads_and_stays_close(bases, tmp_path, dtype):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    path = export(tmp_path, f"merged-{dtype}.gguf", bases["llama"], adapter, merged=True, dtype=dtype)
    assert max_diff(llama(path), bases["llama"], adapter) < 0.5


def test_tied_base_omits_the_output_head(bases, tmp_path):
    import gguf

    path = export(tmp_path, "tied.gguf", bases["llama-tied"])
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "llama."))}
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.padding_token_id"] == 0 and "<|im_start|>" in fields["tokenizer.chat_template"]
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
                "rope.dimension_count", "vocab_size"):
        assert f"llama.{key}" in fields, key
    assert max_diff(llama(path), bases["llama-tied"], None) < F32_TOL
    text = "What is the capital of France?"
    assert llama(path).tokenize(text.encode(), add_bos=False) == tiny_tokenizer()(text)["input_ids"]


# --- Ollama -------------------------------------------------------------------------------------
def test_modelfile_for_base_and_adapter(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter")
    out = tmp_path / "ollama" / "my-adapter.gguf"
    done = run_cli("export", "--model", bases["llama"], "--adapter", adapter, "--format", "gguf", "--out", out,
                   "--ollama")
    assert done.returncode == 0, done.stderr
    text = (out.parent / "Modelfile").read_text()
    assert text.splitlines()[:3] == ["FROM ./my-adapter.base.gguf", "ADAPTER ./my-adapter.gguf",
                                     'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}']
    assert '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in text
    assert 'SYSTEM """You are a helpful AI assistant."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert (out.parent / "my-adapter.base.gguf").is_file()
    assert "ollama create my-adapter -f Modelfile" in done.stdout
    assert f"llama-cli -m {out.parent / 'my-adapter.base.gguf'} --lora {out}" in done.stdout


def test_modelfile_names_a_base_elsewhere(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "adapter", target_modules=["q_proj"])
    base = export(tmp_path, "shared/base.gguf", bases["llama"])
    result = export_gguf(tmp_path / "mine" / "a.gguf", str(bases["llama"]), adapter, ollama=True, base_gguf=base)
    assert result["files"] == [str(tmp_path / "mine" / "a.gguf"), str(tmp_path / "mine" / "Modelfile")]
    assert (tmp_path / "mine" / "Modelfile").read_text().splitlines()[:2] == ["FROM ../shared/base.gguf",
                                                                              "ADAPTER ./a.gguf"]


def test_modelfile_for_merged_and_non_chatml():
    text = modelfile_text("./m.gguf", None, "{{ bos_token }}[INST] {{ messages }}", "</s>")
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf" and not any(line.startswith(("ADAPTER", "TEMPLATE")) for line in lines)
    assert 'PARAMETER stop "</s>"' in text


# --- refusals: one line each --------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_adapters(bases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    gpt2 = root / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    return {"dora": make_adapter(bases["llama"], root / "dora", use_dora=True, target_modules=["q_proj"]),
            "saved": make_adapter(bases["llama"], root / "saved", target_modules=["q_proj"],
                                  modules_to_save=["lm_head"]),
            "tied-embed": make_adapter(bases["llama-tied"], root / "tied-embed", target_modules=["embed_tokens"]),
            "plain": make_adapter(bases["llama"], root / "plain", target_modules=["q_proj"]), "gpt2": gpt2,
            "rope": _with_rope_scaling(bases["llama"], root / "rope")}


def _with_rope_scaling(base: Path, out: Path) -> Path:
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (out / "config.json").write_text(json.dumps(config))
    return out


REFUSALS = {
    "missing adapter": (["--adapter", "{root}/nope"], "adapter directory"),
    "unknown dtype": (["--adapter", "{plain}", "--dtype", "int3"], "unknown --dtype 'int3'"),
    "q8_0 adapter": (["--adapter", "{plain}", "--dtype", "q8_0"], "--dtype q8_0 applies to model files"),
    "out exists": (["--adapter", "{plain}", "--out", "{root}/exists.gguf"], "exists (pass --force"),
    "out in adapter": (["--adapter", "{plain}", "--out", "{plain}/a.gguf"], "lies inside the input"),
    "out is adapter": (["--adapter", "{plain}", "--out", "{plain}"], "is a directory"),
    "dora": (["--adapter", "{dora}"], "DoRA"),
    "modules_to_save": (["--adapter", "{saved}"], "modules_to_save"),
    "tied embedding": (["--adapter", "{tied-embed}", "--model", "{llama-tied}"], "tied input/output embeddings"),
    "merged without adapter": (["--merged"], "--merged needs --adapter"),
    "other architecture": (["--model", "{gpt2}"], "'gpt2'"),
    "modelfile exists": (["--ollama", "--out", "{root}/m/base.gguf"], "Modelfile exists"),
    "rope scaling": (["--model", "{rope}"], "RoPE scaling 'linear'"),
    "ollama base exists": (["--adapter", "{plain}", "--ollama", "--out", "{root}/o/out.gguf"], "out.base.gguf exists"),
    "out in model": (["--out", "{llama}/base.gguf"], "lies inside the input"),
    "unwritable": (["--out", "{root}/exists.gguf/base.gguf"], "cannot write"),
    "base-gguf missing": (["--adapter", "{plain}", "--ollama", "--base-gguf", "{root}/none.gguf"], "is not a file"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_errors(bases, odd_adapters, tmp_path, capsys, case):
    args, expected = REFUSALS[case]
    for existing in ("exists.gguf", "m/Modelfile", "o/out.base.gguf"):
        (tmp_path / existing).parent.mkdir(exist_ok=True)
        (tmp_path / existing).write_text("x")
    before = sorted(tmp_path.rglob("*"))
    names = {"root": tmp_path, **odd_adapters, "llama-tied": bases["llama-tied"], "llama": bases["llama"]}
    args = [a.format(**names) for a in args]
    if "--model" not in args:
        args += ["--model", str(bases["llama"])]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.gguf")]
    assert main(["export", *args]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("loraforge export: error: ") and expected in line, line
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_refusal_in_a_real_process(bases, tmp_path):
    done = run_cli("export", "--model", bases["llama"], "--adapter", tmp_path / "missing", "--out", tmp_path / "x.gguf")
    assert done.returncode == 2
    assert "adapter directory" in one_line_error(done.stderr)


def test_embedded_model_note_says_q4_1_and_names_the_base_export():
    note = embedded_note("smollm2-135m-instruct")
    assert "Q4_1" in note and "dequantized" in note and "loraforge export --model smollm2-135m-instruct" in note
    assert not note.startswith("note:")  # the commands that print notes add the prefix once
    assert embedded_note("some/other-model") is None


def test_domain_function_refuses_with_lora_error(bases, tmp_path):
    with pytest.raises(LoraError, match="is a directory"):
        export_gguf(tmp_path, str(bases["llama"]))


# --- the embedded SmolLM2 -----------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_merged_and_adapter_gguf_generate_like_loraforge(tmp_path):
    from loraforge.core.ops import disabled
    from loraforge.models.embedded import DEFAULT_MODEL, ensure_default_model
    from loraforge.models.generate import generate_text
    from loraforge.tools.merge import describe_merge

    model = AutoModelForCausalLM.from_pretrained(ensure_default_model()).eval()
    attach(model, LoraConfig(r=4, alpha=8.0, target_modules="all-linear"))
    randomize_adapters(model, seed=1, std=0.05)  # small: the text stays fluent, yet changes
    adapter = save_adapter(model, tmp_path / "adapter")
    merged = export_gguf(tmp_path / "merged.gguf", DEFAULT_MODEL, adapter, merged=True)
    assert merged["tied"] and merged["dtype"] == "f32" and merged["merge"]["base_weights"] == "original"
    assert merged["notes"] == [describe_merge(merged["merge"])] and merged["merge"]["kl"] < 1e-8
    lora = export_gguf(tmp_path / "adapter.gguf", DEFAULT_MODEL, adapter)
    assert any("Q4_1" in note and "dequantized" in note for note in lora["notes"])
    base = export_gguf(tmp_path / "base.gguf", DEFAULT_MODEL)
    model, tokenizer = load_for_inference(DEFAULT_MODEL, str(adapter))
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three colours.",
               "Explain LoRA in one sentence.", "Translate 'good morning' to French."]
    want = generate_text(model, tokenizer, prompts, max_new_tokens=32, chat=True)
    with disabled(model):
        assert generate_text(model, tokenizer, prompts, max_new_tokens=32, chat=True) != want
    for llm in (llama(Path(merged["path"])), llama(Path(base["path"]), Path(lora["path"]))):
        for prompt, expected in zip(prompts, want):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            new = cpp_greedy(llm, ids, 32, eos=tokenizer.eos_token_id)
            assert tokenizer.decode(new, skip_special_tokens=True).strip() == expected
