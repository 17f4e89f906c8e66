"""Trainable tokens: a few rows of the embedding (and of the output head) trained, the rest frozen.

PEFT's method (``LoraConfig(trainable_token_indices=...)``, peft/tuners/trainable_tokens): for the
chosen token ids the layer uses trained *values* (not differences) in place of the weight's rows,
so only (n_tokens x hidden) numbers per layer are trained and stored. The use is adding tokens:
the tokenizer grows (``<|tool|>``), the embedding is resized, and only the new rows learn.

On disk (PEFT's names, the adapter name left out):
    base_model.model.<embedding path>.token_adapter.trainable_tokens_delta   (n_tokens, hidden)
    base_model.model.<head path>.token_adapter.trainable_tokens_delta        untied heads only
and ``trainable_token_indices`` in adapter_config.json: a list (the input embedding; a tied head
follows it) or ``{"embed_tokens": [...], "lm_head": [...]}``. A tied head stores nothing of its
own: it reads the embedding's rows, as in PEFT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge import LoraError

KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key suffix (TrainableTokensWrapper)

__all__ = ["KEY", "TrainableTokens", "add_trainable_tokens", "all_ids", "check_token_fits", "copy_token_weights",
           "grow_tokenizer", "grow_vocabulary", "indices_for", "parse_new_tokens", "token_layers", "token_problems",
           "token_state_dict", "unwrap_tokens"]


class TrainableTokens(nn.Module):
    """Wraps an Embedding or the Linear head: rows `token_indices[name]` of its weight are
    replaced by `trainable_tokens_delta[name]` for the active adapters. `tied_to`: the embedding's
    wrapper whose rows a tied head reads (held outside the module tree, so nothing is counted twice)."""

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokens | None" = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise LoraError(f"trainable tokens need an nn.Embedding or nn.Linear, got {type(base_layer).__name__} "
                            f"(a quantized head?)")
        self.base_layer = base_layer
        self._tied = [tied_to] if tied_to is not None else []
        self.trainable_tokens_delta = nn.ParameterDict() if tied_to is None else None
        self.token_indices: dict[str, list[int]] = {} if tied_to is None else tied_to.token_indices
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters = None

    def rows(self) -> nn.ParameterDict:
        return self._tied[0].trainable_tokens_delta if self._tied else self.trainable_tokens_delta

    @property
    def num_embeddings(self) -> int:
        """The vocabulary size of the wrapped layer (as nn.Embedding names it)."""
        weight = self.base_layer.weight
        return weight.shape[0]

    def add_adapter(self, name: str, indices: list[int]):
        """Trained rows start as the weight's rows (PEFT's init_weights=True: a no-op until trained)."""
        if self._tied:
            return
        weight = self.base_layer.weight
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(weight[list(indices)].detach().clone())

    def _active(self) -> list[str]:
        if self.row_adapters is not None and any(n in self.rows() for n, _ in self.row_adapters):
            raise LoraError("an adapter with trainable tokens cannot share a mixed batch; merge it first")
        return [] if self.disabled else [a for a in self.active_adapters if a in self.rows()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self._active()
        if not active:
            return self.base_layer(x)
        if isinstance(self.base_layer, nn.Linear):
            return self._head(x, active)
        out = self.base_layer(x)
        for name in active:
            out = self._embed(x, out, torch.tensor(self.token_indices[name], device=out.device), self.rows()[name])
        return out

    def _head(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """Logits from the weight with the trained rows in place (PEFT's formula, so the numbers are
        PEFT's and the merged model's to the last bit). The gradient reaches the rows through a
        term worth exactly zero, so no (vocab x hidden) weight gradient is ever formed."""
        with torch.no_grad():
            weight = self.merged_weight(active).to(x.dtype)
        out = F.linear(x, weight, self.base_layer.bias)  # (..., vocab)
        for name in active:
            index = torch.tensor(self.token_indices[name], device=out.device)
            part = F.linear(x.detach(), self.rows()[name].to(x.dtype))  # (..., n_tokens): only the rows' gradient
            out = out.index_add(-1, index, (part - part.detach()).to(out.dtype))
        return out

    def _embed(self, ids: torch.Tensor, out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        slot = torch.full((self.base_layer.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        slot[index] = torch.arange(len(index), device=ids.device)
        where = slot[ids]  # (batch, seq): which trained row, -1 for every other token
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma's scaled embedding
        picked = rows[where.clamp(min=0)] * (scale.to(rows.dtype) if scale is not None else 1)
        return torch.where((where >= 0)[..., None], picked.to(out.dtype), out)

    @torch.no_grad()
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        weight = self.base_layer.weight.detach().clone()
        for name in [n for n in names if n in self.rows()]:
            weight[self.token_indices[name]] = self.rows()[name].to(weight.dtype)
        return weight


# --- attaching, reading, writing -----------------------------------------------------------------
def parse_new_tokens(text: str, tokenizer) -> list[str]:
    """`"<|tool|>,<|end_tool|>"` -> the tokens to add; each must be new to the tokenizer."""
    tokens = [t.strip() for t in text.split(",")]
    for i, token in enumerate(tokens):
        if not token:
            raise LoraError(f"--add-tokens {text!r}: token {i + 1} is empty")
        if tokens.index(token) != i:
            raise LoraError(f"--add-tokens: {token!r} is given twice")
        if token in tokenizer.get_vocab():
            raise LoraError(f"--add-tokens: {token!r} is already in the tokenizer's vocabulary (id "
                            f"{tokenizer.convert_tokens_to_ids(token)}); only new tokens are added")
    return tokens


def all_ids(indices) -> list[int]:
    """Every token id of PEFT's list or dict form of trainable_token_indices."""
    return sorted({i for ids in (indices.values() if isinstance(indices, dict) else [indices]) for i in ids})


