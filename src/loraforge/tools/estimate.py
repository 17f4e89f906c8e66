"""`loraforge estimate`: trainable parameters and training memory of a LoRA run, before it runs.

The architecture is built on PyTorch's meta device (shapes only, no memory), and the targets are
chosen by the trainer's own matcher (`model.find_targets`), so the planner and the trainer agree.
A target Linear (out x in) at rank r adds r * (in + out) parameters (A: r x in, B: out x r); an
Embedding (vocab x dim) adds r * (vocab + dim). Activations are not counted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from loraforge import LoraError, format_bytes, one_line
from loraforge.core.config import ALL_LINEAR, LoraConfig, parse_targets
from loraforge.core.ops import (_matrix_shape, find_targets, output_head_names, parameter_lora_counts, rank_notes,
                                summarize_rank_notes)
from loraforge.models import DTYPES

# --- shape presets ------------------------------------------------------------------------------
# Plain transformers config fields, copied from each model's published config.json on the
# Hugging Face hub. Only fields that change parameter counts matter; the rest keep defaults.
_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096}
_SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M(-Instruct)/config.json (both share the shape)
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}
MODEL_PRESETS: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf/config.json (6,738,415,616 parameters)
    "llama-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    # meta-llama/Llama-2-13b-hf/config.json
    "llama-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40},
    # meta-llama/Llama-2-70b-hf/config.json (grouped-query attention: 8 key/value heads)
    "llama-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 8},
    # mistralai/Mistral-7B-v0.1/config.json (8 key/value heads, intermediate 14336)
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096},
    "smollm2-135m": _SMOLLM2_135M,
    "smollm2-135m-instruct": _SMOLLM2_135M,
}

# --- bytes per parameter --------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
# NF4 (QLoRA paper, Dettmers et al. 2023, sec. 3): 4-bit codes, blocks of 64 weights, one absmax per
# block; double quantization stores those absmax in 8 bits with one fp32 constant per 256 blocks:
# 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.
NF4_BLOCK, NF4_BLOCKS_PER_CONSTANT = 64, 256
ACTIVATIONS_NOTE = ("activations (they grow with batch size x sequence length; "
                    "gradient checkpointing shrinks them), nor the CUDA context and allocator overhead")
GIB = 2 ** 30
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _dtype(name: str) -> torch.dtype:
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise LoraError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name as the loader accepts it (models.DTYPES)."""
    return _dtype(name).itemsize


def optimizer_state_bytes(optimizer: str, param_bytes: int) -> int:
    """Optimizer state bytes per trainable parameter.

    adamw: two moments (exp_avg, exp_avg_sq), kept by torch.optim.AdamW in the parameter's dtype
    (8 bytes for float32 parameters); adamw8bit: two 8-bit moments (Dettmers et al. 2022, 8-bit
    Optimizers via Block-wise Quantization; block constants ignored); sgd: none, without momentum.
    """
    if optimizer == "adamw":
        return 2 * param_bytes
    if optimizer == "adamw8bit":
        return 2
    if optimizer == "sgd":
        return 0
    raise LoraError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")


def nf4_bytes(numel: int) -> int:
    """Storage of one NF4 weight with double quantization: packed 4-bit codes, 8-bit absmax per
    block of 64, one fp32 constant per 256 blocks (about 4.127 bits per weight)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCKS_PER_CONSTANT)


def int8_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8 (Dettmers et al. 2022) storage: 8 bits per weight plus one fp32 scale per row."""
    return out_features * in_features + 4 * out_features


