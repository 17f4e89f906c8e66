"""LoRA on MoE experts fused into 3-D parameters and on routers (core.layers.LoraParameter), checked
against PEFT's ParamWrapper (the oracle) and against plain runs of the same model."""
from __future__ import annotations

import warnings

import pytest
import torch
from factory import randomize_adapters, tiny_arch

from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.core.io import load_adapter, save_adapter
from loraforge.core.layers import LoraParameter
from loraforge.core.ops import (attach, combine, delete_adapter, disabled, find_parameter_targets, lora_layers, merge,
                                merge_and_unload, mixed_batch, parameter_report, set_adapter, unmerge)

warnings.filterwarnings("ignore", message=".*kernels.*")
IDS = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def experts_layers(model, parameter: str) -> list[LoraParameter]:
    return [layer for _, layer in lora_layers(model)
            if isinstance(layer, LoraParameter) and layer.parameter_name == parameter]


def test_each_expert_gets_its_own_update_of_its_slice():
    """PEFT's layout: lora_A rows e*r .. e*r+r-1 and lora_B columns j*E + e belong to expert e."""
    model = attach(tiny_arch("mixtral"), LoraConfig(r=2, alpha=6, target_parameters=["down_proj"]))
    layer = experts_layers(model, "down_proj")[0]
    E, r = layer.num_experts, 2
    gen = torch.Generator().manual_seed(0)
    A = torch.zeros(E * r, layer.in_features)
    A[2 * r:3 * r] = torch.randn(r, layer.in_features, generator=gen)  # only expert 2 has an A
    B = torch.randn(layer.out_features, E * r, generator=gen)
    layer.set_factors("default", A, B)
    delta = layer.delta_weight("default")  # (E, hidden, inter): the layout of experts.down_proj
    assert delta.shape == layer.weight.shape
    expected = B[:, [j * E + 2 for j in range(r)]] @ A[2 * r:3 * r] * 3.0
    torch.testing.assert_close(delta[2], expected)
    assert all(delta[e].abs().max() == 0 for e in range(E) if e != 2)


def test_forward_is_the_model_with_each_expert_slice_updated():
    """The adapted model computes what the plain model computes with W[e] + B_e A_e s in place."""
    model = randomize_adapters(attach(tiny_arch("qwen3_moe"), LoraConfig(r=4, alpha=8)))
    plain = tiny_arch("qwen3_moe")
    weights = dict(plain.named_parameters())
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if isinstance(layer, LoraParameter):
                owner = path.split(".base_layer")[0]
                weights[f"{owner}.{layer.parameter_name}"].add_(layer.delta_weight("default"))
            else:
                weights[f"{path}.weight"].add_(layer.delta_weight("default"))
    torch.testing.assert_close(logits(model), logits(plain), atol=1e-5, rtol=1e-4)


def test_merge_unmerge_disable_and_merge_and_unload():
    model = randomize_adapters(attach(tiny_arch("mixtral"), LoraConfig(r=4, alpha=8)))
    base_weights = {n: p.detach().clone() for n, p in tiny_arch("mixtral").named_parameters()}
    base, adapted = logits(tiny_arch("mixtral")), logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-4)
    with disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=1e-5)
    unmerge(model)
    layer = experts_layers(model, "gate_up_proj")[0]
    torch.testing.assert_close(layer.weight, base_weights["model.layers.0.mlp.experts.gate_up_proj"], atol=1e-6,
                               rtol=0)
    merge_and_unload(model)
    assert not any(isinstance(m, LoraParameter) for m in model.modules())
    assert set(dict(model.named_parameters())) == set(base_weights)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-4)


def test_mixed_batch_rows_equal_each_row_with_its_adapter():
    model = attach(tiny_arch("mixtral"), LoraConfig(r=4, alpha=8), "a")
    attach(model, LoraConfig(r=2, alpha=4), "b")
    randomize_adapters(model, seed=5)
    with mixed_batch(model, ["a", "b", None]):
        mixed = logits(model)
    set_adapter(model, "a")
    alone_a = logits(model, IDS[:1])
    set_adapter(model, "b")
    alone_b = logits(model, IDS[1:2])
    with disabled(model):
        alone_base = logits(model, IDS[2:])
    torch.testing.assert_close(mixed, torch.cat([alone_a, alone_b, alone_base]), atol=1e-5, rtol=1e-4)
    assert (alone_a - logits(model, IDS[:1])).abs().max() > 1e-3  # the two adapters differ


