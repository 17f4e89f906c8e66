"""GGUF export for llama.cpp and Ollama: a LoRA adapter file, a merged model, or the base alone.

Three kinds of file, one writer (the ``gguf`` package, whose name maps and constants are the
ones llama.cpp reads)::

    export_gguf(adapter=DIR, model=M, out=F)                 # adapter GGUF: llama.cpp --lora F
    export_gguf(adapter=DIR, model=M, out=F, merged=True)    # base + adapter folded in, standalone
    export_gguf(model=M, out=F)                              # the base alone (pair it with an adapter)

What llama.cpp does with an adapter file (src/llama-adapter.cpp, llama-graph.cpp) and what this
module therefore writes:

* ``general.type = adapter``, ``adapter.type = lora``, one adapter-wide ``adapter.lora.alpha``;
  every tensor is ``<gguf name>.lora_a`` (numpy shape r x in) or ``.lora_b`` (out x r). llama.cpp
  scales each pair by ``alpha / rank`` with the rank read from lora_b, so per-module alphas and
  ranks (alpha_pattern / rank_pattern) and rsLoRA's ``alpha / sqrt(r)`` are folded into B.
* For Llama-family models llama.cpp's HF converter permutes the rows of q_proj / k_proj (rotary
  layout); ``dW = B A`` is permuted the same way by permuting the rows of B (A unchanged).
* Token embeddings: ``token_embd.weight.lora_a`` is (vocab x r) and ``.lora_b`` (dim x r).
* DoRA and modules_to_save have no llama.cpp adapter form: refused, with ``--merged`` as the way
  out. An embedding or output-head adapter on tied embeddings is refused in both modes (llama.cpp
  keeps one tensor for both ends, and merging would change the other end too).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraforge import LoraError, format_bytes
from loraforge.core.io import check_apart
from loraforge.models.embedded import weights_tied
from loraforge.tools.merge import describe_merge

DTYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_DTYPES = ("f32", "f16", "bf16")
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values

# Known byte-level BPE pre-tokenizer split patterns (as tokenizer.json writes them) -> llama.cpp name
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

MERGED_HINT = "export --merged instead (the adapter folded into a standalone model)"


# --- the base model: architecture and shape ---------------------------------------------------
@dataclass
class BaseInfo:
    """What the writer needs to know about the base model (from its config.json)."""

    path: str
    config: object
    arch: object  # gguf.MODEL_ARCH
    tied: bool

    @property
    def arch_name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.arch]

    @property
    def permutes_qk(self) -> bool:
        import gguf

        return self.arch == gguf.MODEL_ARCH.LLAMA

    @property
    def n_head(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_head_kv(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_head)

    def tensor_map(self):
        import gguf

        return gguf.get_tensor_name_map(self.arch, int(self.config.num_hidden_layers))


def supported_archs() -> dict:
    """transformers model_type -> gguf architecture, for the families this exporter writes."""
    import gguf

    A = gguf.MODEL_ARCH
    return {"llama": A.LLAMA, "mistral": A.LLAMA, "qwen2": A.QWEN2, "qwen3": A.QWEN3}


def base_info(model: str) -> BaseInfo:
    """Read the base model's config and check that its architecture can be exported."""
    from transformers import AutoConfig

    from loraforge.models.loading import resolve_model_path

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise LoraError(f"cannot read the config of model '{model}': {str(err).splitlines()[0]}") from None
    archs = supported_archs()
    model_type = getattr(config, "model_type", None)
    if model_type not in archs:
        moe = " (MoE experts have no GGUF writer here yet)" if _has_experts(config) else ""
        raise LoraError(f"GGUF export supports model types {', '.join(archs)}; '{model}' is {model_type!r}{moe}")
    return BaseInfo(path, config, archs[model_type], bool(getattr(config, "tie_word_embeddings", False)))


def _has_experts(config) -> bool:
    return any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def gguf_tensor_name(info: BaseInfo, hf_name: str, tmap=None) -> str:
    """The llama.cpp tensor name of a transformers parameter ('model.layers.0.self_attn.q_proj.weight'
    -> 'blk.0.attn_q.weight'); a LoraError if llama.cpp has no such tensor."""
    tmap = tmap or info.tensor_map()
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise LoraError(f"{hf_name} has no llama.cpp ({info.arch_name}) tensor, so it cannot be exported as GGUF")
    return name


