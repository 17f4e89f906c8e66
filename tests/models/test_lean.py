"""Memory-lean training (models/lean.py) against autograd on the unmodified modules: the same loss
and gradients, fewer bytes saved for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factory import randomize_adapters, tiny_arch, tiny_llama

from loraforge import data as D
from loraforge.core.config import LoraConfig
from loraforge.core.ops import adapter_params, attach
from loraforge.eval.score import answer_loss_sum
from loraforge.models import lean


def lora_model(name: str = "llama", dtype=torch.float32):
    model = tiny_llama() if name == "llama" else tiny_arch(name)
    attach(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    model.to(dtype)
    for p in adapter_params(model).values():
        p.data = p.data.float()
    return model.train()


def batch(vocab: int = 128) -> dict:
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (20, 13, 9)]
    rows = D.pack([(s, s) for s in seqs], max_tokens=24)
    return D.collate(rows, pad_id=0)


def loss_and_grads(model, autocast: torch.dtype | None = None) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = answer_loss_sum(model, batch())
    (loss * 0.37).backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in adapter_params(model).items()}


def saved_bytes(model, autocast: torch.dtype | None = None) -> int:
    """Bytes of the activations autograd keeps for backward (weights excluded), inside the lean
    decoder layers' own saved-tensor hook too (what it keeps rather than replays)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def note(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    lean_pack = lean._pack
    lean._pack = lambda t: note(lean_pack(t))
    try:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                answer_loss_sum(model, batch())
    finally:
        lean._pack = lean_pack
    return sum(seen.values())


def count_replays(monkeypatch) -> tuple[list, list]:
    """Calls of the lean hook's unpack (a saved norm / SwiGLU output asked for in backward) and of
    its recomputation (once per output, however many layers saved it)."""
    unpacks, recomputes = [], []
    unpack, replay = lean._Replay.tensor, lean._Recipe.replay
    monkeypatch.setattr(lean._Replay, "tensor", lambda self: unpacks.append(self) or unpack(self))
    monkeypatch.setattr(lean._Recipe, "replay", lambda self: recomputes.append(self) or replay(self))
    return unpacks, recomputes


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_lean_norm_and_mlp_give_the_same_gradients_bit_for_bit(name, monkeypatch):
    monkeypatch.setattr(lean, "LOGIT_ELEMENTS", 1 << 40)  # the loss in one chunk: isolate the norm / MLP patch
    model = lora_model(name)
    plain_loss, plain = loss_and_grads(model)
    expected = 2 * 3 + 1 + (4 if name == "qwen3" else 0)  # two norms and an MLP per layer, the final norm, q/k norms
    assert lean.make_lean(model) == expected
    assert lean.make_lean(model) == 0  # idempotent
    unpacks, recomputes = count_replays(monkeypatch)
    lean_loss, lean_grads = loss_and_grads(model)
    # per layer the attention norm's output for q/k/v, the MLP norm's for gate/up, SwiGLU's for
    # down; less layer 0's q/k/v, whose norm reads the frozen embeddings (nothing to recompute)
    assert len(unpacks) == 2 * 6 - 3 and len(recomputes) == 2 * 3 - 1
    assert all(recipe.value is None for recipe in recomputes)  # each dropped after its last use
    assert lean_loss == plain_loss
    assert plain.keys() == lean_grads.keys()
    for key in plain:
        assert torch.equal(plain[key], lean_grads[key]), key
    lean.make_plain(model)
    assert loss_and_grads(model)[0] == plain_loss


def test_bf16_base_under_autocast(monkeypatch):
    model = lora_model(dtype=torch.bfloat16)
    monkeypatch.setattr(lean, "LOGIT_ELEMENTS", 1 << 40)
    monkeypatch.setattr(lean, "GQA_ON_CPU", False)  # SDPA's own GQA kernel rounds differently (next test)
    _, plain = loss_and_grads(model, torch.bfloat16)
    plain_bytes = saved_bytes(model, torch.bfloat16)
    lean.make_lean(model)
    _, lean_grads = loss_and_grads(model, torch.bfloat16)
    for key in plain:
        assert torch.equal(plain[key], lean_grads[key]), key
    assert saved_bytes(model, torch.bfloat16) < 0.7 * plain_bytes  # 0.65 measured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_gqa_on_cpu_keeps_only_the_key_value_heads(dtype, monkeypatch):
    """Grouped-query attention through SDPA's enable_gqa (the tiny Llama: 4 query heads, 2 key/value
    heads): the same gradients up to the kernel's rounding, and k / v are not copied per head."""
    import os

    monkeypatch.setattr(lean, "LOGIT_ELEMENTS", 1 << 40)
    monkeypatch.delenv(lean._FORCE_GQA, raising=False)
    autocast = dtype if dtype == torch.bfloat16 else None
    model = lora_model(dtype=dtype)
    _, plain = loss_and_grads(model, autocast)
    lean.make_lean(model)
    monkeypatch.setattr(lean, "GQA_ON_CPU", False)
    _, repeated = loss_and_grads(model, autocast)
    repeated_bytes = saved_bytes(model, autocast)
    monkeypatch.setattr(lean, "GQA_ON_CPU", True)
    _, grouped = loss_and_grads(model, autocast)
    assert saved_bytes(model, autocast) < repeated_bytes
    assert lean._FORCE_GQA not in os.environ  # set for each layer's forward only
    for key in plain:
        assert torch.equal(plain[key], repeated[key]), key
        err = (grouped[key] - plain[key]).norm() / plain[key].norm()
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), (key, float(err))