def test_only_expert_parameters_train_and_the_loss_falls():
    from factory import lm_steps

    model = attach(tiny_arch("qwen3_moe"), LoraConfig(r=4, alpha=8, target_modules=[],
                                                       target_parameters=["experts.gate_up_proj",
                                                                          "experts.down_proj"]))
    assert set(parameter_report(model)["per_type"]) == {"gate_up_proj", "down_proj"}
    assert experts_layers(model, "gate_up_proj")[0].r["default"] == 4  # explicit: r, as in PEFT
    losses = lm_steps(model, IDS, 5)
    assert losses[-1] < losses[0]


def test_mlp_preset_and_projection_names_select_the_experts_like_peft():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    ours = attach(tiny_arch("mixtral"), LoraConfig(r=4, alpha=8, target_modules="mlp"))
    theirs = get_peft_model(tiny_arch("mixtral"), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["w1", "w2", "w3"]))
    assert set(parameter_report(ours)["per_type"]) == {"gate_up_proj", "down_proj"}  # no router, no attention
    assert parameter_report(ours)["trainable_params"] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    chosen = find_parameter_targets(tiny_arch("qwen3_moe"), LoraConfig(r=4, target_modules=["down_proj"]))
    assert sorted(chosen) == [f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)]


def test_qwen2_moe_experts_by_explicit_target_parameters_round_trip_with_peft(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    params = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]
    ours = randomize_adapters(attach(tiny_arch("qwen2_moe"), LoraConfig(r=4, alpha=8, target_modules=["q_proj"],
                                                                       target_parameters=params)))
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_arch("qwen2_moe"), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-4)
    peft_model = get_peft_model(tiny_arch("qwen2_moe"), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                        target_parameters=params))
    randomize_adapters(peft_model, seed=4).eval().save_pretrained(tmp_path / "peft")
    loaded = tiny_arch("qwen2_moe")
    load_adapter(loaded, tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(peft_model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config, message", [
    (LoraConfig(r=4, dropout=0.1), "dropout is not supported on parameter targets"),
    (LoraConfig(r=4, use_dora=True), "DoRA is not supported on parameter targets"),
    (LoraConfig(r=4, init="pissa", target_modules=[], target_parameters=["down_proj"]), "PiSSA"),
])
def test_what_peft_refuses_on_parameters_is_refused_in_one_line(config, message):
    model = tiny_arch("mixtral")
    with pytest.raises(LoraError, match=message) as err:
        attach(model, config)
    assert "\n" not in str(err.value)
    assert not list(lora_layers(model))  # nothing was changed


def test_a_second_adapter_must_target_the_same_expert_parameters():
    model = attach(tiny_arch("mixtral"), LoraConfig(r=4))
    with pytest.raises(LoraError, match="already has LoRA on down_proj, gate_up_proj"):
        attach(model, LoraConfig(r=4, target_modules=[], target_parameters=["down_proj"]), "other")
    attach(model, LoraConfig(r=2, target_modules="attention"), "attention")  # no expert parameter: fine
    delete_adapter(model, "default")
    assert all("default" not in layer.r for _, layer in lora_layers(model))


def test_combine_refuses_expert_adapters():
    model = attach(tiny_arch("mixtral"), LoraConfig(r=4), "a")
    attach(model, LoraConfig(r=4), "b")
    with pytest.raises(LoraError, match="combine: LoRA on the parameter .*experts"):
        combine(model, ["a", "b"], [1.0, 1.0], "ab")


def test_loading_expert_weights_that_do_not_fit_names_module_and_shapes(tmp_path):
    import json

    save_adapter(attach(tiny_arch("mixtral"), LoraConfig(r=4)), tmp_path / "a")
    qwen = tiny_arch("qwen3_moe")  # same module paths, other expert shapes
    with pytest.raises(LoraError, match=r"experts.base_layer \(LoRA on .*gate_up_proj, shape \(4, 64, 64\)\)"):
        load_adapter(qwen, tmp_path / "a")
    assert not list(lora_layers(qwen))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_parameters"] = ["down_proj", "gate.weight"]  # one expert parameter too few
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraError, match="stores LoRA weights for 2 parameter.s. of model.layers.0.mlp.experts, but "
                                        "its target_parameters select 1"):
        load_adapter(tiny_arch("mixtral"), tmp_path / "a")