def grow_vocabulary(model: nn.Module, indices: list[int], mean_resizing: bool = True) -> None:
    """Resize the embedding (and head) when a token id lies beyond it, as a PEFT user calls
    resize_token_embeddings before get_peft_model. A vocabulary padded large enough stays."""
    needed = max(indices) + 1
    if needed > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(needed, mean_resizing=mean_resizing)


def grow_tokenizer(tokenizer, text: str) -> list[int]:
    """Add the comma-listed tokens (special: never split, as PEFT's examples add them); their ids."""
    tokens = parse_new_tokens(text, tokenizer)
    tokenizer.add_tokens(tokens, special_tokens=True)
    return tokenizer.convert_tokens_to_ids(tokens)


def indices_for(model: nn.Module, ids: list[int]):
    """PEFT's trainable_token_indices for rows `ids` of the embedding and the head: a list when the
    head is tied to the embedding (it follows), else {"embed_tokens": ids, "lm_head": ids}."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or _weight(head) is _weight(embedding):
        return list(ids)
    names = {m: n.rpartition(".")[2] for n, m in model.named_modules() if m is embedding or m is head}
    return {names[embedding]: list(ids), names[head]: list(ids)}


def _layers_for(model: nn.Module, indices) -> list[tuple[str, list[int]]]:
    """(module path, token ids) of each layer that owns trained rows, from PEFT's list form (the
    input embedding) or dict form ({"embed_tokens": [...], "lm_head": [...]}). A head tied to the
    embedding owns none: it follows the embedding (as PEFT ties it)."""
    embedding = model.get_input_embeddings()
    named = dict(model.named_modules())
    if isinstance(indices, list):
        return [(next(n for n, m in named.items() if m is embedding), indices)]
    found = []
    for key, ids in indices.items():
        paths = [n for n in named if n == key or n.endswith("." + key)]
        if len(paths) != 1:
            raise LoraError(f"trainable_token_indices names {key!r}, which matches {len(paths) or 'no'} modules "
                            f"of this model")
        module = named[paths[0]]
        if module is not embedding and _weight(module) is _weight(embedding):
            continue  # a tied head
        found.append((paths[0], ids))
    return found


def _weight(module: nn.Module):
    return getattr(getattr(module, "base_layer", module), "weight", None)


def token_problems(model: nn.Module, indices, lora_targets) -> list[str]:
    """What stops trainable tokens `indices` (None: none asked) on this model, before anything is
    attached: ids outside the vocabulary, a layer that also gets a LoRA, a layer of another kind."""
    if indices is None:
        return []
    from loraforge.core.layers import LoraLayer

    vocab, problems = model.get_input_embeddings().num_embeddings, []
    for path, ids in _layers_for(model, indices):
        module = model.get_submodule(path)
        if not ids or any(i >= vocab for i in ids):
            problems.append(f"trainable tokens for {path}: ids must be in [0, {vocab}), got {ids}")
        if path in lora_targets or isinstance(module, LoraLayer):
            problems.append(f"{path} is a LoRA target and has trainable tokens; choose one")
        elif not isinstance(getattr(module, "base_layer", module), (nn.Embedding, nn.Linear)):
            problems.append(f"trainable tokens need {path} to be an nn.Embedding or nn.Linear, got "
                            f"{type(getattr(module, 'base_layer', module)).__name__} (a quantized head?)")
    return problems


def add_trainable_tokens(model: nn.Module, name: str, indices) -> None:
    """Wrap the embedding (and an untied head named in `indices`) with TrainableTokens for adapter
    `name` (token_problems checked first); a tied head is wrapped to follow the embedding's rows."""
    for path, ids in _layers_for(model, indices):
        module = model.get_submodule(path)
        if not isinstance(module, TrainableTokens):
            module = TrainableTokens(module)
            _set(model, path, module)
        module.add_adapter(name, ids)
    _tie_head(model)


