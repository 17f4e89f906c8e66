"""Whole-model operations on tiny Llama / GPT-2 models: attach, targets, freezing and training,
merge / unmerge / merge_and_unload / unload, disabled(), several adapters, mixed_batch, combine,
parameter_report, and the one-line errors."""
import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from factory import tiny_gpt2, tiny_llama, logits, randomize_adapters
from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.core.layers import LoraConv1D, LoraEmbedding, LoraLayer, LoraLinear
from loraforge.core.ops import (ModulesToSave, adapter_params, attach, combine, delete_adapter, disabled,
                             find_targets, lora_layers, merge, merge_and_unload, mixed_batch,
                             parameter_report, set_adapter, set_trainable, unload, unmerge)

QV = ["q_proj", "v_proj"]
# (model, LoraConfig kwargs): the table every whole-model property runs over
CASES = {
    "plain": ("llama", {"r": 4, "alpha": 8, "target_modules": QV}),
    "rslora": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "use_rslora": True}),
    "dora": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "use_dora": True}),
    "gaussian": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "init": "gaussian"}),
    "pissa": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "init": "pissa"}),
    "dropout": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "dropout": 0.2}),
    "embedding": ("llama", {"r": 4, "alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "all-linear": ("llama", {"r": 2, "alpha": 4, "target_modules": "all-linear"}),
    "gpt2-conv1d": ("gpt2", {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj"]}),
    "gpt2-dora": ("gpt2", {"r": 4, "alpha": 8, "target_modules": ["c_attn"], "use_dora": True}),
    "patterns": ("llama", {"r": 4, "alpha": 8, "target_modules": QV + ["down_proj"],
                           "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                           "alpha_pattern": {"q_proj": 3.0}}),
    "modules_to_save": ("llama", {"r": 4, "alpha": 8, "target_modules": QV, "modules_to_save": ["lm_head"]}),
}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def adapted(case: str, randomize: bool = True):
    kind, kwargs = CASES[case]
    model = attach(BUILD[kind](), LoraConfig(**kwargs))
    return randomize_adapters(model) if randomize else model


def loraforge_modules(model):
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", CASES)
def test_zero_update_at_init(case, ids):
    kind, _ = CASES[case]
    model = adapted(case, randomize=False)
    base = logits(BUILD[kind](), ids)
    if case == "pissa":  # the base weights hold the residual: equal within float tolerance
        torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=1e-4)
    else:
        assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("case", CASES)
def test_only_adapter_params_train(case, ids):
    model = adapted(case, randomize=False)
    model.train()
    ours = {id(p) for p in adapter_params(model).values()}
    assert ours and all(p.requires_grad == (id(p) in ours) for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        optimizer.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"base parameter {n} changed"
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_merge_and_unload(case, ids):
    kind, _ = CASES[case]
    model = adapted(case)
    before = weights(model)
    unmerged = logits(model, ids)
    merge(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for key, value in weights(model).items():
        torch.testing.assert_close(value, before[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    plain = merge_and_unload(model)
    assert type(plain) is {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[kind]
    assert loraforge_modules(plain) == []
    assert not hasattr(plain, "lora_configs") and not hasattr(plain, "lora_initial_factors")
    assert not any("lora_" in k or "base_layer" in k or "modules_to_save" in k for k in plain.state_dict())
    assert set(plain.state_dict()) == set(BUILD[kind]().state_dict())
    torch.testing.assert_close(logits(plain, ids), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c != "pissa"])
@pytest.mark.parametrize("merged", [False, True])
def test_disabled_is_base(case, merged, ids):
    kind, _ = CASES[case]
    model = adapted(case)
    adapted_out = logits(model, ids)
    if merged:
        merge(model)
    with disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(BUILD[kind](), ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids), adapted_out, atol=1e-5, rtol=1e-5)
    assert all(layer.merged == merged for _, layer in lora_layers(model))  # state restored on exit


def test_pissa_disabled_is_residual_base(ids):
    model = adapted("pissa")
    with disabled(model):
        residual = logits(model, ids)
    assert not torch.allclose(residual, logits(tiny_llama(), ids), atol=1e-3)


def test_wrapper_types_and_targets(llama, gpt2):
    attach(llama, LoraConfig(target_modules=["embed_tokens", "q_proj"], r=2))
    layers = dict(lora_layers(llama))
    assert isinstance(layers["model.embed_tokens"], LoraEmbedding)
    assert type(layers["model.layers.0.self_attn.q_proj"]) is LoraLinear
    attach(gpt2, LoraConfig(target_modules="all-linear", r=2))
    names = {n for n, _ in lora_layers(gpt2)}
    assert all(isinstance(m, LoraConv1D) for _, m in lora_layers(gpt2))
    assert names == {f"transformer.h.{i}.{p}" for i in range(2)
                     for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_find_targets_all_linear_skips_head_and_embeddings(llama):
    names = set(find_targets(llama, LoraConfig(target_modules="all-linear")))
    assert "lm_head" not in names and "model.embed_tokens" not in names
    assert len(names) == 2 * 7
    excluded = set(find_targets(llama, LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"])))
    assert names - excluded == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert set(find_targets(llama, LoraConfig(target_modules=r".*\.0\.self_attn\.[qk]_proj"))) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}


def test_scaling_on_model(llama):
    attach(llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_rslora=True,
                             rank_pattern={r"layers\.1\.self_attn\.q_proj": 16}))
    layers = dict(lora_layers(llama))
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == pytest.approx(8 / 2)
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == pytest.approx(8 / 4)
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 16


def test_several_adapters_and_set_adapter(ids):
    model = tiny_llama()
    attach(model, LoraConfig(r=4, target_modules=QV), "a")
    attach(model, LoraConfig(r=2, target_modules=["up_proj", "embed_tokens"]), "b")
    randomize_adapters(model)
    outs = {}
    for name in ("a", "b"):
        set_adapter(model, name)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in adapter_params(model, name).values()} != set()
        assert all(f".{name}." in n or n.endswith(f".{name}") for n in adapter_params(model))
        outs[name] = logits(model, ids)
    assert not torch.allclose(outs["a"], outs["b"])
    set_adapter(model, "a")
    assert torch.equal(logits(model, ids), outs["a"])
    # switching away from a merged adapter unmerges it first
    merge(model)
    set_adapter(model, "b")
    torch.testing.assert_close(logits(model, ids), outs["b"], atol=1e-5, rtol=1e-5)
    # two active adapters: both updates apply
    set_adapter(model, ["a", "b"])
    base = logits(tiny_llama(), ids)
    both = logits(model, ids)
    assert not torch.allclose(both, outs["a"]) and not torch.allclose(both, base)


def test_delete_adapter(ids, tmp_path):
    from loraforge.core.io import save_adapter

    model = tiny_llama()
    attach(model, LoraConfig(r=4, target_modules=QV, modules_to_save=["lm_head"]), "a")
    attach(model, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"), "b")
    randomize_adapters(model)
    save_adapter(model, tmp_path, name="a")
    only_a = logits(_loaded(tmp_path), ids)
    set_adapter(model, "b")
    merge(model)
    delete_adapter(model, "b")  # merged PiSSA: unmerged, then its principal part goes back to the base
    assert "b" not in model.lora_configs and "b" not in getattr(model, "lora_initial_factors", {})
    assert not any(".b." in n or n.endswith(".b") for n, _ in model.named_parameters())
    set_adapter(model, "a")
    torch.testing.assert_close(logits(model, ids), only_a, atol=1e-5, rtol=1e-5)
    delete_adapter(model, "a")
    assert model.lora_configs == {} and adapter_params(model, ["a"]) == {}
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(LoraError, match="no adapter named 'a'; this model has: none"):
        delete_adapter(model, "a")


def _loaded(path):
    from loraforge.core.io import load_adapter

    model = tiny_llama()
    load_adapter(model, path)
    return model


def test_unload_restores_pissa_base(ids):
    model = adapted("pissa")
    plain = unload(model)
    torch.testing.assert_close(logits(plain, ids), logits(tiny_llama(), ids), atol=1e-5, rtol=1e-5)


def test_unload_restores_base(ids):
    model = adapted("modules_to_save")
    merge(model)
    plain = unload(model)
    assert loraforge_modules(plain) == [] and not hasattr(plain, "lora_configs")
    torch.testing.assert_close(logits(plain, ids), logits(tiny_llama(), ids), atol=1e-5, rtol=1e-5)


def test_merge_named_adapter_only():
    model = tiny_llama()
    attach(model, LoraConfig(r=4, target_modules=["q_proj"]), "a")
    attach(model, LoraConfig(r=2, target_modules=["v_proj"]), "b")
    randomize_adapters(model)
    set_adapter(model, "a")
    merge(model, ["b"])  # layers that lack "b" must not merge "a" instead
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].merged_adapters == []
    assert layers["model.layers.0.self_attn.v_proj"].merged_adapters == ["b"]


# --- mixed batches -----------------------------------------------------------------------------
def test_mixed_batch_equals_solo_runs():
    model = tiny_llama()
    attach(model, LoraConfig(r=4, target_modules=QV), "a")
    attach(model, LoraConfig(r=2, alpha=6, target_modules=["up_proj", "embed_tokens", "o_proj"]), "b")
    attach(model, LoraConfig(r=3, target_modules=["k_proj", "q_proj"], use_dora=True), "c")
    attach(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "d")
    randomize_adapters(model)
    rows = ["a", None, "b", "c", "a", "d"]
    ids = torch.randint(0, 128, (len(rows), 6), generator=torch.Generator().manual_seed(9))
    solo = {}
    for name in ("a", "b", "c", "d"):
        set_adapter(model, name)
        solo[name] = logits(model, ids)
    with disabled(model):
        solo[None] = logits(model, ids)
    with mixed_batch(model, rows):
        mixed = logits(model, ids)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], solo[name][i], atol=1e-5, rtol=1e-5)
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave)))


def test_mixed_batch_gpt2():
    model = tiny_gpt2()
    attach(model, LoraConfig(r=4, target_modules=["c_attn"]), "a")
    attach(model, LoraConfig(r=2, target_modules=["mlp.c_proj", "wte"]), "b")
    randomize_adapters(model)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    solo = {}
    for name in ("a", "b"):
        set_adapter(model, name)
        solo[name] = logits(model, ids)
    with mixed_batch(model, ["b", "a", None]):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[0], solo["b"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], solo["a"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], logits(tiny_gpt2(), ids)[2], atol=1e-5, rtol=1e-5)


def test_mixed_batch_errors(ids):
    model = adapted("plain")
    with pytest.raises(LoraError, match="no adapter named 'nope'; this model has: default"):
        with mixed_batch(model, ["default", "nope", None]):
            pass
    merge(model)
    with pytest.raises(LoraError, match="unmerge"):
        with mixed_batch(model, ["default", None, None]):
            logits(model, ids)
    assert all(m.row_adapters is None for _, m in lora_layers(model))


# --- combine -----------------------------------------------------------------------------------
def _two_adapters():
    model = tiny_llama()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=QV), "a")
    attach(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj", "embed_tokens"], use_rslora=True),
           "b")
    return randomize_adapters(model)


