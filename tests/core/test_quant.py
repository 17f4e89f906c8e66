"""QLoRA: LoRA over a bitsandbytes NF4 / int8 base (loraforge.core.quant), on tiny Llamas built in code.

Hidden and MLP sizes are multiples of the NF4 block size (64), as in real models."""
from __future__ import annotations

import json
import warnings

import factory
import pytest
import torch
from transformers import LlamaForCausalLM

from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.tools.estimate import nf4_bytes
from loraforge.core.io import load_adapter, save_adapter
from loraforge.core.layers import LoraLinear, dequantize, is_quantized
from loraforge.core.ops import adapter_params, attach, lora_layers, merge, merge_and_unload, set_trainable
from loraforge.core.quant import dequantize_model, nf4_bits_per_weight, quantizable_linears, quantize_model, weight_bytes

pytest.importorskip("bitsandbytes")  # loraforge[quant]

VOCAB = 512  # the tiny tokenizer's size
BASE_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0, hidden: int = 128) -> LlamaForCausalLM:
    return factory.tiny_llama(seed, hidden, vocab=VOCAB, context=128)


def lora(model, seed: int = 1, r: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    attach(model, LoraConfig(r=r, alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give the update a value
        for name, p in adapter_params(model).items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def batch(seed: int = 0, rows: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def dequantized_copy(quantized) -> LlamaForCausalLM:
    """A float tiny Llama whose every Linear holds the dequantized weight of `quantized`."""
    reference = tiny_llama()
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            source = layers[name]
            source = source.base_layer if hasattr(source, "base_layer") else source
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize(source) if is_quantized(source) else source.weight)
    return reference


# --- building the 4-bit model --------------------------------------------------------------------
def test_nf4_replaces_block_linears_in_place_with_double_quantized_blocks_of_64():
    import bitsandbytes as bnb

    model = tiny_llama()
    names = set(quantizable_linears(model))
    assert names and all(n.split(".")[-1] in BASE_KEYS for n in names)
    before = weight_bytes(model)
    quantize_model(model, "nf4")
    modules = dict(model.named_modules())
    for name in names:  # same names, 4-bit layers, NF4 with double quantization, blocks of 64
        layer = modules[name]
        assert isinstance(layer, bnb.nn.Linear4bit) and is_quantized(layer)
        state = layer.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    info = model.loraforge_quantization
    assert info["bytes_before"] == before and info["bytes_after"] == weight_bytes(model) < before
    # what `loraforge estimate --quantize nf4` counts (4-bit codes, an 8-bit scale per 64 weights, an
    # fp32 constant per 256 blocks), plus per layer the code books (16 + 256 fp32) and an fp32 offset
    sizes = [modules[name].out_features * modules[name].in_features for name in names]
    assert info["linear_bytes_after"] == sum(nf4_bytes(n) + 4 * (16 + 256 + 1) for n in sizes)
    assert nf4_bits_per_weight() == pytest.approx(4.127, abs=1e-3)
    assert 8 * sum(nf4_bytes(n) for n in sizes) / sum(sizes) == pytest.approx(nf4_bits_per_weight(), abs=1e-3)


def test_quantize_model_refuses_bad_requests():
    model = tiny_llama()
    with pytest.raises(LoraError, match="unknown quantization"):
        quantize_model(model, "fp8")
    with pytest.raises(LoraError, match="block size"):
        quantize_model(model, "nf4", blocksize=48)
    attach(model, LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(LoraError, match="before attaching"):
        quantize_model(model, "nf4")


# --- LoRA over NF4 ---------------------------------------------------------------------------------
def test_lora_over_nf4_matches_lora_over_the_dequantized_weights():
    quantized = lora(quantize_model(tiny_llama(), "nf4"))
    reference = lora(dequantized_copy(quantized))  # same seed: same adapters
    ids = batch()
    got, expected = logits(quantized, ids), logits(reference, ids)
    assert rel(got, expected) < 1e-4
    full = logits(lora(tiny_llama()), ids)  # over the float weights: NF4 rounding shows, but small
    assert 1e-3 < rel(got, full) < 0.2
    for model in (quantized, reference):  # gradients agree too
        model.train()
        model.zero_grad()
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    got_grads, ref_grads = adapter_params(quantized), adapter_params(reference)
    for name, p in got_grads.items():
        assert rel(p.grad, ref_grads[name].grad) < 1e-3, name


def test_only_adapters_get_gradients_under_bf16_autocast_also_after_an_eval_pass():
    model = lora(quantize_model(tiny_llama(), "nf4"))
    params = adapter_params(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(params)
    ids = batch()

    def grads():
        model.train()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids).logits
        assert out.dtype == torch.bfloat16
        out.float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = grads()
    assert set(first) == set(params) and all(g.abs().sum() > 0 for g in first.values())
    logits(model.eval(), ids)  # a validation pass (eval, no grad) must not change the 4-bit layout
    second = grads()
    for name, grad in first.items():
        torch.testing.assert_close(second[name], grad)


def test_training_over_nf4_reduces_the_loss_and_leaves_the_base_alone():
    model = quantize_model(tiny_llama(), "nf4")
    torch.manual_seed(0)
    attach(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    set_trainable(model)
    codes = {n: m.weight.data.clone() for n, m in model.named_modules() if is_quantized(m)}
    optimizer = torch.optim.AdamW(adapter_params(model).values(), lr=1e-2)
    ids = batch(seed=3, rows=4, length=32)
    model.train()
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses
    for name, module in model.named_modules():
        if is_quantized(module):
            assert torch.equal(module.weight.data, codes[name])


def test_adapter_trained_over_nf4_loads_on_the_full_precision_base(tmp_path):
    nf4 = lora(quantize_model(tiny_llama(), "nf4"), r=8)
    save_adapter(nf4, tmp_path / "adapter")
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert set(keys) == set(BASE_KEYS)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in stored
    full = tiny_llama()
    ids = batch()
    plain = logits(full, ids)
    load_adapter(full, tmp_path / "adapter")
    assert all(not is_quantized(layer.base_layer) for _, layer in lora_layers(full))
    with_adapter, on_nf4 = logits(full, ids), logits(nf4, ids)
    effect = (with_adapter - plain).norm()
    assert (with_adapter - on_nf4).norm() < 0.5 * effect  # the base's rounding, not the adapter, differs
    assert rel(on_nf4, with_adapter) < 0.2


def test_merge_into_nf4_warns_and_rounds_only():
    model = quantize_model(tiny_llama(), "nf4")
    ids = batch()
    without = logits(model, ids)
    lora(model)
    unmerged = logits(model, ids)
    with pytest.warns(UserWarning, match="re-quantizes"):
        merge(model)
    layers = dict(lora_layers(model))
    assert all(is_quantized(layer.base_layer) for layer in layers.values())
    assert all(layer.base_layer.weight.quant_state.blocksize == 64 for layer in layers.values())
    merged = logits(model, ids)
    assert rel(merged, unmerged) > 1e-3  # one more NF4 rounding, of W + dW ...
    assert (merged - unmerged).norm() < 0.3 * (unmerged - without).norm()  # ... small next to the adapter's effect


def test_adapter_merged_into_the_dequantized_base_keeps_the_trained_model(tmp_path):
    nf4 = lora(quantize_model(tiny_llama(), "nf4"))
    save_adapter(nf4, tmp_path / "adapter")
    ids = batch()
    trained = logits(nf4, ids)
    base = dequantize_model(quantize_model(tiny_llama(), "nf4"))
    assert not any(is_quantized(m) for m in base.modules())
    assert type(base.model.layers[0].mlp.up_proj) is torch.nn.Linear
    load_adapter(base, tmp_path / "adapter")
    merged = merge_and_unload(base)  # exact: a float base
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert rel(logits(merged, ids), trained) < 1e-4


# --- int8 -------------------------------------------------------------------------------------------
def test_int8_base_trains_evaluates_and_merges():
    import bitsandbytes as bnb

    model = quantize_model(tiny_llama(), "int8")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    lora(model)
    reference = lora(tiny_llama())
    ids = batch()
    assert rel(logits(model, ids), logits(reference, ids)) < 0.05  # int8: about 1% per weight
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).logits
    out.float().logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_params(model))
    unmerged = logits(model.eval(), ids)  # after a forward, bnb keeps the row scales elsewhere
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoraLinear)
    expected = reference.model.layers[0].mlp.up_proj.base_layer.weight
    torch.testing.assert_close(dequantize(layer.base_layer), expected, atol=2e-3, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(model)
    assert rel(logits(model, ids), unmerged) < 0.05


# --- the command line ---------------------------------------------------------------------------
def test_train_eval_generate_with_quantize_nf4(tmp_path, capsys):
    from factory import tiny_tokenizer

    from loraforge.cli import main
    from loraforge.demo.tasks import write_splits

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = write_splits(tmp_path / "data", n_train=24, n_test=4, seed=0, task="dates")
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data["train"]), "--out", str(out),
                 "--quantize", "nf4", "--precision", "bf16-base", "--max-steps", "3", "--batch-size", "4",
                 "--max-tokens", "128", "--max-len", "128", "--no-progress", "--save-every", "0",
                 "--val-fraction", "0.2"]) == 0
    err = capsys.readouterr().err
    assert "Linear layers in nf4" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss"] > 0 for r in records) and records[-1]["val_loss"] is not None
    assert (out / "adapter_model.safetensors").is_file()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", str(data["test"]),
                 "--quantize", "nf4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["loss"] > 0
    assert main(["generate", "--model", str(model_dir), "--adapter", str(out), "--prompt", "Rewrite the date",
                 "--max-tokens", "4", "--quantize", "nf4"]) == 0


