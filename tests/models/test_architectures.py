"""The architecture matrix: tiny random models (hidden 64, 2 layers, built in tests/factory.py) of the
families users fine-tune, each checked against PEFT and against the model's own forward.

Mixtral and Qwen3-MoE store their experts as fused 3-D parameters (and route with a non-Linear
gate) that PEFT's `all-linear` adapts through `target_parameters`; so does loraforge's
(core.layers.LoraParameter), with PEFT's keys, ranks and nesting. Qwen2-MoE's experts are not
adapted by PEFT's `all-linear` (its conversion tables leave that model type out), nor here; its
64 -> 1 shared-expert gate is, in both."""
from __future__ import annotations

import warnings

import pytest
import torch
from factory import ARCHITECTURES, WINDOW, lm_steps, randomize_adapters, tiny_arch

from loraforge import data as D
from loraforge.core.config import LoraConfig
from loraforge.core.io import load_adapter, save_adapter
from loraforge.core.ops import attach, find_targets, lora_layers, merge, parameter_report, unmerge

warnings.filterwarnings("ignore", message=".*kernels.*")
FUSED_EXPERTS = ("mixtral", "qwen3_moe")  # experts in 3-D parameters, adapted as PEFT's target_parameters
DENSE = [name for name in ARCHITECTURES if name not in FUSED_EXPERTS]  # every Linear is a Linear
LENGTHS = (3 * WINDOW, 2 * WINDOW + 3, WINDOW + 1)  # every example longer than the window


def examples(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen) for n in LENGTHS]


def pairs(seqs: list[torch.Tensor]) -> list[D.Pair]:
    return [(s.tolist(), s.tolist()) for s in seqs]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_rows_equal_each_example_alone(name):
    """Packed training sees exactly what each example alone would, sliding windows included."""
    model, seqs = tiny_arch(name), examples()
    rows = D.pack(pairs(seqs), max_tokens=sum(LENGTHS)) + D.one_per_row(pairs(seqs[:1]))  # a padded row too
    batch = D.collate(rows, pad_id=0, windows=D.has_windows(model.config))
    assert ("attention_mask" in batch) == (not D.has_windows(model.config))
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
    assert len(rows[0]["seq_lens"]) == len(seqs)
    torch.testing.assert_close(packed[0], torch.cat(alone), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :len(seqs[0])], alone[0], atol=1e-5, rtol=1e-4)


def test_windowed_models_are_recognised():
    windowed = {name for name in ARCHITECTURES if D.has_windows(tiny_arch(name).config)}
    assert windowed == {"mistral", "gemma2", "gemma3"}


def _peft_all_linear(name: str, r: int = 4):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(tiny_arch(name), PeftLoraConfig(r=r, lora_alpha=8, target_modules="all-linear"))


def _peft_targets(peft_model) -> set[str]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_all_linear_targets_what_peft_targets(name):
    peft_model = _peft_all_linear(name)
    ours = tiny_arch(name)
    if name in DENSE:
        assert set(find_targets(ours, LoraConfig(r=4, target_modules="all-linear"))) == _peft_targets(peft_model)
    attach(ours, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert {n for n, _ in lora_layers(ours)} == _peft_targets(peft_model)  # experts: PEFT's nested wrappers
    peft_count = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert parameter_report(ours)["trainable_params"] == peft_count
    if name in FUSED_EXPERTS:
        assert {"gate_up_proj", "down_proj", "gate"} <= set(parameter_report(ours)["per_type"])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_peft_reads_our_adapter_and_we_read_peft_s(name, tmp_path):
    from peft import PeftModel

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = randomize_adapters(attach(tiny_arch(name), LoraConfig(r=4, alpha=8, target_modules="all-linear")))
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_arch(name), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        if name in FUSED_EXPERTS:  # the experts' updates count: without them the logits differ
            with torch.no_grad(), theirs.disable_adapter():
                base = theirs(input_ids=ids).logits
            attention_only = randomize_adapters(attach(tiny_arch(name), LoraConfig(r=4, alpha=8,
                                                                                   target_modules="attention")))
            for other in (base, attention_only(input_ids=ids).logits):
                assert (other - ours(input_ids=ids).logits).abs().max() > 1e-2
    peft_model = randomize_adapters(_peft_all_linear(name), seed=3).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = tiny_arch(name)
    load_adapter(loaded, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_merged_equals_unmerged_and_a_few_steps_lower_the_loss(name):
    model = tiny_arch(name)
    attach(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = lm_steps(model, ids, 6)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge(model)
        merged = model(input_ids=ids).logits
        unmerge(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, preset, expected", [
    ("phi3", "mlp", {"gate_up_proj", "down_proj"}),
    ("phi3", "attention", {"qkv_proj", "o_proj"}),
    ("gpt_neox", "attention", {"query_key_value", "dense"}),
    ("gpt_neox", "mlp", {"dense_h_to_4h", "dense_4h_to_h"}),
    ("gpt2", "attention", {"c_attn", "c_proj"}),
    ("opt", "attention", {"q_proj", "k_proj", "v_proj", "out_proj"}),
    ("opt", "mlp", {"fc1", "fc2"}),
])
def test_presets_know_fused_projections(name, preset, expected):
    chosen = find_targets(tiny_arch(name), LoraConfig(target_modules=preset))
    assert {n.split(".")[-1] for n in chosen} == expected
    assert len(chosen) == 2 * len(expected)  # in both layers


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_nf4_trains(name):
    """--quantize nf4: every Linear but the head, and fused MoE experts, in 4 bits; LoRA over it learns."""
    from loraforge.core.quant import quantize_model, weight_bytes

    model = tiny_arch(name)
    before = weight_bytes(model)
    quantize_model(model, "nf4")
    assert not [n for n, p in model.named_parameters() if p.dim() == 3 and p.is_floating_point()]  # experts too
    assert weight_bytes(model) < 0.6 * before
    attach(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = lm_steps(model, ids, 6)
    assert losses[-1] < losses[0]