# --- the model's shape ----------------------------------------------------------------------------
def load_model_config(model: str):
    """A transformers config from a model directory (its config.json) or a shape preset name."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _config_from_file(path / "config.json")
    if path.name == "config.json" and path.is_file():
        return _config_from_file(path)
    key = model.strip().lower()
    if key in MODEL_PRESETS:
        return _config_from_dict(dict(MODEL_PRESETS[key]), f"preset {key}")
    raise LoraError(f"--model {model!r} is neither a model directory nor a preset; "
                    f"presets: {', '.join(MODEL_PRESETS)}")


def _config_from_file(path: Path):
    if not path.is_file():
        raise LoraError(f"{path.parent} has no config.json; --model needs a transformers model directory "
                        f"or a preset ({', '.join(MODEL_PRESETS)})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraError(f"{path}: cannot read it as JSON: {err}") from None
    if not isinstance(data, dict):
        raise LoraError(f"{path}: expected a JSON object")
    return _config_from_dict(data, str(path))


def _config_from_dict(data: dict, where: str):
    from transformers import AutoConfig

    model_type = data.pop("model_type", None)
    if not model_type:
        raise LoraError(f"{where}: no model_type field, so the architecture is unknown")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError) as err:
        raise LoraError(f"{where}: transformers cannot build a {model_type!r} config: "
                        f"{one_line(err)}") from None


def meta_model(config) -> nn.Module:
    """The causal-LM architecture of `config` with every tensor on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise LoraError(f"no causal-LM architecture for model_type {config.model_type!r}: "
                        f"{one_line(err)}") from None


def unique_params(model: nn.Module) -> int:
    """Parameter count with tied tensors (embedding = output head) counted once."""
    return sum(p.numel() for p in model.parameters())


# --- the counts -----------------------------------------------------------------------------------
def lora_params(config: LoraConfig, targets: dict[str, nn.Module]) -> dict[str, int]:
    """Trainable parameters per module type (last name part): r * (in + out) per target."""
    per_type: dict[str, int] = {}
    for name, module in targets.items():
        out_f, in_f = _matrix_shape(module)
        kind = name.split(".")[-1]
        per_type[kind] = per_type.get(kind, 0) + config.rank_for(name) * (in_f + out_f)
    return per_type


def adapter_file_bytes(config: LoraConfig, targets: dict[str, nn.Module], dtype: str = "float32") -> int:
    """Size of adapter_model.safetensors as io.save_adapter writes it: an 8-byte header length,
    the JSON header (padded with spaces to 8 bytes) and the tensors, sorted by name."""
    from loraforge.core.io import PREFIX

    elem_bytes, dtype_tag = dtype_bytes(dtype), SAFETENSORS_DTYPES[_dtype(dtype)]
    shapes: dict[str, list[int]] = {}
    for name, module in targets.items():
        out_f, in_f = _matrix_shape(module)
        r, key = config.rank_for(name), PREFIX + name
        if isinstance(module, nn.Embedding):
            shapes[f"{key}.lora_embedding_A"], shapes[f"{key}.lora_embedding_B"] = [r, in_f], [out_f, r]
        else:
            shapes[f"{key}.lora_A.weight"], shapes[f"{key}.lora_B.weight"] = [r, in_f], [out_f, r]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(shapes):
        size = math.prod(shapes[key]) * elem_bytes
        header[key] = {"dtype": dtype_tag, "shape": shapes[key], "data_offsets": [offset, offset + size]}
        offset += size
    header_len = len(json.dumps(header, separators=(",", ":")))
    return 8 + math.ceil(header_len / 8) * 8 + offset


def base_weight_bytes(model: nn.Module, elem_bytes: int, quantize: str | None) -> tuple[int, int]:
    """(bytes of the frozen base weights, parameters stored quantized). With `quantize`, every
    Linear weight except the output head is stored in 4 / 8 bits, as bitsandbytes does;
    embeddings, norms, biases and the head stay at `elem_bytes`."""
    total = unique_params(model)
    if quantize is None:
        return total * elem_bytes, 0
    if quantize not in ("nf4", "int8"):
        raise LoraError(f"unknown --quantize {quantize!r}; use nf4 or int8")
    heads = output_head_names(model)
    quantized, stored = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in heads:
            out_f, in_f = module.weight.shape
            quantized += out_f * in_f
            stored += nf4_bytes(out_f * in_f) if quantize == "nf4" else int8_bytes(out_f, in_f)
    return (total - quantized) * elem_bytes + stored, quantized


