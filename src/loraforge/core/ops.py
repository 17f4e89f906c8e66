"""Operations on a whole model: attach adapters, choose targets, freeze, switch, merge, route.

Every function takes a plain torch / transformers model and changes it in place; there is no
wrapper model class. Adapter settings live in `model.lora_configs` ({name: LoraConfig}).
"""
from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from loraforge import LoraError
from loraforge.core.config import ALL_LINEAR, LoraConfig, exact_patterns, name_matches, parameter_matches
from loraforge.core.layers import LoraEmbedding, LoraLayer, LoraParameter, lora_layer_type
from loraforge.core.lowrank import concat_factors, truncated_factors
from loraforge.core.tokens import TrainableTokens, add_trainable_tokens, token_problems, unwrap_tokens

logger = logging.getLogger(__name__)


# --- finding targets ------------------------------------------------------------------------
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a LoRA layer can wrap (Linear, Conv1D, Embedding), by dotted name.
    A module already wrapped counts under its own name; LoRA internals never count."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraParameter):
            continue  # a parameter target (find_parameter_targets), not a module one
        if isinstance(module, LoraLayer):
            found[name] = module
        elif lora_layer_type(module) and not _inside_lora(name):
            found[name] = module
    return found


def _inside_lora(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer", "modules_to_save", "original_module") for p in parts)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): excluded from `all-linear`, as in PEFT."""
    heads = {"lm_head"}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if head is not None and (module is head or getattr(module, "base_layer", None) is head):
            heads.add(name)
    return heads


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """The modules `config` selects. Raises LoraError (listing what exists) when none match."""
    candidates = adaptable_modules(model)
    heads = output_head_names(model)
    if config.target_modules == ALL_LINEAR or (isinstance(config.target_modules, list)
                                               and ALL_LINEAR in config.target_modules):
        chosen = {n: m for n, m in candidates.items() if n not in heads and _is_linear_like(m)}
    else:
        chosen = {n: m for n, m in candidates.items() if name_matches(n, config.target_modules)}
    if config.exclude_modules:
        chosen = {n: m for n, m in chosen.items() if not name_matches(n, config.exclude_modules)}
    if not chosen and not find_parameter_targets(model, config):
        raise LoraError(f"target_modules {config.target_modules!r} match no adaptable module; "
                        f"this model has: {summarize_names(candidates)}")
    return chosen


def _is_linear_like(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return not isinstance(base, nn.Embedding)


def summarize_names(modules) -> str:
    """Module names grouped by their last part: 'q_proj (x30: model.layers.0.self_attn.q_proj, ...)'."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(name.split(".")[-1], []).append(name)
    return ", ".join(f"{k} (x{len(v)}, e.g. {v[0]})" if len(v) > 1 else v[0] for k, v in groups.items())


def rank_notes(config: LoraConfig, targets: dict[str, nn.Module]) -> list[str]:
    """Targets smaller than the rank (a 64 -> 1 gate, say). PEFT adapts them anyway, and so do we:
    the update simply has rank at most the smaller side. PiSSA, which needs r singular vectors,
    cannot (see check_support)."""
    notes = []
    for name, module in targets.items():
        out_f, in_f = _matrix_shape(module)
        r = config.rank_for(name)
        if r > min(in_f, out_f):
            notes.append(f"r={r} exceeds the smaller side of {name} ({out_f} x {in_f})")
    return notes


def summarize_rank_notes(notes: list[str]) -> str:
    more = f" and {len(notes) - 1} more" if len(notes) > 1 else ""
    return f"{notes[0]}{more}: such an update has rank at most that side (PEFT adapts these layers too)"


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the update matrix for a target (embedding: (dim, vocab), PEFT's layout)."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    cls = lora_layer_type(base)
    if cls is LoraEmbedding:
        vocab, dim = base.weight.shape
        return dim, vocab
    if cls.__name__ == "LoraConv1D":
        in_f, out_f = base.weight.shape
        return out_f, in_f
    return base.out_features, base.in_features


def check_support(config: LoraConfig, targets: dict[str, nn.Module]) -> list[str]:
    """DoRA and PiSSA exist for Linear / Conv1D only; say so before any layer is changed."""
    embeddings = [n for n, m in targets.items() if not _is_linear_like(m)]
    if not embeddings:
        return []
    problems = []
    if config.use_dora:
        problems.append(f"DoRA is supported on Linear and Conv1D layers, not on embeddings ({embeddings[0]})")
    if config.init == "pissa":
        problems.append(f"PiSSA init is supported on Linear and Conv1D layers, not on embeddings ({embeddings[0]})")
    return problems


# --- parameter targets: fused MoE experts and routers (PEFT's target_parameters) ---------------
FUSED_PARAMETERS = {"gate_up_proj": 2}  # projections fused into one expert parameter (gate and up)


@dataclass(frozen=True)
class ParamTarget:
    """One parameter to adapt: `owner` (module path) . `parameter`, with its rank and alpha."""

    owner: str
    parameter: str
    r: int
    alpha: float


def _expert_model_types() -> set[str]:
    """Model types whose fused experts PEFT's `all-linear` (and its v4 projection names) adapt:
    those transformers converts with the Mixtral or Qwen2-MoE pattern (PEFT's conversion tables;
    Qwen2-MoE itself is not among them, so PEFT leaves its experts alone and so do we)."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as table
    except ImportError:  # pragma: no cover - older transformers stored experts as Linear layers
        return {"mixtral", "qwen3_moe"}
    return {t for t, pattern in table.items() if pattern in ("mixtral", "qwen2_moe")} | {"mixtral"}


def own_parameters(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a module's own parameters in definition order (4-bit ones included)."""
    shapes = getattr(module, "parameter_shapes", None)
    if callable(shapes):
        return shapes()
    return {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}


def parameter_owners(model: nn.Module) -> dict[str, nn.Module]:
    """{module path: module} of every module whose own parameters can be targeted, seen through
    LoRA wrappers (a wrapped experts module counts under its own path)."""
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraParameter):
            if not name.endswith(".base_layer"):
                owners[name] = module.core()
        elif not isinstance(module, LoraLayer) and not _inside_lora(name) and own_parameters(module):
            owners[name] = module
    return owners


def _implicit_parameters(model: nn.Module, owners: dict[str, nn.Module]) -> dict[str, str]:
    """{parameter path: kind} for the parameters `all-linear` covers beyond Linear layers, as
    PEFT's does: every 3-D expert parameter ("expert") and the 2-D weight of each router module
    beside the experts ("router"), on the model types PEFT converts (see _expert_model_types)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _expert_model_types():
        return {}
    found = {}
    for path, module in owners.items():
        experts = {n: s for n, s in own_parameters(module).items() if len(s) == 3}
        if not experts:
            continue
        found.update({f"{path}.{n}": "expert" for n in experts})
        parent = path.rpartition(".")[0]
        count = next(iter(experts.values()))[0]
        for other, sibling in owners.items():
            shape = own_parameters(sibling).get("weight")
            if (other.rpartition(".")[0] == parent and other != path and shape and len(shape) == 2
                    and shape[0] == count and lora_layer_type(sibling) is None):
                found[f"{other}.weight"] = "router"
    return found


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> dict[str, ParamTarget]:
    """{parameter path: ParamTarget} that `config` selects. Explicit `target_parameters` match a
    path or its dotted suffix (PEFT's rule) and get rank_for(path). Through `target_modules`,
    `all-linear` takes every expert parameter and router weight (_implicit_parameters) and a
    name or preset takes the expert parameters it names (`mlp`: gate_up_proj, down_proj); a fused
    gate_up_proj then gets rank and alpha x2, one r for each half, as PEFT's conversion does."""
    owners = parameter_owners(model)
    explicit = config.target_parameters or []
    implicit = _implicit_parameters(model, owners)
    all_linear = config.target_modules == ALL_LINEAR or (isinstance(config.target_modules, list)
                                                         and ALL_LINEAR in config.target_modules)
    chosen = {}
    for owner, module in owners.items():
        for pname in own_parameters(module):
            path = f"{owner}.{pname}"
            if config.exclude_modules and (name_matches(path, config.exclude_modules)
                                           or name_matches(owner, config.exclude_modules)):
                continue
            factor = FUSED_PARAMETERS.get(pname, 1)
            if parameter_matches(path, explicit):
                chosen[path] = ParamTarget(owner, pname, config.rank_for(path), config.alpha_for(path))
            elif path in implicit and (all_linear or (implicit[path] == "expert"
                                                      and name_matches(path, config.target_modules))):
                chosen[path] = ParamTarget(owner, pname, factor * config.rank_for(path),
                                           factor * config.alpha_for(path))
    return chosen


def parameter_lora_counts(model: nn.Module, config: LoraConfig) -> dict[str, int]:
    """Trainable parameters of `config`'s parameter targets per label (as parameter_report's):
    r * E * (in + out) for E experts (E = 1 for a router's 2-D weight)."""
    owners, counts = parameter_owners(model), Counter()
    for path, target in find_parameter_targets(model, config).items():
        shape = own_parameters(owners[target.owner])[target.parameter]
        experts = shape[0] if len(shape) == 3 else 1
        label = target.parameter if len(shape) == 3 else target.owner.split(".")[-1]
        counts[label] += target.r * experts * sum(shape[-2:])
    return dict(counts)


def parameter_rank_notes(model: nn.Module, params: dict[str, ParamTarget]) -> list[str]:
    """rank_notes for parameter targets: a router's (experts x hidden) weight under r, say."""
    owners = parameter_owners(model)
    notes = []
    for path, target in params.items():
        shape = own_parameters(owners[target.owner])[target.parameter]
        if target.r > min(shape[-2:]):
            notes.append(f"r={target.r} exceeds the smaller side of {path} ({' x '.join(map(str, shape))})")
    return notes


def parameter_problems(model: nn.Module, config: LoraConfig, params: dict[str, ParamTarget]) -> list[str]:
    """What LoRA on parameters cannot do (PEFT refuses the same), and wrappers that do not fit."""
    if not params:
        return []
    first = next(iter(params))
    problems = []
    if config.dropout > 0:
        problems.append(f"LoRA dropout is not supported on parameter targets such as {first} (their input is "
                        "inside the module; PEFT refuses it too): use dropout 0")
    if config.use_dora:
        problems.append(f"DoRA is not supported on parameter targets such as {first} (PEFT refuses it too)")
    if config.init == "pissa":
        problems.append(f"PiSSA init is not supported on parameter targets such as {first}")
    modules = dict(model.named_modules())
    for owner, names in _by_owner(params).items():
        module = modules[owner]
        wrapped = [layer.parameter_name for layer in module.chain()] if isinstance(module, LoraParameter) else []
        if wrapped and set(wrapped) != set(names):
            problems.append(f"{owner} already has LoRA on {', '.join(sorted(wrapped))}; every adapter must target "
                            f"the same parameters of it (as in PEFT), not {', '.join(names)}")
    return problems


def _by_owner(params: dict[str, ParamTarget]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for target in params.values():
        grouped.setdefault(target.owner, []).append(target.parameter)
    return grouped


def _attach_parameters(model: nn.Module, params: dict[str, ParamTarget], name: str, config: LoraConfig):
    """Wrap each owner once per targeted parameter (the first-defined innermost, PEFT's nesting),
    then add adapter `name` to each wrapper."""
    modules = dict(model.named_modules())
    for owner, names in _by_owner(params).items():
        module = modules[owner]
        if not isinstance(module, LoraParameter):
            order = list(own_parameters(module))
            for pname in sorted(names, key=order.index):
                module = LoraParameter(module, pname)
            _set_submodule(model, owner, module)
        for layer in module.chain():
            target = params[f"{owner}.{layer.parameter_name}"]
            layer.add_adapter(name, target.r, target.alpha, init=config.init, use_rslora=config.use_rslora)
            layer.train(layer.core().training)


def saved_module_paths(model: nn.Module, name: str) -> list[str]:
    """PEFT's rule for a modules_to_save entry: the module at that path or at any path ending in
    `.name` (`embed_tokens` selects `model.embed_tokens`)."""
    return [n for n, _ in model.named_modules()
            if n and (n == name or n.endswith("." + name)) and not _inside_lora(n)]


def check_saved_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Every modules_to_save entry must name a module of the model."""
    return [f"modules_to_save names {name!r}, which this model does not have"
            for name in config.modules_to_save if not saved_module_paths(model, name)]


# --- attaching and removing -------------------------------------------------------------------
def attach(model: nn.Module, config: LoraConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Add adapter `name` to every target of `config`, freeze the base, activate it."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise LoraError(f"adapter name {name!r} must use letters, digits, '_' or '-' only")
    if name in getattr(model, "lora_configs", {}):
        raise LoraError(f"model already has an adapter named {name!r}")
    targets = find_targets(model, config)
    params = find_parameter_targets(model, config)
    notes = rank_notes(config, targets) + parameter_rank_notes(model, params)
    problems = check_support(config, targets) + check_saved_modules(model, config) \
        + parameter_problems(model, config, params) \
        + token_problems(model, config.trainable_token_indices, targets)
    if config.init == "pissa":
        problems += [f"{note}: PiSSA takes r singular vectors from the weight" for note in notes]
    if problems:
        raise LoraError("; ".join(problems))
    if notes:
        logger.warning(summarize_rank_notes(notes))
    for module_name, module in targets.items():
        layer = module if isinstance(module, LoraLayer) else _wrap(model, module_name, module)
        layer.add_adapter(name, config.rank_for(module_name), config.alpha_for(module_name), config.dropout,
                          config.init, config.use_rslora, config.use_dora)
        layer.train(layer.base_layer.training)  # new dropout / factors follow the model's train/eval mode
    _attach_parameters(model, params, name, config)
    for entry in config.modules_to_save:
        for module_name in saved_module_paths(model, entry):
            _save_module(model, module_name, name)
    if config.trainable_token_indices is not None:  # PEFT's trainable tokens (core.tokens)
        add_trainable_tokens(model, name, config.trainable_token_indices)
    if config.init == "pissa":  # kept to convert to a plain LoRA on save (io._pissa_to_lora)
        layers = dict(lora_layers(model))
        model.lora_initial_factors = getattr(model, "lora_initial_factors", {})
        model.lora_initial_factors[name] = {m: tuple(t.detach().clone() for t in layers[m].factors(name))
                                            for m in targets}
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}
    model.lora_configs[name] = config
    if activate:
        set_adapter(model, name)
    return model


def _wrap(model: nn.Module, module_name: str, module: nn.Module) -> LoraLayer:
    layer = lora_layer_type(module)(module)
    _set_submodule(model, module_name, layer)
    return layer


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class ModulesToSave(nn.Module):
    """A module trained in full for some adapters (PEFT's modules_to_save): a copy per adapter."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters = None

    def forward(self, x, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:
            out = self.original_module(x, *args, **kwargs)
            for name, rows in self.row_adapters:
                if name in self.modules_to_save:
                    out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
            return out
        active = [a for a in self.active_adapters if a in self.modules_to_save]
        module = self.original_module if self.disabled or not active else self.modules_to_save[active[-1]]
        return module(x, *args, **kwargs)


def _save_module(model: nn.Module, module_name: str, adapter: str):
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise LoraError(f"modules_to_save names {module_name!r}, which this model does not have") from None
    if not isinstance(module, ModulesToSave):
        wrapper = ModulesToSave(module)
        _set_submodule(model, module_name, wrapper)
        module = wrapper
    module.modules_to_save[adapter] = copy.deepcopy(module.original_module)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _routed(model: nn.Module) -> Iterator[nn.Module]:
    """Every module that chooses per adapter: LoRA layers and modules_to_save wrappers."""
    return (m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave, TrainableTokens)))


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "lora_configs", {}))


def _require(model: nn.Module, name: str):
    if name not in getattr(model, "lora_configs", {}):
        raise LoraError(f"no adapter named {name!r}; this model has: {', '.join(adapter_names(model)) or 'none'}")


def delete_adapter(model: nn.Module, name: str):
    """Remove adapter `name` from every layer (unmerging it first if merged). A PiSSA adapter
    also gives back the principal part it took out of the base weights."""
    _require(model, name)
    for module in _routed(model):
        if isinstance(module, LoraLayer) and name in module.merged_adapters:
            module.unmerge()
    _restore_pissa_base(model, name)
    for module in _routed(model):
        for container in ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "lora_embedding_A",
                          "lora_embedding_B", "modules_to_save", "trainable_tokens_delta"):
            if getattr(module, container, None) is not None and name in getattr(module, container):
                del getattr(module, container)[name]
        for table in ("r", "lora_alpha", "scaling", "token_indices"):
            getattr(module, table, {}).pop(name, None)
        module.active_adapters = [a for a in module.active_adapters if a != name]
    del model.lora_configs[name]


def _restore_pissa_base(model: nn.Module, name: str):
    """PiSSA left W - s B0 A0 in the base; add s B0 A0 back (B0, A0: the factors at attach time)."""
    initial = getattr(model, "lora_initial_factors", {}).pop(name, {})
    layers = dict(lora_layers(model))
    for module_name, (A0, B0) in initial.items():
        layer = layers[module_name]
        layer._add_to_weight((B0.float() @ A0.float()) * layer.scaling[name])


# --- which adapter runs -----------------------------------------------------------------------
def set_adapter(model: nn.Module, names: str | list[str]):
    """Make `names` the active adapter(s) and the only trainable parameters."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        _require(model, name)
    for module in _routed(model):
        if isinstance(module, LoraLayer) and set(module.merged_adapters) - set(names):
            module.unmerge()  # an adapter switched off must leave the weights too
        module.active_adapters = list(names)
    set_trainable(model, names)


def active_adapters(model: nn.Module) -> list[str]:
    for _, layer in lora_layers(model):
        return list(layer.active_adapters)
    return []


@contextmanager
def disabled(model: nn.Module):
    """Run the base model: every adapter off (merged ones are unmerged first)."""
    modules = list(_routed(model))
    merged = {}
    for module in modules:
        if isinstance(module, LoraLayer) and module.merged:
            merged[module] = list(module.merged_adapters)
            module.unmerge()
        module.disabled = True
    try:
        yield model
    finally:
        for module in modules:
            module.disabled = False
        for module, names in merged.items():  # merged adapters are merged again, as before
            module.merge(names)


@contextmanager
def mixed_batch(model: nn.Module, row_adapters: list[str | None]):
    """One forward pass where row i uses adapter row_adapters[i] (None: the base model)."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(row_adapters):
        if name is not None:
            _require(model, name)
            groups.setdefault(name, []).append(row)
    device = next(model.parameters()).device
    routes = [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]
    modules = list(_routed(model))
    for module in modules:
        module.row_adapters = routes
        if isinstance(module, LoraParameter):  # it sees (rows * seq) tokens, not rows
            module.row_count = len(row_adapters)
    try:
        yield model
    finally:
        for module in modules:
            module.row_adapters = None


# --- trainable parameters ---------------------------------------------------------------------
def adapter_params(model: nn.Module, names: list[str] | str | None = None) -> dict[str, nn.Parameter]:
    """The parameters that belong to adapter(s) `names` (default: the active ones)."""
    names = active_adapters(model) if names is None else ([names] if isinstance(names, str) else names)
    params = {}
    for module_name, module in model.named_modules():
        for container in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B",
                          "modules_to_save", "trainable_tokens_delta"):
            holder = getattr(module, container, None)
            if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for name in names:
                if name in holder:
                    item = holder[name]
                    tensors = item.named_parameters() if isinstance(item, nn.Module) else [("", item)]
                    for pname, p in tensors:
                        params[".".join(x for x in (module_name, container, name, pname) if x)] = p
    return params