def _manual_sum(model, weights_by_name) -> nn.Module:
    """A fresh base with sum_i w_i dW_i added to each weight by hand."""
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for module_name, layer in lora_layers(model):
            for name, w in weights_by_name.items():
                if name in layer.r:
                    modules[module_name].weight += w * layer.delta_weight(name)
    return reference


def test_combine_cat_is_exact_weighted_sum(ids):
    model = _two_adapters()
    config = combine(model, ["a", "b"], [0.7, -1.3], "ab")
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 6
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.mlp.down_proj") == 2
    assert config.rank_for("model.embed_tokens") == 2
    reference = _manual_sum(model, {"a": 0.7, "b": -1.3})
    set_adapter(model, "ab")
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_combine_svd_full_rank_and_truncated(ids):
    model = _two_adapters()
    exact = logits(_manual_sum(model, {"a": 0.5, "b": 2.0}), ids)
    combine(model, ["a", "b"], [0.5, 2.0], "full", method="svd", rank=6)
    combine(model, ["a", "b"], [0.5, 2.0], "low", method="svd", rank=1)
    set_adapter(model, "full")
    torch.testing.assert_close(logits(model, ids), exact, atol=1e-4, rtol=1e-4)
    layers = dict(lora_layers(model))
    q = layers["model.layers.0.self_attn.q_proj"]
    target = 0.5 * q.delta_weight("a") + 2.0 * q.delta_weight("b")
    S = torch.linalg.svdvals(target)
    error = torch.linalg.matrix_norm(q.delta_weight("low") - target)
    torch.testing.assert_close(error, S[1:].square().sum().sqrt(), atol=1e-4, rtol=1e-3)
    set_adapter(model, "low")
    base = logits(tiny_llama(), ids)
    assert (logits(model, ids) - exact).norm() < (base - exact).norm()