def test_target_parameters_that_match_nothing_are_an_error():
    with pytest.raises(LoraError, match="match no adaptable module"):
        attach(tiny_arch("llama"), LoraConfig(target_modules=[], target_parameters=["experts.down_proj"]))
    with pytest.raises(LoraError, match="target_parameters must be a string or a list of strings"):
        LoraConfig(target_parameters=[3])


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_lora_over_nf4_experts_equals_peft_over_their_dequantized_weights(name, tmp_path):
    from peft import PeftModel

    from loraforge.core.quant import QuantizedParams, dequantize_model, quantize_model, weight_bytes

    float_bytes = weight_bytes(tiny_arch(name))
    quantized = quantize_model(tiny_arch(name), "nf4")
    experts = [m for m in quantized.modules() if isinstance(m, QuantizedParams)]
    assert len(experts) == 2 and weight_bytes(quantized) < 0.35 * float_bytes
    randomize_adapters(attach(quantized, LoraConfig(r=4, alpha=8)))
    save_adapter(quantized, tmp_path / "a")
    dequantized = dequantize_model(quantize_model(tiny_arch(name), "nf4"))  # plain float modules again
    assert not any(isinstance(m, QuantizedParams) for m in dequantized.modules())
    oracle = PeftModel.from_pretrained(dequantized, tmp_path / "a").eval()
    torch.testing.assert_close(logits(quantized), logits(oracle), atol=1e-5, rtol=1e-4)
    float_model = tiny_arch(name)  # the quantization error is real, and small
    load_adapter(float_model, tmp_path / "a")
    assert 0 < (logits(float_model) - logits(quantized)).abs().max() < 0.5


