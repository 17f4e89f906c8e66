"""Preference tuning: the DPO and ORPO objectives over (chosen, rejected) pairs.

One forward pass runs the 2B rows of B pairs (the chosen rows, then the rejected ones, padded
to one length). Log-probabilities are taken over answer tokens only (labels are -100 on the
prompt), with the output head run only there, as in ``eval.score.answer_loss_sum``.

- DPO (Rafailov et al. 2023): sequence log-probs summed over the answer; the reference is the
  same model with the adapter switched off (``core.ops.disabled``), under no_grad: no copy.
- ORPO (Hong et al. 2024): no reference; the NLL of the chosen answer plus lambda times the
  odds-ratio term over per-token average log-probs. Follows TRL's ORPOTrainer (``beta`` there is
  lambda here) except that the NLL covers the chosen *answer* tokens, as the paper's L_SFT and
  this project's SFT do; TRL 1.16 also counts the prompt tokens in it.

Losses are means over the pairs of the whole optimizer step (ORPO's NLL a mean over the chosen
answer tokens of the step), so gradient accumulation and data parallel give one big batch's update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge import data as D
from loraforge.core.ops import disabled
from loraforge.data.pairs import pair_rows
from loraforge.eval.score import answer_logits
from loraforge.train import distributed as dist
from loraforge.train.loop import Context, to_device


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(answer | prompt) summed over each row's answer tokens (N,), answer tokens per row (N,))."""
    logits, targets, where = answer_logits(model, batch)  # (n, vocab), (n,), (N, T-1)
    token_logps = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]  # (n,)
    rows = where.nonzero()[:, 0]  # (n,) the row of each answer token, in the same row-major order
    sums = torch.zeros(where.shape[0], dtype=token_logps.dtype, device=where.device).index_add(0, rows, token_logps)
    return sums, where.sum(1)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward), each (B,)."""
    chosen, rejected = pi_c - ref_c, pi_r - ref_r  # log pi/pi_ref of each answer
    loss = -F.logsigmoid(beta * (chosen - rejected))  # Rafailov et al. 2023, eq. 7
    return loss, (beta * chosen).detach(), (beta * rejected).detach()  # implicit rewards, eq. 5


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -log 2; Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(mean_c: torch.Tensor, mean_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair -log sigmoid(log odds ratio), log odds ratio), each (B,), from per-token mean log-probs."""
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))  # Hong et al. 2024, eq. 4 and 7
    return -F.logsigmoid(log_odds), log_odds.detach()


@dataclass
class PairTerms:
    """One batch of B pairs: what the loss sums and what metrics.jsonl reports."""

    pair_loss: torch.Tensor  # (B,) the preference term of each pair (ORPO: already times lambda)
    nll_sum: torch.Tensor  # () ORPO: summed NLL over the chosen answer tokens; 0 for DPO
    chosen_tokens: int  # answer tokens of the chosen rows
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,)
    logps_chosen: torch.Tensor  # (B,) DPO: summed; ORPO: per-token mean (what each loss uses)
    logps_rejected: torch.Tensor  # (B,)

    def loss(self, n_pairs: int, n_chosen_tokens: int) -> torch.Tensor:
        """This batch's share of the step loss: means over the step's pairs and chosen tokens."""
        return self.pair_loss.sum() / max(n_pairs, 1) + self.nll_sum / max(n_chosen_tokens, 1)


def pair_terms(model, batch: dict[str, torch.Tensor], method: str, beta: float, orpo_lambda: float) -> PairTerms:
    """The loss terms of a collated batch of 2B rows (``pairs.pair_rows`` order)."""
    logps, n_tokens = sequence_logps(model, batch)  # (2B,), (2B,)
    pi_c, pi_r = logps.chunk(2)
    n_c, n_r = n_tokens.chunk(2)
    if method == "dpo":
        with torch.no_grad(), disabled(model):  # the reference: the base model's outputs, exactly
            ref_c, ref_r = sequence_logps(model, batch)[0].chunk(2)
        loss, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
        return PairTerms(loss, logps.new_zeros(()), int(n_c.sum()), chosen, rejected, pi_c.detach(), pi_r.detach())
    mean_c, mean_r = pi_c / n_c, pi_r / n_r
    ratio_loss, _ = odds_ratio_loss(mean_c, mean_r)
    return PairTerms(orpo_lambda * ratio_loss, -pi_c.sum(), int(n_c.sum()),  # Hong et al. 2024, eq. 6
                     (orpo_lambda * mean_c).detach(), (orpo_lambda * mean_r).detach(),
                     mean_c.detach(), mean_r.detach())