def full_finetune_bytes(params: int, weight_bytes: int, optimizer: str) -> dict:
    """Full fine-tuning, every parameter trainable, mixed precision as in the ZeRO paper
    (Rajbhandari et al. 2020, sec. 3.1): 16-bit weights and gradients, an fp32 master copy and the
    optimizer moments in fp32: 2 + 2 + 4 + 8 = 16 bytes per parameter with AdamW. With float32
    weights the master copy is the weights themselves (4 + 4 + 8 = 16 as well)."""
    master = 4 if weight_bytes < 4 else 0
    state = optimizer_state_bytes(optimizer, 4)
    per_param = {"weight": weight_bytes, "gradient": weight_bytes, "fp32_master": master, "optimizer": state}
    labels = {"weight": "weight", "gradient": "gradient", "fp32_master": "fp32 master copy",
              "optimizer": f"{optimizer} states"}
    out = {f"{k}_bytes": v * params for k, v in per_param.items()}
    out["bytes_per_param"] = sum(per_param.values())
    out["total_training_bytes"] = out["bytes_per_param"] * params
    out["accounting"] = (" + ".join(f"{v} B {labels[k]}" for k, v in per_param.items() if v)
                         + f" = {out['bytes_per_param']} B/param (ZeRO paper, Rajbhandari et al. 2020)")
    return out


def estimate(model: str = "smollm2-135m", rank: int = 8, targets: str | list[str] = ALL_LINEAR,
             dtype: str = "bfloat16", optimizer: str = "adamw", quantize: str | None = None,
             adapter_dtype: str = "float32", memory_gb: float | None = None) -> dict:
    """Trainable parameters and training memory (bytes) of LoRA on `model`, and of full fine-tuning."""
    base_elem, adapter_elem = dtype_bytes(dtype), dtype_bytes(adapter_dtype)
    state_elem = optimizer_state_bytes(optimizer, adapter_elem)
    config = LoraConfig(r=rank, target_modules=parse_targets(targets))
    hf_config = load_model_config(model)
    net = meta_model(hf_config)
    chosen = find_targets(net, config)
    notes = rank_notes(config, chosen)
    per_type = lora_params(config, chosen)
    per_type.update(parameter_lora_counts(net, config))  # MoE experts / routers (PEFT's target_parameters)
    trainable, base = sum(per_type.values()), unique_params(net)
    base_bytes, quantized = base_weight_bytes(net, base_elem, quantize)
    result = {
        "model": model, "architecture": type(net).__name__,
        "settings": {"rank": rank, "targets": config.target_modules, "dtype": dtype, "adapter_dtype": adapter_dtype,
                     "optimizer": optimizer, "quantize": quantize, "memory_gb": memory_gb},
        "trainable_params": trainable, "base_params": base, "percent": 100.0 * trainable / base,
        "per_type": per_type, "target_modules": len(chosen),
        "adapter_file_bytes": adapter_file_bytes(config, chosen, adapter_dtype),
        "base_weight_bytes": base_bytes, "quantized_params": quantized,
        "adapter_weight_bytes": trainable * adapter_elem, "gradient_bytes": trainable * adapter_elem,
        "optimizer_bytes": trainable * state_elem,
        "full_finetune": full_finetune_bytes(base, base_elem, optimizer),
        "not_counted": ACTIVATIONS_NOTE,
        "notes": [summarize_rank_notes(notes)] if notes else [],
    }
    result["total_training_bytes"] = (base_bytes + result["adapter_weight_bytes"] + result["gradient_bytes"]
                                      + result["optimizer_bytes"])
    if memory_gb is not None:
        result["memory"] = memory_verdict(result["total_training_bytes"], memory_gb)
        result["full_finetune"]["memory"] = memory_verdict(result["full_finetune"]["total_training_bytes"],
                                                           memory_gb)
    return result


def memory_verdict(needed: int, memory_gb: float) -> dict:
    """Whether `needed` bytes fit in `memory_gb` GiB (2^30 bytes: a '24 GB' card holds ~24 GiB)."""
    if not memory_gb > 0:
        raise LoraError(f"--memory-gb must be > 0, got {memory_gb}")
    budget = int(memory_gb * GIB)
    return {"budget_bytes": budget, "fits": needed <= budget, "margin_bytes": budget - needed}