def test_combine_cat_above_layer_rank_stays_exact(ids):
    model = tiny_llama()
    for name in ("a", "b"):  # k_proj is 32 x 64: 20 + 20 exceeds its rank
        attach(model, LoraConfig(r=20, alpha=20, target_modules=["k_proj"]), name)
    randomize_adapters(model)
    config = combine(model, ["a", "b"], [1.0, 0.5], "ab")
    assert config.r == 32
    set_adapter(model, "ab")
    torch.testing.assert_close(logits(model, ids), logits(_manual_sum(model, {"a": 1.0, "b": 0.5}), ids),
                               atol=1e-5, rtol=1e-5)


def test_modules_to_save_by_suffix(ids):
    model = attach(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    assert isinstance(model.model.embed_tokens, ModulesToSave)
    randomize_adapters(model)
    with mixed_batch(model, [None, "default", None]):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[1], logits(model, ids)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], logits(tiny_llama(), ids)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, needle", [
    ((["a", "b"], [1.0]), "2 adapters but 1 weights"),
    ((["a", "zz"], [1.0, 1.0]), "no adapter named 'zz'"),
    ((["a", "b"], [1.0, 1.0], "x", "svd"), "method must be 'cat', or 'svd' with a rank"),
    ((["a", "b"], [1.0, 1.0], "x", "mean"), "method must be"),
])
def test_combine_errors(args, needle):
    model = _two_adapters()
    name = args[2] if len(args) > 2 else "x"
    with pytest.raises(LoraError, match=needle.replace("(", r"\(")):
        combine(model, args[0], args[1], name, *args[3:])


