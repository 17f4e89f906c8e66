"""Scoring a model (with or without an adapter): loss, perplexity, exact match; the ``eval`` command."""
from __future__ import annotations

import json
import math

import torch

from loraforge import data as D
from loraforge.models.lean import linear_cross_entropy_sum


def answer_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, targets, where) at the label positions only: the decoder's last hidden states
    (n, hidden) where a label exists, the labels (n,), and where (B, T-1), the mask of those
    positions (token t+1 is predicted at position t)."""
    labels = batch["labels"][:, 1:]  # (B, T-1)
    where = labels != D.IGNORE_INDEX
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    return hidden[:, :-1][where], labels[where], where  # (n_answer_tokens, hidden), (n,), (B, T-1)


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, where): answer_hidden, then the output head only where a label exists.
    For chat data most positions are prompt, and the head (vocab x hidden) is the largest matmul
    of a small model. logits (n, vocab) float32."""
    picked, targets, where = answer_hidden(model, batch)
    return model.get_output_embeddings()(picked).float(), targets, where


def answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over label positions, the head's logits a chunk of rows at a time
    (models.lean: never all (n, vocab) float32 logits at once)."""
    picked, targets, _ = answer_hidden(model, batch)
    return linear_cross_entropy_sum(picked, model.get_output_embeddings(), targets)


@torch.no_grad()
def rows_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8,
              autocast: torch.dtype | None = None, pad_to_multiple_of: int = 1) -> float:
    """Mean cross-entropy per answer token over packed rows (data.pack), batch by batch."""
    param = next(model.parameters())
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        rows_here = D.collate(rows[start:start + batch_size], pad_id, windows=D.has_windows(model.config),
                              pad_to_multiple_of=pad_to_multiple_of)
        batch = {k: v.to(param.device) for k, v in rows_here.items()}
        if "attention_mask" in batch:
            batch["attention_mask"] = batch["attention_mask"].to(autocast or param.dtype)
        with torch.autocast(param.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            total += float(answer_loss_sum(model, batch))
        count += D.count_answer_tokens(batch["labels"])
    return total / max(count, 1)


def answer_loss(model, tokenizer, examples: list[D.Example], max_tokens: int = 1024,
                batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token, with examples packed as in training."""
    pairs = D.encode_examples(examples, tokenizer, max_len=max_tokens).pairs
    return rows_loss(model, D.pack(pairs, max_tokens), tokenizer.pad_token_id, batch_size)


def exact_match(model, tokenizer, examples: list[D.Example], batch_size: int = 16,
                max_new_tokens: int | None = None) -> tuple[float, list[dict]]:
    """Fraction of examples whose greedy answer, stripped, equals the reference answer."""
    from loraforge.models import generate_text

    scored = [ex for ex in examples if ex.answer is not None]
    if not scored:
        return float("nan"), []
    limit = max_new_tokens or max(len(tokenizer(ex.answer)["input_ids"]) for ex in scored) + 8
    rows = []
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        outputs = generate_text(model, tokenizer, [D.prompt_text(ex, tokenizer) for ex in chunk], limit)
        rows += [{"expected": ex.answer.strip(), "got": out.strip()} for ex, out in zip(chunk, outputs)]
    hits = sum(r["expected"] == r["got"] for r in rows)
    return hits / len(rows), rows


def evaluate(model, tokenizer, examples: list[D.Example], batch_size: int = 16) -> dict:
    was_training = model.training
    model.eval()
    try:
        loss = answer_loss(model, tokenizer, [ex for ex in examples if ex.answer is not None or ex.text])
        em, rows = exact_match(model, tokenizer, examples, batch_size)
    finally:
        model.train(was_training)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50)), 4),
            "exact_match": round(em, 4), "n": len(examples), "samples": rows[:5]}


def cli_eval(args) -> int:
    from loraforge.models.loading import load_for_inference

    model, tokenizer = load_for_inference(args.model, args.adapter, quantize=args.quantize)
    examples = D.load_examples(args.data)
    if args.limit:
        examples = examples[:args.limit]
    result = evaluate(model, tokenizer, examples, args.batch_size)
    label = f"adapter {args.adapter}" if args.adapter else f"base model {args.model}"
    if math.isnan(result["exact_match"]):  # plain-text data has no answers to match; JSON has no NaN
        result["exact_match"] = None
    em = "n/a" if result["exact_match"] is None else f"{100 * result['exact_match']:.1f}%"
    print(f"{label} on {args.data} ({result['n']} examples): loss {result['loss']:.4f}, "
          f"perplexity {result['perplexity']:.3f}, exact match {em}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0