def set_trainable(model: nn.Module, names: list[str] | None = None):
    """Freeze everything, then unfreeze exactly the adapter parameters of `names`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_params(model, names).values():
        p.requires_grad_(True)


def parameter_report(model: nn.Module, names: list[str] | None = None) -> dict:
    """Trainable parameters per module type (last name part) and in total, against the base."""
    adapter = adapter_params(model, names)
    labels = _parameter_labels(model)
    per_type: Counter = Counter()
    for pname, p in adapter.items():
        parts = pname.split(".")
        owner = next(i for i, part in enumerate(parts)
                     if part.startswith("lora_") or part in ("modules_to_save", "trainable_tokens_delta"))
        label = labels.get(".".join(parts[:owner]), parts[owner - 1] if owner else "model")
        per_type[label] += p.numel()
    ids = {id(p) for p in adapter.values()}
    all_adapters = {id(p) for p in adapter_params(model, adapter_names(model)).values()}
    base = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in all_adapters)
    total = sum(p.numel() for p in adapter.values())
    return {"per_type": dict(per_type), "trainable_params": total, "base_params": base,
            "percent": 100.0 * total / base if base else 0.0, "tensors": len(ids)}


def _parameter_labels(model: nn.Module) -> dict[str, str]:
    """Report labels of parameter targets by wrapper path: the expert parameter's name
    (gate_up_proj, down_proj), or the owner's name for a 2-D one (a router: gate)."""
    labels = {}
    for path, layer in lora_layers(model):
        if isinstance(layer, LoraParameter):
            owner = path.split(".base_layer")[0]
            labels[path] = layer.parameter_name if layer.weight.dim() == 3 else owner.split(".")[-1]
    return labels