def batch_loss(model, batch, method: str, beta: float = 0.1, orpo_lambda: float = 0.1) -> torch.Tensor:
    """The loss of one batch on its own (TRL's per-batch loss): the mean over its pairs."""
    terms = pair_terms(model, batch, method, beta, orpo_lambda)
    return terms.loss(len(terms.pair_loss), terms.chosen_tokens)


def _collated(pairs: list[dict], ctx: Context) -> dict[str, torch.Tensor]:
    batch = D.collate(pair_rows(pairs), ctx.pad_id, windows=ctx.windows, pad_to_multiple_of=ctx.pad_multiple)
    return to_device(batch, ctx.device, ctx.mask_dtype)


def _chosen_tokens(pairs: list[dict]) -> int:
    return sum(D.n_trained(p["chosen"]["labels"]) for p in pairs)


class _Totals:
    """Per-pair metrics summed over a step's batches (and processes), reported as means."""

    KEYS = ("reward_margin", "pref_accuracy", "logps_chosen", "logps_rejected")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, terms: PairTerms):
        for key, values in zip(self.KEYS, (terms.chosen_rewards - terms.rejected_rewards,
                                           (terms.chosen_rewards > terms.rejected_rewards).float(),
                                           terms.logps_chosen, terms.logps_rejected)):
            self.sums[key] += float(values.sum())

    def means(self, n_pairs: int) -> dict[str, float]:
        return {key: round(dist.all_sum(value) / max(n_pairs, 1), 5) for key, value in self.sums.items()}


def backward(model, micro_batches: list[list[dict]], cfg, ctx: Context) -> dict:
    """Forward and backward over this process's share of one step's pair batches; the optimizer
    step is the caller's. Returns the step's loss, tokens and preference metrics."""
    shards = [s for s in (dist.shard(mb) for mb in micro_batches) if s]
    n_pairs = dist.all_sum(sum(len(s) for s in shards))
    n_chosen = dist.all_sum(sum(_chosen_tokens(s) for s in shards)) if cfg.method == "orpo" else 0
    loss_total, totals, seen = 0.0, _Totals(), 0
    for pairs in shards:
        batch = _collated(pairs, ctx)
        with torch.autocast(ctx.device.type, dtype=ctx.autocast or torch.float32, enabled=ctx.autocast is not None):
            terms = pair_terms(model, batch, cfg.method, cfg.beta, cfg.orpo_lambda)
            loss = terms.loss(n_pairs, n_chosen)
        (loss * ctx.grad_factor).backward()
        loss_total += float(loss.detach())
        totals.add(terms)
        seen += D.count_tokens(pair_rows(pairs))  # the pairs' own tokens, not the batch's padding
    return {"loss": dist.all_sum(loss_total), "tokens": dist.all_sum(seen), "answer_tokens": n_chosen,
            "metrics": totals.means(n_pairs)}


@torch.no_grad()
def validate(model, rows: list[dict], cfg, ctx: Context) -> dict:
    """Held-out preference loss and accuracy (pairs whose chosen reward beats the rejected one)."""
    if not rows:
        return {"val_loss": None, "val_pref_accuracy": None}
    model.eval()
    try:
        batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        n_chosen = sum(_chosen_tokens(b) for b in batches)
        loss, totals = 0.0, _Totals()
        for pairs in batches:
            with torch.autocast(ctx.device.type, dtype=ctx.autocast or torch.float32, enabled=ctx.autocast is not None):
                terms = pair_terms(model, _collated(pairs, ctx), cfg.method, cfg.beta, cfg.orpo_lambda)
            loss += float(terms.loss(len(rows), n_chosen))
            totals.add(terms)
    finally:
        model.train()
    accuracy = totals.sums["pref_accuracy"] / len(rows)
    return {"val_loss": round(loss, 5), "val_pref_accuracy": round(accuracy, 4)}