# --- Q/K rotary row permutation (Llama family) ---------------------------------------------------
def qk_row_order(rows: int, n_head: int) -> np.ndarray:
    """The row order llama.cpp's HF converter gives q_proj / k_proj weights: within each head the
    two rotary halves are interleaved (row h*d + 2i + j takes row h*d + j*d/2 + i)."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, 2, half).transpose(0, 2, 1).reshape(-1)


def qk_heads(info: BaseInfo, hf_name: str) -> int | None:
    """Heads to permute by for a q_proj / k_proj tensor of a Llama-family model, else None."""
    if not info.permutes_qk:
        return None
    module = hf_name.rsplit(".", 1)[0] if hf_name.endswith((".weight", ".bias")) else hf_name
    if module.endswith("q_proj"):
        return info.n_head
    if module.endswith("k_proj"):
        return info.n_head_kv
    return None


def permute_rows(array: np.ndarray, n_head: int | None) -> np.ndarray:
    return array if n_head is None else array[qk_row_order(array.shape[0], n_head)]


# --- tensor encoding --------------------------------------------------------------------------
def check_dtype(dtype: str, adapter: bool = False) -> str:
    if dtype not in DTYPES:
        raise LoraError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if adapter and dtype not in ADAPTER_DTYPES:
        raise LoraError(f"--dtype {dtype} applies to model files (--merged or the base); an adapter GGUF "
                        f"takes {', '.join(ADAPTER_DTYPES)}")
    return dtype


def encode(array: np.ndarray, dtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors (norms, biases) stay f32; q8_0
    applies to 2-D tensors whose rows are whole Q8_0 blocks (the others stay f32)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or dtype == "f32":
        return array, None
    if dtype == "f16":
        return array.astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(array, Q.BF16), Q.BF16
    if array.shape[-1] % Q8_BLOCK:
        return array, None
    return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0


def file_type(dtype: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


# --- output paths ---------------------------------------------------------------------------------
def check_out(out: str | Path, force: bool = False, inputs: tuple = ()) -> Path:
    """Refuse a directory, a path that is or lies inside an input (the adapter or model
    directory), or an existing file without ``force``."""
    out = Path(out)
    if out.is_dir():
        raise LoraError(f"output {out} is a directory; pass a file path such as {out / 'model.gguf'}")
    check_apart(out, [p for p in inputs if p is not None and Path(p).exists()])
    if out.exists() and not force:
        raise LoraError(f"output file {out} exists (pass --force to overwrite)")
    return out


def write_atomic(writer, out: Path) -> int:
    """Write a filled GGUFWriter beside ``out`` and rename it into place; returns the size in bytes."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as err:
        raise LoraError(f"cannot write {out}: {err.strerror or err}") from None
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out.stat().st_size


# --- adapter GGUF -------------------------------------------------------------------------------
def read_lora(adapter: str | Path):
    """The adapter's config (ranks taken from the tensors) and its {module: {lora_A/B...}} tensors."""
    from loraforge.core.io import ranks_from_tensors, group_by_module, read_adapter

    config, tensors = read_adapter(adapter)
    modules = group_by_module(tensors, str(adapter))
    if not modules:
        raise LoraError(f"adapter {adapter} holds no LoRA weights")
    return ranks_from_tensors(config, modules), modules, tensors


def refuse_inexpressible(config, modules: dict, tensors: dict, adapter, info: BaseInfo, merged: bool):
    """What an adapter GGUF cannot hold (DoRA, modules_to_save) and what no export can (an embedding
    or output-head adapter on tied embeddings changes both ends of one weight)."""
    if not merged and config.target_parameters:
        raise LoraError(f"adapter {adapter} adapts parameters no Linear owns (target_parameters: "
                        f"{', '.join(config.target_parameters)}: MoE experts or routers), which llama.cpp adapters "
                        f"cannot express; {MERGED_HINT}")
    if not merged and (config.use_dora or any("lora_magnitude_vector" in parts for parts in modules.values())):
        raise LoraError(f"adapter {adapter} is DoRA, which llama.cpp adapters cannot express; {MERGED_HINT}")
    saved = config.modules_to_save or [k for k in tensors if ".lora_" not in k]
    if not merged and saved:
        raise LoraError(f"adapter {adapter} trains whole modules (modules_to_save: {saved[0]}), which llama.cpp "
                        f"adapters cannot express; {MERGED_HINT}")
    heads = [m for m in modules if m.endswith(("embed_tokens", "lm_head"))]
    if heads and info.tied:
        raise LoraError(f"adapter {adapter} adapts {heads[0]} of a model with tied input/output embeddings; "
                        f"llama.cpp shares that one tensor, so it cannot be exported as GGUF")