# --- tools: merge, inspect, export ------------------------------------------------------------------
def moe_dir(tmp_path, arch: str = "mixtral"):
    """tiny_arch(arch) saved as a model directory with a word-level tokenizer over its 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path / arch
    tiny_arch(arch).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0").save_pretrained(out)
    return out


def moe_adapter(tmp_path, arch: str = "mixtral", **config):
    path = tmp_path / f"{arch}-adapter"
    save_adapter(randomize_adapters(attach(tiny_arch(arch), LoraConfig(r=4, alpha=8, **config))), path)
    return path


def test_merge_tool_folds_expert_adapters_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    from loraforge.tools.merge import merged_model, write_model_dir

    base, adapter = moe_dir(tmp_path), moe_adapter(tmp_path)
    unmerged = tiny_arch("mixtral")
    load_adapter(unmerged, adapter)
    merged, tokenizer, report = merged_model(str(base), adapter)
    assert not any(isinstance(m, LoraParameter) for m in merged.modules())
    torch.testing.assert_close(logits(merged), logits(unmerged), atol=1e-5, rtol=1e-4)
    assert report["kl"] < 1e-8
    written = AutoModelForCausalLM.from_pretrained(write_model_dir(merged, tokenizer, tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(written), logits(unmerged), atol=1e-5, rtol=1e-4)
    assert (logits(written) - logits(tiny_arch("mixtral"))).abs().max() > 1e-2  # the experts' update is in it


def test_inspect_lists_each_expert_s_update(tmp_path):
    from loraforge.tools.inspect import format_report, inspect_adapter

    adapter = moe_adapter(tmp_path)
    model = tiny_arch("mixtral")
    load_adapter(model, adapter)
    report = inspect_adapter(adapter, tiny_arch("mixtral"))
    rows = {r["module"]: r for r in report["modules"]}
    for layer in experts_layers(model, "gate_up_proj")[:1] + experts_layers(model, "down_proj")[:1]:
        for e in range(layer.num_experts):
            row = rows[f"model.layers.0.mlp.experts.{layer.parameter_name}[{e}]"]
            assert row["norm"] == pytest.approx(float(layer.delta_weight("default")[e].norm()), rel=1e-5)
            assert row["rank"] == layer.r["default"] and row["type"] == f"mlp.experts.{layer.parameter_name}"
            assert row["relative"] == pytest.approx(row["norm"] / float(layer.weight[e].norm()), rel=1e-5)
    assert rows["model.layers.1.mlp.gate"]["shape"] == [4, 64]  # the router: (experts x hidden)
    assert "mlp.experts.gate_up_proj" in format_report(report)
    with pytest.raises(LoraError, match="adapts MoE expert / router parameters .*pass --model") as err:
        inspect_adapter(adapter)
    assert "\n" not in str(err.value)


def test_gguf_export_refuses_moe_models_and_parameter_adapters_in_one_line(tmp_path):
    from loraforge.tools.export import export_gguf

    base, adapter = moe_dir(tmp_path), moe_adapter(tmp_path)
    for merged in (False, True):
        with pytest.raises(LoraError, match=r"'mixtral' \(MoE experts have no GGUF writer here yet\)") as err:
            export_gguf(tmp_path / f"out{merged}.gguf", str(base), adapter, merged=merged)
        assert "\n" not in str(err.value)
    dense = tmp_path / "qwen2"
    tiny_arch("qwen2").save_pretrained(dense)
    params = moe_adapter(tmp_path, "qwen2", target_modules=[], target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(LoraError, match="adapts parameters no Linear owns .*export --merged instead"):
        export_gguf(tmp_path / "p.gguf", str(dense), params)
    assert not list(tmp_path.glob("*.gguf"))


def test_estimate_counts_expert_parameters_and_resize_refuses_them(tmp_path):
    from loraforge.tools.estimate import estimate
    from loraforge.tools.resize import resize_adapter

    tiny_arch("qwen3_moe").save_pretrained(tmp_path / "qwen3_moe")
    for targets in ("all-linear", "mlp"):
        planned = estimate(str(tmp_path / "qwen3_moe"), rank=4, targets=targets)
        report = parameter_report(attach(tiny_arch("qwen3_moe"), LoraConfig(r=4, target_modules=targets)))
        assert (planned["trainable_params"], planned["per_type"]) == (report["trainable_params"], report["per_type"])
    with pytest.raises(LoraError, match="adapts MoE expert / router parameters .*Linear, Conv1D and Embedding"):
        resize_adapter(moe_adapter(tmp_path), tmp_path / "resized", rank=2)


class TransposedExperts(torch.nn.Module):
    """Experts stored (experts, in, out), as gpt-oss marks with `is_transposed`: y = x @ W[e]."""

    is_transposed = True

    def __init__(self, experts: int = 3, hidden: int = 8, out: int = 6):
        super().__init__()
        weight = torch.randn(experts, hidden, out, generator=torch.Generator().manual_seed(0))
        self.down_proj = torch.nn.Parameter(weight)

    def forward(self, x, expert_index):  # x (tokens, in), expert_index (tokens,)
        return torch.einsum("ti,tio->to", x, self.down_proj[expert_index])


class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = TransposedExperts()

    def forward(self, x, expert_index):
        return self.experts(x, expert_index)


def test_transposed_experts_match_peft():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([0, 2, 1, 2, 0])
    theirs = get_peft_model(Holder(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                     target_parameters=["experts.down_proj"]))
    randomize_adapters(theirs, seed=2)
    ours = attach(Holder(), LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=["experts.down_proj"]))
    layer = experts_layers(ours, "down_proj")[0]
    assert (layer.in_features, layer.out_features) == (8, 6)
    peft_layer = theirs.base_model.model.experts
    layer.set_factors("default", peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, index), theirs(x, index))
        torch.testing.assert_close(layer.delta_weight("default"), peft_layer.get_delta_weight("default"))
        assert (ours(x, index) - Holder()(x, index)).abs().max() > 1e-3


def test_quantize_says_what_it_did_with_the_experts(caplog):
    from loraforge.core.quant import describe, quantize_model

    nf4 = quantize_model(tiny_arch("mixtral"), "nf4")
    assert "4 fused MoE expert parameters in nf4 768.0 KiB -> 103.3 KiB" in describe(nf4)
    with caplog.at_level("WARNING", logger="loraforge.core.quant"):
        int8 = quantize_model(tiny_arch("mixtral"), "int8")
    assert "int8 keeps the fused MoE experts (3-D parameters) in float" in caplog.text
    assert [n for n, p in int8.named_parameters() if p.dim() == 3]  # still float, as said