def _tie_head(model: nn.Module) -> None:
    """A head sharing the embedding's weight reads the embedding's trained rows."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, TrainableTokens) or head is None or isinstance(head, TrainableTokens):
        return
    if getattr(head, "weight", None) is embedding.base_layer.weight:
        path = next(n for n, m in model.named_modules() if m is head)
        _set(model, path, TrainableTokens(head, tied_to=embedding))


def _set(model: nn.Module, path: str, module: nn.Module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def token_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokens):
            yield name, module


def token_state_dict(model: nn.Module, name: str, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors of adapter `name`: one per wrapper that owns rows (a tied head owns none)."""
    return {f"{prefix}{path}.{KEY}": layer.trainable_tokens_delta[name] for path, layer in token_layers(model)
            if not layer._tied and name in layer.trainable_tokens_delta}


def check_token_fits(model: nn.Module, indices, tensors: dict, prefix: str, where) -> None:
    """The model must have the rows (its vocabulary resized) and each stored tensor its shape."""
    vocab = model.get_input_embeddings().num_embeddings
    for path, ids in _layers_for(model, indices):
        if not ids or max(ids) >= vocab:
            raise LoraError(f"adapter {where} trains token ids up to {max(ids, default=None)}, but this model's "
                            f"vocabulary has {vocab} rows: resize its embeddings to the adapter's tokenizer "
                            f"(model.resize_token_embeddings), or use the merged model (loraforge merge)")
        tensor, hidden = tensors.get(f"{prefix}{path}.{KEY}"), _weight(model.get_submodule(path)).shape[1]
        if tensor is None:
            raise LoraError(f"adapter {where} lists trainable tokens for {path} but stores no {KEY} for it")
        if tuple(tensor.shape) != (len(ids), hidden):
            raise LoraError(f"adapter {where}: {path}.{KEY} has shape {tuple(tensor.shape)}, the model needs "
                            f"({len(ids)}, {hidden})")


def copy_token_weights(model: nn.Module, name: str, tensors: dict, prefix: str) -> None:
    with torch.no_grad():
        for path, layer in token_layers(model):
            key = f"{prefix}{path}.{KEY}"
            if not layer._tied and name in layer.trainable_tokens_delta and key in tensors:
                layer.trainable_tokens_delta[name].copy_(tensors[key])


def unwrap_tokens(model: nn.Module, merge: list[str] | None = None) -> None:
    """Replace every TrainableTokens by its base layer, with the rows of adapters `merge` written
    into the weight first (merge_and_unload), or untouched (unload)."""
    for path, layer in list(token_layers(model)):
        if merge:
            with torch.no_grad():
                layer.base_layer.weight.copy_(layer.merged_weight(merge))
        _set(model, path, layer.base_layer)