def check_fits_base(config, modules: dict, tensors: dict, adapter, info: BaseInfo):
    """The adapter's shapes against the base (an empty 'meta' model: no weights are loaded)."""
    from transformers import AutoModelForCausalLM

    from loraforge.core.io import check_fits

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(info.config)
    check_fits(skeleton, config, modules, tensors, adapter)


def lora_pair(info: BaseInfo, module: str, parts: dict, scaling: float, alpha: float, tmap):
    """(name, lora_a, lora_b) numpy arrays for one module, llama.cpp's layout and scale folded in."""
    embedding = "lora_embedding_A" in parts
    A = to_numpy(parts["lora_embedding_A" if embedding else "lora_A"])  # (r, in) / (r, vocab)
    B = to_numpy(parts["lora_embedding_B" if embedding else "lora_B"])  # (out, r) / (dim, r)
    rank = A.shape[0]
    B = B * np.float32(scaling / (alpha / rank))  # llama.cpp applies alpha / rank
    name = gguf_tensor_name(info, module + ".weight", tmap)
    if embedding:
        return name, np.ascontiguousarray(A.T), B  # lora_a (vocab, r), lora_b (dim, r)
    return name, A, permute_rows(B, qk_heads(info, module))


def export_adapter(adapter: str | Path, model: str, out: str | Path, dtype: str = "f32",
                   force: bool = False) -> dict:
    """Write the adapter at ``adapter`` as a llama.cpp LoRA GGUF for the base ``model``."""
    import gguf

    check_dtype(dtype, adapter=True)
    config, modules, tensors = read_lora(adapter)
    info = base_info(model)
    out = check_out(out, force, (adapter, info.path))
    refuse_inexpressible(config, modules, tensors, adapter, info, merged=False)
    check_fits_base(config, modules, tensors, adapter, info)
    writer = gguf.GGUFWriter(None, info.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.alpha))
    writer.add_name(Path(adapter).resolve().name)
    tmap = info.tensor_map()
    for module in sorted(modules):
        name, a, b = lora_pair(info, module, modules[module], config.scaling_for(module), config.alpha, tmap)
        for suffix, array in ((".lora_a", a), (".lora_b", b)):
            data, raw = encode(array, dtype)
            writer.add_tensor(name + suffix, data, raw_dtype=raw)
    size = write_atomic(writer, out)
    return {"kind": "adapter", "path": str(out), "arch": info.arch_name, "dtype": dtype, "bytes": size,
            "tensors": 2 * len(modules), "alpha": float(config.alpha), "model": model}


# --- model GGUF (base or merged) ------------------------------------------------------------------
def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise LoraError(f"RoPE scaling {kind!r} is not exported yet; use llama.cpp's convert_hf_to_gguf.py")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def add_hparams(writer, info: BaseInfo, dtype: str):
    c = info.config
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(info.n_head)
    writer.add_head_count_kv(info.n_head_kv)
    writer.add_key_length(info.head_dim)
    writer.add_value_length(info.head_dim)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_rope_freq_base(rope_theta(c))
    writer.add_rope_dimension_count(info.head_dim)
    writer.add_vocab_size(int(c.vocab_size))
    writer.add_file_type(file_type(dtype))


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer described in tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = SPLIT_PRE.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise LoraError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one this "
                    f"exporter knows; use llama.cpp's convert_hf_to_gguf.py")


