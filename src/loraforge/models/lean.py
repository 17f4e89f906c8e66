"""Memory-lean training: keep fewer activations for backward, recompute the cheap ones.

With a frozen base, most of training's memory is activations saved for backward. Five places
save far more than they need:
- RMSNorm keeps a float32 copy of its input and the normalised result (Llama's formula casts up,
  normalises, casts back); recomputing it in backward needs only the input.
- SwiGLU keeps silu(gate) besides gate and up; it is recomputed from gate in backward.
- The LoRA A matmuls keep their input for A's gradient: the normalised hidden states (read by
  q/k/v and by gate/up) and SwiGLU's product (read by down). Inside a decoder layer those
  outputs are remembered with how they were made, and a saved-tensor hook keeps the recipe
  (inputs the norm / SwiGLU already keep) instead of the tensor; backward recomputes them.
- Grouped-query attention through transformers' SDPA copies k and v to every query head when a
  mask is given, and keeps the copies; on CPU, SDPA's own ``enable_gqa`` is used (_sdpa_gqa).
- The loss keeps (answer tokens x vocabulary) float32 logits and log-softmax; computed a chunk
  of rows at a time with the gradient for the hidden states formed in the same pass, at most one
  chunk of logits is alive, and nothing vocabulary-sized is kept for backward. Each chunk's
  cross-entropy and softmax come from one float32 copy of its logits, worked in place (no
  separate log-softmax and softmax tensors).

The first three replay exactly the same ops (``torch.utils.checkpoint``, non-reentrant, around
a few elementwise ops, and the hook's replay under the same autocast state), so gradients equal
the plain path's bit for bit. SDPA's GQA kernel and the loss give the same gradient up to
rounding (the loss: its scale is applied after the head's matmul instead of before). Tests compare all of them with
autograd on the unmodified modules. Only module classes whose forward is Llama's formula are
patched (LEAN_NORMS, LEAN_MLPS); any other model trains as before.
"""
from __future__ import annotations

import contextlib
import os
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# transformers classes whose forward is exactly Llama's RMSNorm / gate-up-down SwiGLU MLP.
LEAN_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MixtralRMSNorm",
              "Qwen3MoeRMSNorm", "Qwen2MoeRMSNorm"}
LEAN_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
LOGIT_ELEMENTS = 1 << 22  # logits per loss chunk (4M: 16 MB in float32)
GQA_ON_CPU = True  # grouped-query attention without copying k / v per head, on CPU (_sdpa_gqa)
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def _recompute(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _lean_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and hidden_states.requires_grad):
        return self._plain_forward(hidden_states)
    return _remember(_recompute(self._plain_forward, hidden_states), self._plain_forward, hidden_states)


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)  # (batch, seq, intermediate) each
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return self.down_proj(_remember(_recompute(self._act_mul, gate, up), self._act_mul, gate, up))
    return self.down_proj(self._act_mul(gate, up))


def _act_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return self.act_fn(gate) * up


# --- recomputed instead of saved: the LoRA A inputs of a decoder layer ------------------------
_RECIPES: list[dict[int, tuple]] = []  # per decoder-layer forward in progress: storage -> (output, _Recipe)


class _Recipe:
    """How a remembered output was made. Every saved copy of it (q, k and v each save the same
    normalised hidden states) shares one recipe: backward recomputes it once, at the first
    unpack, and drops it at the last."""

    def __init__(self, fn, args: tuple, autocast: tuple):
        self.fn, self.args, self.autocast = fn, args, autocast
        self.packs, self.unpacks, self.value = 0, 0, None

    def replay(self) -> torch.Tensor:
        device_type, enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return self.fn(*self.args)

    def unpack(self, view: tuple) -> torch.Tensor:
        value = self.value if self.value is not None else self.replay()
        self.unpacks += 1
        self.value = value if self.unpacks < self.packs else None
        return value.as_strided(*view)


class _Replay:
    """What the saved-tensor hook keeps instead of a remembered output (or a view of one)."""

    def __init__(self, recipe: _Recipe, view: tuple):
        self.recipe, self.view = recipe, view
        recipe.packs += 1

    def tensor(self) -> torch.Tensor:
        return self.recipe.unpack(self.view)


def _remember(out: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """Note that `out` is fn(*args) (whose args the checkpoint around fn keeps anyway)."""
    if _RECIPES:
        device_type = out.device.type
        state = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        _RECIPES[-1][out.untyped_storage().data_ptr()] = (out, _Recipe(fn, args, state))
    return out


def _pack(saved: torch.Tensor):
    """A recipe for a remembered output; any other saved tensor detached: kept as is, an op's own
    output would hold its graph node, which holds it (a cycle through C++ that the garbage
    collector cannot free, so a forward never followed by backward would leak its activations)."""
    hit = _RECIPES[-1].get(saved.untyped_storage().data_ptr()) if _RECIPES else None
    if hit is None or hit[0].untyped_storage().nbytes() != saved.untyped_storage().nbytes():
        return saved.detach()
    return _Replay(hit[1], (saved.shape, saved.stride(), saved.storage_offset()))


def _unpack(packed):
    return packed.tensor() if isinstance(packed, _Replay) else packed


def _lean_block_forward(self, *args, **kwargs):
    """A decoder layer's forward, its norm / SwiGLU outputs replayed in backward, not kept. The
    outputs stay referenced until the layer returns, so no other tensor can take their memory
    (and be mistaken for them) while the hook is looking."""
    if not torch.is_grad_enabled():
        return self._plain_forward(*args, **kwargs)
    hidden = args[0] if args else kwargs.get("hidden_states")
    _RECIPES.append({})
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack), \
                _sdpa_gqa(GQA_ON_CPU and isinstance(hidden, torch.Tensor) and hidden.device.type == "cpu"):
            return self._plain_forward(*args, **kwargs)
    finally:
        _RECIPES.pop()