def test_gpt2_conv1d_layers_quantize_train_and_load_back_on_the_float_model(tmp_path):
    """GPT-2's Conv1D (a transposed Linear) becomes a 4-bit Linear; LoRA over it equals LoRA over
    the dequantized weights, trains, and the adapter loads on the float GPT-2 (its Conv1D)."""
    from factory import lm_steps, tiny_gpt2

    from loraforge.core.layers import LoraConv1D

    float_model = tiny_gpt2()
    model = quantize_model(tiny_gpt2(), "nf4")
    assert sum(is_quantized(m) for m in model.modules()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2 layers
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        drift = (model(input_ids=ids).logits - float_model(input_ids=ids).logits).abs().max()
    assert 0 < drift < 1.0  # NF4 error only
    attach(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    losses = lm_steps(model, ids, 4)
    assert losses[-1] < losses[0]
    save_adapter(model.eval(), tmp_path / "a")
    load_adapter(float_model, tmp_path / "a")
    layer = float_model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, LoraConv1D)  # on the float model, the same factors over its Conv1D
    trained = model.get_submodule("transformer.h.0.attn.c_attn")
    torch.testing.assert_close(layer.delta_weight("default"), trained.delta_weight("default"))
    dequantized = dequantize_model(quantize_model(tiny_gpt2(), "nf4"))  # float Linear, NF4's values
    load_adapter(dequantized, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(dequantized(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