def plain_loss_sum(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def test_chunked_loss_equals_the_full_logits(monkeypatch):
    from loraforge.eval import score

    model = lora_model()
    with monkeypatch.context() as patch:
        patch.setattr(score, "linear_cross_entropy_sum", plain_loss_sum)
        whole_loss, whole = loss_and_grads(model)
        whole_bytes = saved_bytes(model)
    monkeypatch.setattr(lean, "LOGIT_ELEMENTS", 5 * 128)  # five rows of a 128-token vocabulary per chunk
    chunk_loss, chunked = loss_and_grads(model)
    assert chunk_loss == pytest.approx(whole_loss, rel=1e-6)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-5, atol=1e-5, msg=key)  # float32 rounding
    assert saved_bytes(model) < whole_bytes
    with torch.no_grad():  # evaluation: chunked too, same value
        assert float(answer_loss_sum(model, batch())) == pytest.approx(whole_loss, rel=1e-6)


def test_chunked_loss_against_plain_cross_entropy_in_bf16(monkeypatch):
    """The lean loss through a bf16 head under autocast: equal value, gradients within bf16 rounding."""
    monkeypatch.setattr(lean, "LOGIT_ELEMENTS", 7 * 64)
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(32, 64, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(30, 32, generator=gen).requires_grad_()
    targets = torch.randint(0, 64, (30,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        ours = lean.linear_cross_entropy_sum(hidden, head, targets)
    assert float(ours) == pytest.approx(float(plain), rel=1e-6)
    g_plain, = torch.autograd.grad(plain * 0.5, hidden)
    g_ours, = torch.autograd.grad(ours * 0.5, hidden)
    torch.testing.assert_close(g_ours, g_plain, rtol=2e-2, atol=2e-3)


def test_other_heads_take_the_plain_path():
    """A head with trainable weights (or a LoRA-wrapped one) is not fused: its gradient flows."""
    head = torch.nn.Linear(8, 16)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 16, (5,))
    loss = lean.linear_cross_entropy_sum(hidden, head, targets)
    loss.backward()
    assert head.weight.grad is not None
    torch.testing.assert_close(loss, F.cross_entropy(head(hidden).float(), targets, reduction="sum"))


def test_unknown_architectures_are_left_alone():
    model = lora_model("gemma2")  # (1 + weight) RMSNorm, GELU MLP: not Llama's formulas
    assert lean.make_lean(model) == 0


def test_lean_survives_train_and_eval_of_a_loaded_model(tmp_path):
    """transformers 5 loads models with hub kernels on and swaps them in and out of RMSNorm on every
    train()/eval(); make_lean turns that off, or the plain forward (float32 copies kept for backward)
    would silently come back in `loraforge train`, which loads with from_pretrained."""
    from factory import save_tiny_llama
    from loraforge.models import load_model

    model = load_model(str(save_tiny_llama(tmp_path / "base")), dtype="float32")
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert lean.make_lean(model) > len(norms) > 0
    for switch in (model.train, model.eval, model.train):
        switch()
        assert all(m.forward.__func__ is lean._lean_norm_forward for m in norms)


def test_a_forward_without_backward_leaves_nothing_behind():
    """A forward under autograd that never reaches backward (an error between the two, a caller
    that forgot no_grad) frees its activations: the hook keeps no tensor that holds its own
    graph node (a cycle through C++ that the garbage collector cannot break)."""
    import gc

    model = lora_model()
    lean.make_lean(model)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    loss_and_grads(model)  # warm-up: every lazily made buffer exists
    before = live_tensors()
    for _ in range(3):
        loss = answer_loss_sum(model, batch())
        del loss
    assert live_tensors() == before
    loss_and_grads(model)  # and backward still works after


def test_chunked_loss_of_non_finite_hidden_states_is_not_finite():
    """A NaN or infinite hidden state must give a non-finite loss (the trainer stops on it)."""
    head = torch.nn.Linear(8, 16, bias=False).requires_grad_(False)
    targets = torch.tensor([3, 5])
    for bad in (float("nan"), float("inf")):
        hidden = torch.randn(2, 8)
        hidden[1, 2] = bad
        hidden.requires_grad_()
        assert not torch.isfinite(lean.linear_cross_entropy_sum(hidden, head, targets))
        with torch.no_grad():
            assert not torch.isfinite(lean.linear_cross_entropy_sum(hidden, head, targets))