@contextlib.contextmanager
def _sdpa_gqa(enabled: bool):
    """transformers' SDPA attention copies k and v to every query head whenever a mask is given
    (its CUDA kernels would fall back to the math path otherwise), and backward keeps the copies;
    on CPU, SDPA's own ``enable_gqa`` takes the mask and keeps only the key/value heads (SmolLM2:
    3 of 9). transformers' switch for it is an environment variable, read at each call: set here
    for the layer's forward unless the user set it."""
    if not enabled or _FORCE_GQA in os.environ:
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)


def _is_block(module: nn.Module) -> bool:
    """A decoder layer: a patched MLP among its children."""
    return any(type(child).__name__ in LEAN_MLPS and getattr(child, "_plain_forward", None) is not None
               for child in module.children())


def make_lean(model: nn.Module) -> int:
    """Patch the RMSNorm and SwiGLU modules of `model` in place (idempotent); returns how many.

    transformers (5.x, with the `kernels` package) swaps hub kernels in and out of decorated
    modules such as RMSNorm on every train()/eval() switch, which would silently put the plain
    forward back; the model's kernelization is turned off first (on CPU it is the plain forward
    anyway)."""
    if getattr(model, "use_kernels", False):
        model.use_kernels = False  # transformers: reset_kernels(), and no re-kernelizing on train()/eval()
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if getattr(module, "_plain_forward", None) is not None:
            continue
        if name in LEAN_NORMS:
            module._plain_forward = module.forward
            module.forward = types.MethodType(_lean_norm_forward, module)
        elif name in LEAN_MLPS and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module._plain_forward = module.forward
            module._act_mul = types.MethodType(_act_mul, module)
            module.forward = types.MethodType(_lean_mlp_forward, module)
        else:
            continue
        patched += 1
    for module in model.modules():
        if getattr(module, "_plain_forward", None) is None and _is_block(module):
            module._plain_forward = module.forward
            module.forward = types.MethodType(_lean_block_forward, module)
    return patched


def make_plain(model: nn.Module):
    """Undo make_lean."""
    for module in model.modules():
        if getattr(module, "_plain_forward", None) is not None:
            module.forward = module._plain_forward
            del module._plain_forward


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """sum(cross_entropy(head(hidden).float(), targets)), a chunk of rows at a time: hidden (n, h),
    targets (n,). Through a frozen plain Linear head the gradient for `hidden` is formed chunk by
    chunk in the forward pass (softmax - one-hot, times the head), so no (n, vocab) logits are
    kept for backward (as Liger-Kernel's fused linear cross-entropy does); any other head takes
    the plain path."""
    plain_head = type(head) is nn.Linear and not head.weight.requires_grad and \
        (head.bias is None or not head.bias.requires_grad)
    if torch.is_grad_enabled() and hidden.requires_grad and plain_head:
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets)
    if not torch.is_grad_enabled() and plain_head:
        return sum(_chunk_loss(h, t, head.weight, head.bias)[0] for h, t in _chunks(hidden, targets, head.weight))
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _chunks(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor):
    rows = max(1, LOGIT_ELEMENTS // weight.shape[0])
    for start in range(0, hidden.shape[0], rows):
        yield hidden[start:start + rows], targets[start:start + rows]


def _chunk_loss(hidden, targets, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, softmax (rows, vocab) float32) of one chunk. A row's cross-entropy is
    log(sum(exp(logits - max))) minus (its target's logit - max); every step after the head's
    matmul runs in place over one float32 copy of the logits, which ends as the softmax."""
    logits = F.linear(hidden, weight, bias).float()  # (rows, vocab)
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    picked = logits.gather(1, targets[:, None])[:, 0]  # (rows,), shifted like the logits
    sums = logits.exp_().sum(dim=-1)  # the logits are now exp(logits - max)
    return (sums.log() - picked).sum(), logits.div_(sums[:, None])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        total = hidden.new_zeros((), dtype=torch.float32)
        grads = []
        for part, wanted in _chunks(hidden, targets, weight):
            loss, grad_logits = _chunk_loss(part, wanted, weight, bias)
            total += loss
            grad_logits[torch.arange(len(wanted), device=wanted.device), wanted] -= 1  # d(sum CE)/d(logits) = softmax - one-hot
            grads.append(torch.matmul(grad_logits.to(weight.dtype), weight).float())  # (rows, h); bf16 under autocast, like F.linear's backward
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(hidden.shape, dtype=torch.float32))
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_output).to(ctx.hidden_dtype), None, None, None