# --- output ---------------------------------------------------------------------------------------
def _verdict_line(what: str, needed: int, memory: dict) -> str:
    budget = format_bytes(memory["budget_bytes"])
    if memory["fits"]:
        return f"{what}: FITS in {budget}: needs {format_bytes(needed)}, margin {format_bytes(memory['margin_bytes'])}"
    return f"{what}: DOES NOT FIT in {budget}: needs {format_bytes(needed)}, over by {format_bytes(-memory['margin_bytes'])}"


def format_estimate(r: dict) -> str:
    """The human-readable report of `estimate`."""
    s, full = r["settings"], r["full_finetune"]
    targets = ",".join(s["targets"]) if isinstance(s["targets"], list) else s["targets"]
    base_label = f"{s['dtype']}" + (f", Linear weights {s['quantize']}" if s["quantize"] else "")
    lines = [f"{r['model']} ({r['architecture']}): LoRA r={s['rank']} on {targets} "
             f"({r['target_modules']} modules), base {base_label}, adapter {s['adapter_dtype']}, "
             f"optimizer {s['optimizer']}", "",
             f"{'module type':<16}{'trainable params':>18}"]
    lines += [f"{k:<16}{v:>18,}" for k, v in r["per_type"].items()]
    lines += [f"{'total':<16}{r['trainable_params']:>18,}  ({r['percent']:.4f}% of "
              f"{r['base_params']:,} base parameters)", "",
              f"{'memory':<30}{'LoRA':>14}{'full fine-tuning':>20}",
              f"{'frozen base weights':<30}{format_bytes(r['base_weight_bytes']):>14}{'-':>20}",
              f"{'trainable weights':<30}{format_bytes(r['adapter_weight_bytes']):>14}{format_bytes(full['weight_bytes']):>20}",
              f"{'fp32 master weights':<30}{'-':>14}{format_bytes(full['fp32_master_bytes']):>20}",
              f"{'gradients':<30}{format_bytes(r['gradient_bytes']):>14}{format_bytes(full['gradient_bytes']):>20}",
              f"{'optimizer states':<30}{format_bytes(r['optimizer_bytes']):>14}{format_bytes(full['optimizer_bytes']):>20}",
              f"{'total':<30}{format_bytes(r['total_training_bytes']):>14}{format_bytes(full['total_training_bytes']):>20}",
              "",
              f"adapter file: adapter_model.safetensors {format_bytes(r['adapter_file_bytes'])} "
              f"({r['adapter_file_bytes']:,} bytes) in {s['adapter_dtype']} "
              f"(--adapter-dtype; default float32, as adapters train in float32)",
              f"LoRA: adapter weights and gradients in {s['adapter_dtype']}, {s['optimizer']} states "
              f"{r['optimizer_bytes'] // max(r['trainable_params'], 1)} B/param"]
    if s["quantize"]:
        lines.append(f"quantized: {r['quantized_params']:,} Linear weights in {s['quantize']} "
                     + ("(4.127 bits/weight, QLoRA paper sec. 3)" if s["quantize"] == "nf4"
                        else "(8 bits + fp32 scale per row, LLM.int8)")
                     + f"; embeddings, norms and head in {s['dtype']}")
    lines.append(f"full fine-tuning: {full['accounting']}"
                 + ("; quantized weights cannot be trained, so it uses --dtype" if s["quantize"] else ""))
    lines.append(f"not counted: {r['not_counted']}")
    lines += [f"note: {note}" for note in r["notes"]]
    if "memory" in r:
        lines.append(_verdict_line("LoRA", r["total_training_bytes"], r["memory"]))
        lines.append(_verdict_line("full fine-tuning", full["total_training_bytes"], full["memory"]))
    return "\n".join(lines)


def cli_estimate(args) -> int:
    result = estimate(model=args.model, rank=args.rank, targets=args.targets, dtype=args.dtype,
                      optimizer=args.optimizer, quantize=args.quantize,
                      adapter_dtype=getattr(args, "adapter_dtype", "float32"),
                      memory_gb=getattr(args, "memory_gb", None))
    print(json.dumps(result) if args.json else format_estimate(result))
    return 0
