"""The training loss through SmolLM2's head (49,152 x 576, bf16, frozen) under bf16 autocast:
models.lean's chunked linear cross-entropy at a few chunk sizes against the plain path (all
(answer tokens x vocabulary) float32 logits, F.cross_entropy, autograd). Forward and backward of
the loss only, for the answer tokens of one training step; median of --iters, process CPU time.

    python bench/loss_chunks.py [--tokens 300] [--iters 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from loraforge.models import lean

VOCAB, HIDDEN = 49152, 576


def timed(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        began = time.process_time()
        fn()
        times.append(time.process_time() - began)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300, help="answer tokens (the bench's steps have ~200-300)")
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(args.tokens, HIDDEN)
    targets = torch.randint(0, VOCAB, (args.tokens,))

    def step(loss_fn):
        def run():
            h = hidden.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(h, head, targets)
            loss.backward()
        return run

    def plain(h, head, targets):
        return F.cross_entropy(head(h).float(), targets, reduction="sum")

    rows = [("plain: all logits, F.cross_entropy, autograd", timed(step(plain), args.iters))]
    default = lean.LOGIT_ELEMENTS
    for elements in (1 << 21, 1 << 22, 1 << 23):
        lean.LOGIT_ELEMENTS = elements
        mark = " (default)" if elements == default else ""
        rows.append((f"chunked, {elements >> 20}M logits a chunk ({elements * 4 >> 20} MB float32){mark}",
                     timed(step(lean.linear_cross_entropy_sum), args.iters)))
    lean.LOGIT_ELEMENTS = default
    print(f"loss forward + backward, {args.tokens} answer tokens, head {VOCAB} x {HIDDEN} bf16, "
          f"{args.threads} thread(s), CPU clock, median of {args.iters}\n")
    print("| loss | ms | vs plain |")
    print("|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1000:.1f} | {seconds / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