def format_report(report: dict) -> str:
    lines = [f"{'module type':<20}{'trainable params':>18}"]
    lines += [f"{k:<20}{v:>18,}" for k, v in sorted(report["per_type"].items())]
    lines.append(f"{'total':<20}{report['trainable_params']:>18,}  "
                 f"({report['percent']:.4f}% of {report['base_params']:,} base parameters)")
    return "\n".join(lines)


# --- merging ----------------------------------------------------------------------------------
def merge(model: nn.Module, names: list[str] | None = None):
    """Fold the active adapter(s) (or `names`) into the base weights; forward then costs nothing."""
    for _, layer in lora_layers(model):
        layer.merge([n for n in (names or layer.active_adapters) if n in layer.r])


def unmerge(model: nn.Module):
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Merge, then replace every wrapper by its plain base module: no loraforge module is left."""
    names = names or active_adapters(model)
    merge(model, names)
    _unwrap_all(model, names)
    unwrap_tokens(model, merge=names)
    _forget_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _unwrap_all(model: nn.Module, keep: list[str]):
    """Replace every wrapper by its plain module; a ModulesToSave by its copy of the last adapter
    in `keep` that has one, else by the original module."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if not _nested(name, module):
                _set_submodule(model, name, _unwrapped(module))
        elif isinstance(module, ModulesToSave):
            chosen = [n for n in keep if n in module.modules_to_save]
            _set_submodule(model, name, module.modules_to_save[chosen[-1]] if chosen else module.original_module)