def vocab_tables(tokenizer, vocab_size: int):
    """(tokens, token types, merges, pre-tokenizer name) of a byte-level BPE fast tokenizer."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise LoraError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if (spec.get("model") or {}).get("type") != "BPE":
        raise LoraError(f"GGUF export supports byte-level BPE tokenizers; this one is "
                        f"{(spec.get('model') or {}).get('type')!r} (use llama.cpp's convert_hf_to_gguf.py)")
    pre = pre_tokenizer_name(spec)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges, pre


def add_vocab(writer, info: BaseInfo, tokenizer):
    """The full tokenizer: tokens, types, merges, pre-tokenizer, special ids, add-bos/eos, chat template."""
    import gguf

    tokens, types, merges, pre = vocab_tables(tokenizer, int(info.config.vocab_size))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = gguf.SpecialVocab(info.path, load_merges=False, n_vocab=len(tokens))
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and kind not in special.special_token_ids:
            special.special_token_ids[kind] = int(token_id)
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def model_tensors(model, info: BaseInfo, tied: bool):
    """(gguf name, float32 array) for every weight llama.cpp loads; the output head is left out when
    it is tied to the input embeddings (llama.cpp then reuses token_embd)."""
    tmap = info.tensor_map()
    for hf_name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or "rotary_emb" in hf_name:
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        name = gguf_tensor_name(info, hf_name, tmap)
        yield name, permute_rows(to_numpy(tensor), qk_heads(info, hf_name))



def load_merged(model: str, adapter: str | Path | None, info: BaseInfo, base_weights: str = "auto"):
    """The base model (float32), with the adapter merged in when given (onto the weights it was
    trained over: tools.merge.merged_model), its tokenizer, and the merge report (or None)."""
    from loraforge.models.loading import load_model, load_tokenizer
    from loraforge.tools.merge import merged_model

    if adapter is None:
        return load_model(model, dtype="float32", device="cpu"), load_tokenizer(model), None
    config, modules, tensors = read_lora(adapter)
    refuse_inexpressible(config, modules, tensors, adapter, info, merged=True)
    return merged_model(model, adapter, base_weights)


def export_model(model: str, out: str | Path, adapter: str | Path | None = None, dtype: str = "f32",
                 force: bool = False, base_weights: str = "auto") -> dict:
    """Write ``model`` (with ``adapter`` merged in, when given) as one standalone GGUF."""
    import gguf

    check_dtype(dtype)
    if adapter is not None:
        read_lora(adapter)  # a missing or broken adapter fails before anything is loaded
    info = base_info(model)
    out = check_out(out, force, (adapter, info.path))
    rope_theta(info.config)  # refuse unsupported RoPE scaling before loading weights
    hf_model, tokenizer, merge_report = load_merged(model, adapter, info, base_weights)
    tied = weights_tied(hf_model)
    writer = gguf.GGUFWriter(None, info.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(info.path).name + ("-merged" if adapter else ""))
    add_hparams(writer, info, dtype)
    add_vocab(writer, info, tokenizer)
    count = 0
    for name, array in model_tensors(hf_model, info, tied):
        data, raw = encode(array, dtype)
        writer.add_tensor(name, data, raw_dtype=raw)
        count += 1
    size = write_atomic(writer, out)
    return {"kind": "merged" if adapter else "base", "path": str(out), "arch": info.arch_name, "dtype": dtype,
            "bytes": size, "tensors": count, "tied": tied, "model": model, "merge": merge_report}


# --- Ollama Modelfile -------------------------------------------------------------------------
CHATML_GO = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n'
    '{{ .Content }}<|im_end|>\n'
    '{{ end }}<|im_start|>assistant\n'
)


def ollama_template(chat_template: str | None) -> tuple[str | None, str | None, list[str]]:
    """(Go TEMPLATE, default SYSTEM prompt, stop strings) for a Jinja chat template; ChatML is
    converted, anything else gives (None, None, stops) and a Modelfile without TEMPLATE."""
    if not chat_template or "<|im_start|>" not in chat_template or "<|im_end|>" not in chat_template:
        return None, None, []
    match = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", chat_template)
    system = match.group(1) if match and "{{" not in match.group(1) else None
    return CHATML_GO, system, ["<|im_end|>", "<|im_start|>"]


def modelfile_text(base: str, adapter: str | None, chat_template: str | None, eos: str | None) -> str:
    """A Modelfile: FROM the model GGUF (+ ADAPTER the adapter GGUF), the chat template as a Go
    template where it can be converted (ChatML), and stop parameters for the end-of-turn tokens."""
    template, system, stops = ollama_template(chat_template)
    if eos and eos not in stops:
        stops.insert(0, eos)
    lines = [f"FROM {base}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# the chat template is not ChatML; Ollama reads tokenizer.chat_template from the GGUF, "
                     "or write a TEMPLATE by hand")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def ollama_name(out: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", out.stem.lower()).strip("-._")
    return name or "loraforge-model"


def check_modelfile(out: Path, force: bool) -> Path:
    path = out.parent / "Modelfile"
    if path.exists() and not force:
        raise LoraError(f"{path} exists (pass --force to overwrite)")
    return path


# --- the command ------------------------------------------------------------------------------
def embedded_note(model: str) -> str | None:
    from loraforge.models.embedded import DEFAULT_MODEL, EMBEDDED_GGUF

    if str(model).strip().lower() != DEFAULT_MODEL:
        return None
    return (f"the embedded {DEFAULT_MODEL} ships as {EMBEDDED_GGUF} (Q4_1), but loraforge trains on its "
            f"dequantized float weights: pair adapters with a base exported by `loraforge export --model "
            f"{DEFAULT_MODEL} --format gguf --out base.gguf` (f32/f16), not with the shipped Q4_1 file")


def default_base_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.base.gguf")


def export_gguf(out: str | Path, model: str, adapter: str | Path | None = None, merged: bool = False,
                dtype: str = "f32", ollama: bool = False, force: bool = False,
                base_gguf: str | Path | None = None, base_weights: str = "auto") -> dict:
    """The ``export`` command as a function: writes the file(s), returns what was written and the
    llama.cpp / Ollama commands that use them."""
    out = Path(out)
    preflight(out, adapter, merged, ollama, force, base_gguf)
    if adapter is None or merged:
        result = export_model(model, out, adapter if merged else None, dtype, force, base_weights)
        notes = [describe_merge(result["merge"])] if result["merge"] else []
        result.update(files=[result["path"]], commands=[f"llama-cli -m {out}"], notes=notes)
        model_file, adapter_file = out, None
    else:
        result, model_file = adapter_with_base(out, model, adapter, dtype, ollama, force, base_gguf)
        adapter_file = out
    if not merged and embedded_note(model):
        result["notes"].insert(0, embedded_note(model))
    if ollama:
        modelfile = out.parent / "Modelfile"
        write_modelfile(modelfile, model_file, adapter_file, *tokenizer_template(model))
        result["files"].append(str(modelfile))
        result["commands"].append(f"cd {modelfile.parent} && ollama create {ollama_name(out)} -f Modelfile")
    return result


def preflight(out: Path, adapter, merged: bool, ollama: bool, force: bool, base_gguf) -> None:
    """Every refusal that needs no model: flags that do not go together, and every output path
    (all are checked before any file is written)."""
    if merged and adapter is None:
        raise LoraError("--merged needs --adapter (without one, export writes the base model)")
    if adapter is not None and not Path(adapter).is_dir():
        raise LoraError(f"adapter directory {adapter} does not exist")
    if ollama:
        check_modelfile(out, force)
    if ollama and adapter is not None and not merged and base_gguf is None:
        check_out(default_base_path(out), force, (adapter,))
    if base_gguf is not None and not Path(base_gguf).is_file():
        raise LoraError(f"--base-gguf {base_gguf} is not a file; export the base first (export --model M --out FILE)")


def adapter_with_base(out: Path, model: str, adapter, dtype: str, ollama: bool, force: bool, base_gguf):
    """The adapter GGUF, and with --ollama (no --base-gguf) the base beside it: (result, base path)."""
    result = export_adapter(adapter, model, out, dtype, force)
    result.update(files=[result["path"]], notes=[])
    base = Path(base_gguf or "base.gguf")
    if ollama and base_gguf is None:
        base = default_base_path(out)
        result["files"].append(export_model(model, base, None, dtype, force)["path"])
    elif base_gguf is None:
        result["notes"].append(f"export the base to pair it with: loraforge export --model {model} "
                               f"--format gguf --out base.gguf")
    result["commands"] = [f"llama-cli -m {base} --lora {out}"]
    return result, base


def tokenizer_template(model: str) -> tuple[str | None, str | None]:
    from loraforge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    return tokenizer.chat_template, tokenizer.eos_token


def write_modelfile(path: Path, model_file: Path, adapter_file: Path | None, chat_template, eos):
    path.write_text(modelfile_text(relative_to(model_file, path.parent),
                                   adapter_file and relative_to(adapter_file, path.parent), chat_template, eos))


def relative_to(file: Path, folder: Path) -> str:
    """How the Modelfile in ``folder`` names ``file``: './name' beside it, else a relative path."""
    rel = os.path.relpath(Path(file).resolve(), Path(folder).resolve())
    return rel if rel.startswith(".") else f"./{rel}"


def cli_export(args) -> int:
    result = export_gguf(args.out, args.model, args.adapter, args.merged, args.dtype, args.ollama, args.force,
                         args.base_gguf, args.base_weights)
    print(f"{result['kind']} GGUF ({result['arch']}, {result['dtype']}, {result['tensors']} tensors, "
          f"{format_bytes(result['bytes'])}) written to {result['path']}")
    for path in result["files"][1:]:
        print(f"also written: {path}")
    for note in result["notes"]:
        print(f"note: {note}")
    for command in result["commands"]:
        print(f"  {command}")
    return 0