def test_combine_refuses_dora():
    model = adapted("dora")
    attach(model, LoraConfig(r=2, target_modules=["q_proj"]), "other")
    with pytest.raises(LoraError, match="uses DoRA"):
        combine(model, ["default", "other"], [1, 1], "x")


# --- parameter report --------------------------------------------------------------------------
class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4096, 4096, bias=False, device="meta")


def test_parameter_report_4096_square_r8():
    model = attach(Big(), LoraConfig(r=8, target_modules=["q_proj"]))
    report = parameter_report(model)
    assert report["trainable_params"] == 65_536
    assert report["per_type"] == {"q_proj": 65_536}
    assert report["base_params"] == 4096 * 4096
    assert report["percent"] == pytest.approx(100 * 65_536 / 4096 ** 2)


def test_parameter_report_per_type_llama():
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=QV + ["embed_tokens"], modules_to_save=["lm_head"]))
    report = parameter_report(model)
    q = 4 * 64 + 64 * 4
    v = 4 * 64 + 32 * 4
    emb = 4 * 128 + 64 * 4
    head = 128 * 64
    assert report["per_type"] == {"q_proj": 2 * q, "v_proj": 2 * v, "embed_tokens": emb, "lm_head": head}
    assert report["trainable_params"] == 2 * q + 2 * v + emb + head
    assert report["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["base_params"] == sum(p.numel() for p in tiny_llama().parameters())


def test_set_trainable_freezes_other_adapters():
    model = tiny_llama()
    attach(model, LoraConfig(r=4, target_modules=QV), "a")
    attach(model, LoraConfig(r=4, target_modules=["k_proj"]), "b")
    set_trainable(model, ["a"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)


# --- errors --------------------------------------------------------------------------------------
def test_targets_matching_nothing_lists_modules(llama):
    with pytest.raises(LoraError) as info:
        attach(llama, LoraConfig(target_modules=["query"]))
    message = str(info.value)
    assert "\n" not in message and "match no adaptable module" in message
    for name in ("q_proj", "model.layers.0.self_attn.q_proj", "down_proj", "model.embed_tokens", "lm_head"):
        assert name in message


def test_rank_above_smaller_side_is_allowed_with_a_warning_as_in_peft(llama, ids, caplog):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with caplog.at_level("WARNING", logger="loraforge"):
        attach(llama, LoraConfig(r=40, target_modules=["k_proj", "q_proj"]))
    assert "r=40 exceeds the smaller side of model.layers.0.self_attn.k_proj (32 x 64) and 1 more" in caplog.text
    peft = get_peft_model(tiny_llama(), PeftLoraConfig(r=40, lora_alpha=16, target_modules=["k_proj", "q_proj"]))
    assert sum(p.numel() for p in peft.parameters() if p.requires_grad) == parameter_report(llama)["trainable_params"]
    with pytest.raises(LoraError, match="PiSSA takes r singular vectors"):
        attach(tiny_llama(), LoraConfig(r=40, target_modules=["k_proj"], init="pissa"))


def test_duplicate_and_bad_adapter_names(llama):
    attach(llama, LoraConfig(target_modules=["q_proj"]), "a")
    with pytest.raises(LoraError, match="already has an adapter named 'a'"):
        attach(llama, LoraConfig(target_modules=["v_proj"]), "a")
    with pytest.raises(LoraError, match="letters, digits"):
        attach(llama, LoraConfig(target_modules=["v_proj"]), "a.b")
    with pytest.raises(LoraError, match="no adapter named 'zz'; this model has: a"):
        set_adapter(llama, "zz")


@pytest.mark.parametrize("kwargs, needle", [
    ({"target_modules": ["q_proj"], "modules_to_save": ["classifier"]}, "modules_to_save names 'classifier'"),
    ({"target_modules": ["q_proj", "embed_tokens"], "use_dora": True}, "DoRA"),
    ({"target_modules": ["q_proj", "embed_tokens"], "init": "pissa"}, "PiSSA"),
])
def test_attach_errors_leave_model_untouched(llama, kwargs, needle):
    before = weights(llama)
    with pytest.raises(LoraError, match=needle):
        attach(llama, LoraConfig(**kwargs))
    assert loraforge_modules(llama) == [] and not getattr(llama, "lora_configs", {})
    after = weights(llama)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
