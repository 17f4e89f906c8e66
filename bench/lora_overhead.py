"""LoRA layer cost on a SmolLM2-135M-shaped model (random weights), in one process run.

1. Training step (forward + backward, the model's own loss) with LoRA r=8 on all linear layers:
   loraforge against PEFT on the same inputs, interleaved so that machine noise hits both alike.
2. Inference forward at batch 4 x 256 tokens: bare base model, loraforge with the adapter
   unmerged, its floor (below), and merged (which must equal the base model's cost: it is the
   base model's layers).
3. One decode step at batch 1: bare base, unmerged through LoraLinear's short inference forward,
   unmerged through the general routing path (what every unmerged forward took before), and the
   floor of any unmerged forward that keeps the two LoRA products: the base matmul, A x and the
   in-place addmm of B, with no check or dispatch around them; then that floor split, kernel by
   kernel (the base matmul alone through the LoRA layer, then with x A^T added), to show what each
   of the two small kernels costs.

    python bench/lora_overhead.py [--iters 6] [--batch 4] [--seq 256] [--dtype float32]
                                  [--threads N] [--clock wall|cpu]

--clock cpu times each call in process CPU time (with --threads 1 the machine's other jobs
then cost nothing but cache), for comparisons of a few percent on a shared machine.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraforge.core.config import LoraConfig
from loraforge.core.layers import LoraLayer, LoraLinear
from loraforge.core.ops import attach, merge, unmerge

CLOCK = time.perf_counter

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)


def timed(fn, iters: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        began = CLOCK()
        fn()
        times.append(CLOCK() - began)
    return times


def train_step(model, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def forward(model, ids):
    @torch.no_grad()
    def run():
        model(input_ids=ids)
    return run


def decode(model, ids):
    """One greedy decode step at batch 1 after a prompt of ids.shape[1] tokens (the KV cache is
    cropped back after every step, so each call does the same work)."""
    from transformers import DynamicCache

    prompt = ids[:1]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)

    @torch.no_grad()
    def run():
        model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the appended column
    return run


def with_forward(fn, forward):
    """fn run with LoraLinear.forward replaced by `forward` (and put back after)."""
    def run():
        short, LoraLinear.forward = LoraLinear.forward, forward
        try:
            return fn()
        finally:
            LoraLinear.forward = short
    return run


def general_path(fn):
    """fn with LoraLinear's short inference forward turned off (the general LoraLayer.forward)."""
    return with_forward(fn, LoraLayer.forward)


def two_kernel_floor(fn, kernels: int = 3):
    """fn with every LoraLinear reduced to its three kernels (one plain adapter assumed): what an
    unmerged adapter costs with zero Python bookkeeping. kernels=1 keeps only the base matmul and
    kernels=2 adds x A^T without B (wrong outputs: they only split the floor's cost)."""
    import torch.nn.functional as F

    def bare(self, x):
        name, modules = self.active_adapters[0], self._modules
        result = F.linear(x, modules["base_layer"].weight, modules["base_layer"].bias)
        if kernels == 1:
            return result
        a = F.linear(x, modules["lora_A"][name].weight)
        if kernels == 2:
            return result
        result.view(-1, result.shape[-1]).addmm_(a.view(-1, a.shape[-1]), modules["lora_B"][name].weight.t(),
                                                 alpha=self.scaling[name])
        return result
    return with_forward(fn, bare)


def interleaved(fns: dict, iters: int) -> dict[str, float]:
    """Median seconds per call, alternating the candidates each round."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(iters):
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time or process CPU time")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig as PeftConfig, get_peft_model

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype)
    base.config.use_cache = False  # decode() passes use_cache=True itself
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq))
    ours = attach(copy.deepcopy(base), LoraConfig(r=8, alpha=16, target_modules="all-linear")).train()
    peft = get_peft_model(copy.deepcopy(base), PeftConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
    for model in (ours, peft):  # same non-zero adapter weights in both
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    train = interleaved({"loraforge": train_step(ours, ids), "peft": train_step(peft, ids)}, args.iters)
    ours.eval()
    base.eval()
    with torch.no_grad():
        def probe():
            return ours(input_ids=ids[:1, :8]).logits
        assert torch.equal(two_kernel_floor(probe)(), probe()), "the floor computes another output"
    infer = interleaved({"base": forward(base, ids), "unmerged": forward(ours, ids),
                         "floor": two_kernel_floor(forward(ours, ids))}, args.iters)
    unmerged_step = decode(ours, ids)
    step = interleaved({"base": decode(base, ids), "unmerged": unmerged_step, "general": general_path(unmerged_step),
                        "floor": two_kernel_floor(unmerged_step), "base_kernel": two_kernel_floor(unmerged_step, 1),
                        "a_kernel": two_kernel_floor(unmerged_step, 2)},
                       args.iters * 20)
    merge(ours)
    merged = interleaved({"base": forward(base, ids), "merged": forward(ours, ids)}, args.iters)
    unmerge(ours)
    print(f"SmolLM2-135M shape, random weights, {args.dtype}, batch {args.batch} x {args.seq} tokens, "
          f"LoRA r=8 all-linear, {torch.get_num_threads()} threads, {args.clock} clock, median of {args.iters} "
          f"({args.iters * 20} for decode steps)\n")
    print("| measurement | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| train step, PEFT | {train['peft']:.3f} | 1.00 |")
    print(f"| train step, loraforge | {train['loraforge']:.3f} | {train['loraforge'] / train['peft']:.3f} |")
    print(f"| inference, bare base | {infer['base']:.3f} | 1.00 |")
    print(f"| inference, loraforge unmerged | {infer['unmerged']:.3f} | {infer['unmerged'] / infer['base']:.3f} |")
    print(f"| inference, floor: the three kernels alone | {infer['floor']:.3f} | {infer['floor'] / infer['base']:.3f} |")
    print(f"| decode step (batch 1, {args.seq}-token cache), bare base | {step['base']:.4f} | 1.00 |")
    print(f"| decode step, loraforge unmerged | {step['unmerged']:.4f} | {step['unmerged'] / step['base']:.3f} |")
    print(f"| decode step, unmerged through the general path | {step['general']:.4f} | "
          f"{step['general'] / step['base']:.3f} |")
    print(f"| decode step, floor: the three kernels alone | {step['floor']:.4f} | {step['floor'] / step['base']:.3f} |")
    print(f"| decode step, floor split: the base matmul only | {step['base_kernel']:.4f} | "
          f"{step['base_kernel'] / step['base']:.3f} |")
    print(f"| decode step, floor split: base matmul and x A^T (no B) | {step['a_kernel']:.4f} | "
          f"{step['a_kernel'] / step['base']:.3f} |")
    print(f"| inference, bare base (again) | {merged['base']:.3f} | 1.00 |")
    print(f"| inference, loraforge merged | {merged['merged']:.3f} | {merged['merged'] / merged['base']:.3f} |")


if __name__ == "__main__":
    main()