def _unwrapped(layer: LoraLayer) -> nn.Module:
    """The plain module under a wrapper (under the whole chain of nested parameter wrappers)."""
    return layer.core() if isinstance(layer, LoraParameter) else layer.base_layer


def _nested(name: str, layer: LoraLayer) -> bool:
    """An inner parameter wrapper: unwrapping its outermost one removes it too."""
    return isinstance(layer, LoraParameter) and name.endswith(".base_layer")


def _forget_adapters(model: nn.Module):
    for attribute in ("lora_configs", "lora_initial_factors"):
        if hasattr(model, attribute):
            delattr(model, attribute)


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging: the base model as it was."""
    unmerge(model)
    for name in adapter_names(model):
        delete_adapter(model, name)
    _unwrap_all(model, [])
    unwrap_tokens(model)
    _forget_adapters(model)
    return model


# --- combining adapters -----------------------------------------------------------------------
def combine(model: nn.Module, names: list[str], weights: list[float], new_name: str,
            method: str = "cat", rank: int | None = None) -> LoraConfig:
    """New adapter whose update is sum_i w_i dW_i: exactly (`cat`, rank = sum of ranks) or its
    best rank-`rank` approximation (`svd`). Returns the new adapter's config."""
    if len(names) != len(weights):
        raise LoraError(f"combine: {len(names)} adapters but {len(weights)} weights")
    for name in names:
        _require(model, name)
        if model.lora_configs[name].use_dora:
            raise LoraError(f"combine: adapter {name!r} uses DoRA; magnitude vectors do not add linearly")
    if method not in ("cat", "svd") or (method == "svd" and not rank):
        raise LoraError("combine: method must be 'cat', or 'svd' with a rank")
    factors = {}
    for module_name, layer in lora_layers(model):
        if isinstance(layer, LoraParameter) and any(n in layer.r for n in names):
            raise LoraError(f"combine: LoRA on the parameter {module_name}.{layer.parameter_name} (MoE experts or "
                            "router) is not supported; combine adapters of Linear layers only")
        parts = [(*layer.factors(n), w * layer.scaling[n]) for n, w in zip(names, weights) if n in layer.r]
        if not parts:
            continue
        A, B = concat_factors(parts)  # exact, rank = sum of ranks
        full = min(A.shape[1], B.shape[0])
        if method == "svd" or A.shape[0] > full:  # a rank cut, or more rank than the layer has
            A, B, _ = truncated_factors(A, B, rank if method == "svd" else full)
        factors[module_name] = A.float(), B.float()
    return attach_factors(model, new_name, factors, base_config=model.lora_configs[names[0]])


def attach_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   base_config: LoraConfig) -> LoraConfig:
    """Attach adapter `name` with given (A, B) per module and scaling 1 (alpha = r per module)."""
    ranks = {m: A.shape[0] for m, (A, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r, alpha=float(r), target_modules=[*factors], init="default",
        rank_pattern=exact_patterns(ranks, r),
        alpha_pattern={m: float(k) for m, k in exact_patterns(ranks, r).items()},
        base_model_name_or_path=base_config.base_model_name_or_path)
    attach(model, config, name, activate=False)
    layers = dict(lora_layers(model))
    for module_name, (A, B) in factors.items():
        layers[module_name].set_factors(name, A, B)
    return config
