"""DPO and ORPO (train/preference.py) against TRL's own code, on one tiny model, adapter and batch:
the losses and their gradients w.r.t. the adapter agree within 1e-5. The DPO reference (the
adapter switched off) is the base model exactly. TRL's DPO loss runs through DPOTrainer's
``_compute_loss`` on a stand-in trainer (the attributes it reads), its fused LM head and a
separate reference model; ORPO through ORPOTrainer's ``get_batch_logps`` and ``odds_ratio_loss``."""
from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
from factory import randomize_adapters, tiny_llama, tiny_tokenizer

from loraforge import data as D
from loraforge.core.config import LoraConfig
from loraforge.core.ops import adapter_params, attach, disabled
from loraforge.data.pairs import encode_pairs, pair_rows, parse_pair
from loraforge.demo.tasks import make_pairs
from loraforge.train import preference as P

trl = pytest.importorskip("trl")
BETA = 0.1
TOL = 1e-5


def lora_model(seed: int = 0) -> torch.nn.Module:
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = attach(tiny_llama(seed, context=512, text=True), config)
    return randomize_adapters(model, seed=3, std=0.3)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    pairs = [parse_pair(row, f"pairs line {i}") for i, row in enumerate(make_pairs(3, seed=4), 1)]
    return encode_pairs(pairs, tiny_tokenizer(), max_len=256)[0]


@pytest.fixture(scope="module")
def batch(rows) -> dict[str, torch.Tensor]:
    return D.collate(pair_rows(rows), tiny_tokenizer().pad_token_id)  # (6, T), chosen rows first


def trl_inputs(batch: dict[str, torch.Tensor], rows: list[dict]) -> dict[str, torch.Tensor]:
    """The same rows as TRL's DPO collator gives them: right padded, a 2D mask, completion_mask."""
    lengths = torch.tensor([len(r["input_ids"]) for r in pair_rows(rows)])  # (2B,)
    attention = (torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]).long()  # (2B, T)
    return {"input_ids": batch["input_ids"], "attention_mask": attention,
            "completion_mask": (batch["labels"] != D.IGNORE_INDEX).long()}


def ours(method: str, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = lora_model()
    loss = P.batch_loss(model, batch, method, beta=BETA, orpo_lambda=BETA)
    return loss.detach(), list(torch.autograd.grad(loss, list(adapter_params(model).values())))


def assert_matches(mine, theirs, what: str) -> tuple[float, float]:
    """(|loss difference|, max |gradient difference|), both asserted <= 1e-5."""
    (loss, grads), (ref_loss, ref_grads) = mine, theirs
    worst = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
    assert abs(float(loss - ref_loss)) <= TOL, (what, float(loss), float(ref_loss))
    assert worst <= TOL, (what, worst)
    assert max(float(g.abs().max()) for g in grads) > 1e-3  # a gradient worth comparing
    return abs(float(loss - ref_loss)), worst


def test_dpo_loss_and_gradients_equal_trls(batch, rows):
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = lora_model(), tiny_llama(context=512, text=True)
    for model in (policy, reference):
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    policy.train()
    fake = types.SimpleNamespace(
        model=policy, ref_model=reference, beta=BETA, loss_types=["sigmoid"], loss_weights=[1.0],
        f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=False, use_weighting=False,
        aux_loss_enabled=False, label_smoothing=0.0, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                          unwrap_model=lambda m: m),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    loss = DPOTrainer._compute_loss(fake, policy, trl_inputs(batch, rows), return_outputs=False)
    theirs = loss.detach(), list(torch.autograd.grad(loss, list(adapter_params(policy).values())))
    diff, worst = assert_matches(ours("dpo", batch), theirs, "dpo")
    print(f"DPO: loss {float(loss.detach()):.6f}, |loss diff| {diff:.2e}, max |grad diff| {worst:.2e}")
    assert float(loss) != pytest.approx(0.6931, abs=1e-3)  # the adapter moved the policy off the reference


def test_orpo_loss_and_gradients_equal_trls(batch, rows):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model = lora_model()
    inputs = trl_inputs(batch, rows)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits  # (2B, T, V)
    fake = types.SimpleNamespace(beta=BETA, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)  # (2B,)
    chosen, rejected = logps.chunk(2)
    losses = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)[0]
    n = batch["input_ids"].shape[0] // 2  # TRL's NLL, over the chosen answer tokens (see preference.py)
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].flatten(0, 1), batch["labels"][:n, 1:].flatten())
    loss = nll - losses.mean()
    theirs = loss.detach(), list(torch.autograd.grad(loss, list(adapter_params(model).values())))
    diff, worst = assert_matches(ours("orpo", batch), theirs, "orpo")
    print(f"ORPO: loss {float(loss.detach()):.6f}, |loss diff| {diff:.2e}, max |grad diff| {worst:.2e}")


def test_the_adapter_off_reference_is_the_base_model_exactly(batch):
    model, base = lora_model(), tiny_llama(context=512, text=True)
    with torch.no_grad(), disabled(model):
        reference = P.sequence_logps(model, batch)[0]
    with torch.no_grad():
        fresh = P.sequence_logps(base, batch)[0]
        adapted = P.sequence_logps(model, batch)[0]
    assert torch.equal(reference, fresh)
    assert not torch.allclose(adapted, fresh)  # the adapter does change the policy


def test_sequence_logps_sum_what_the_sft_loss_averages(batch):
    from loraforge.eval.score import answer_loss_sum

    model = lora_model()
    with torch.no_grad():
        logps, n_tokens = P.sequence_logps(model, batch)
        torch.testing.assert_close(-logps.sum(), answer_loss_sum(model, batch), atol=1e-4, rtol=1e-6)
    assert n_tokens.tolist() == [D.n_trained(r) for r in batch["labels"].tolist()]


def test_dpo_loss_is_log_2_at_the_reference_and_falls_with_the_margin():
    zero = torch.zeros(2)
    loss, chosen, rejected = P.dpo_loss(zero, zero, zero, zero, BETA)
    torch.testing.assert_close(loss, torch.full((2,), 0.6931472))
    assert chosen.tolist() == rejected.tolist() == [0.0, 0.0]  # at the reference every reward is 0
    better = P.dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), BETA)
    assert float(better[0]) < 0.6931 and float(better[1] - better[2]) == pytest.approx(0.2)


def test_log1mexp_is_accurate_near_zero_and_far_from_it():
    """log(1 - e^x): near 0 the naive form cancels to -inf in float32; far below, log(-expm1) rounds to 0."""
    x = torch.tensor([-1e-8, -30.0])
    assert torch.log(1 - torch.exp(x))[0] == -torch.inf
    expected = torch.tensor([-18.420680748952, -9.357622968840175e-14], dtype=torch.float64)  # log(x - x^2/2), -e^x
    torch.testing.assert_close(P.log1mexp(x).double(), expected, rtol=1e-6, atol=0)
