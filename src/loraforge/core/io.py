"""Adapter files in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (A r x in, B out x r),
`.lora_embedding_A` / `.lora_embedding_B` for embeddings, `.lora_magnitude_vector` for DoRA and
`base_model.model.<module path>.<param>` for modules_to_save; the adapter's name is not in the keys.
Writes are atomic (temp file + rename); only safetensors is read, so loading never runs code.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from loraforge import LoraError, one_line
from loraforge.core.config import LoraConfig, exact_patterns, parameter_matches
from loraforge.core.layers import LoraConv1D, LoraEmbedding, LoraLayer, LoraParameter
from loraforge.core.ops import (ModulesToSave, _matrix_shape, adaptable_modules, attach, find_targets, lora_layers,
                             own_parameters, parameter_owners, saved_module_paths)
from loraforge.core.tokens import check_token_fits, copy_token_weights, token_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# --- atomic writes ----------------------------------------------------------------------------
def _temp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _write_bytes_to(tmp: Path, data: bytes):
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _save_safetensors_to(tmp: Path, tensors: dict[str, torch.Tensor], metadata=None):
    # looked up at call time, so that safetensors.torch.save_file can be patched in tests
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                metadata=metadata)


def atomic_write_files(writers: dict[Path, Callable[[Path], None]]):
    """Write several files all-or-nothing as far as a filesystem allows: every file goes to a temp
    file beside its target first; targets are replaced (renamed over) only once all are written.
    `writers` maps each target path to a function that writes the content to a given temp path."""
    temps: dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            temps[path] = _temp_beside(Path(path))
            write(temps[path])
            os.chmod(temps[path], 0o666 & ~_UMASK)  # temp files are 0600; the result gets ordinary permissions
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes):
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    atomic_write_files({Path(path): lambda tmp: _write_bytes_to(tmp, data)})


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None):
    atomic_write_files({Path(path): lambda tmp: _save_safetensors_to(tmp, tensors, metadata)})


def check_apart(out: str | os.PathLike, inputs: list, flag: str = "--out"):
    """Refuse an output that is, contains or lies inside one of the inputs: writing it would
    destroy what is being read (with --force or not)."""
    target = Path(out).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            relation = "is" if target == src else "contains" if src.is_relative_to(target) else "lies inside"
            raise LoraError(f"{flag} {out} {relation} the input {source}; write the result somewhere else")


# --- model -> tensors ---------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name` as PEFT-format tensors (keys without the adapter name)."""
    tensors = {}
    for module_name, layer in lora_layers(model):
        if name not in layer.r:
            continue
        key = PREFIX + module_name
        A, B = layer.factors(name)
        if isinstance(layer, LoraEmbedding):
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = A, B
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
            if name in layer.lora_magnitude_vector:
                tensors[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for pname, p in module.modules_to_save[name].state_dict().items():
                tensors[f"{PREFIX}{module_name}.{pname}"] = p
    tensors.update(token_state_dict(model, name, PREFIX))  # trainable tokens: PEFT's token_adapter keys
    return {k: _full(v) for k, v in tensors.items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor: FSDP2 shards parameters as DTensors; gather them before writing."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def target_names(model: nn.Module, name: str) -> list[str]:
    """Target names for adapter_config.json: the modules' last name parts (`q_proj`, what PEFT
    and vLLM expect) when those select exactly the adapted modules, else full module paths."""
    adapted = {m for m, layer in lora_layers(model) if name in layer.r and not isinstance(layer, LoraParameter)}
    short = {m.split(".")[-1] for m in adapted}
    selected = {m for m in adaptable_modules(model) if m.split(".")[-1] in short}
    return sorted(short) if selected == adapted else sorted(adapted)


def adapted_parameters(model: nn.Module, name: str) -> dict[str, LoraParameter]:
    """{parameter path: wrapper} of adapter `name`'s parameter targets (MoE experts, routers)."""
    return {f"{path.split('.base_layer')[0]}.{layer.parameter_name}": layer for path, layer in lora_layers(model)
            if isinstance(layer, LoraParameter) and name in layer.r}


def parameter_entries(model: nn.Module, name: str, config: LoraConfig) -> tuple[list[str], dict, dict]:
    """PEFT's `target_parameters` for adapter `name` (short suffixes such as `gate_up_proj` and
    `gate.weight` when they select exactly the adapted parameters, else full paths), and the
    rank / alpha patterns its parameters need beyond r and alpha (a fused gate_up_proj: 2r)."""
    adapted = adapted_parameters(model, name)
    if not adapted:
        return [], {}, {}
    short = {".".join(p.split(".")[-2:]) if p.endswith(".weight") else p.split(".")[-1] for p in adapted}
    every = {f"{o}.{n}" for o, m in parameter_owners(model).items() for n in own_parameters(m)}
    selected = {p for p in every if parameter_matches(p, sorted(short))}
    targets = sorted(short) if selected == set(adapted) else sorted(adapted)
    ranks = exact_patterns({p: layer.r[name] for p, layer in adapted.items()}, config.r)
    alphas = exact_patterns({p: layer.lora_alpha[name] for p, layer in adapted.items()}, config.alpha)
    return targets, ranks, alphas


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 write: bool = True) -> Path:
    """Write adapter `name` as a PEFT-compatible directory (atomic per file). Under FSDP every
    process must call this (gathering the shards is collective); only those with `write` write."""
    configs = getattr(model, "lora_configs", {})
    if name not in configs:
        raise LoraError(f"cannot save adapter {name!r}: the model has {', '.join(configs) or 'no adapters'}")
    tensors, config = _pissa_to_lora(model, name, adapter_state_dict(model, name), configs[name])
    if not write:
        return Path(path)
    parameters, ranks, alphas = parameter_entries(model, name, config)
    peft_config = config.to_peft(target_names(model, name), fan_in_fan_out=_has_conv1d(model, name),
                                 target_parameters=parameters)
    peft_config["rank_pattern"].update(ranks)
    peft_config["alpha_pattern"].update(alphas)
    write_adapter_dir(path, peft_config, tensors)
    return Path(path)


def write_adapter_dir(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> int:
    """The one writer of adapter directories: adapter_config.json (a PEFT config dict) and
    adapter_model.safetensors, both or neither (a failed write leaves the previous pair intact).
    Returns the weights file's size in bytes."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LoraError(f"cannot create adapter directory {path}: {err.strerror or err}") from None
    config_bytes = _json_bytes(config)
    atomic_write_files({
        path / WEIGHTS_NAME: lambda tmp: _save_safetensors_to(tmp, tensors, {"format": "pt"}),
        path / CONFIG_NAME: lambda tmp: _write_bytes_to(tmp, config_bytes),
    })
    return (path / WEIGHTS_NAME).stat().st_size


def _has_conv1d(model: nn.Module, name: str) -> bool:
    """PEFT records GPT-2-style Conv1D targets (weights stored in x out) as fan_in_fan_out."""
    return any(isinstance(layer, LoraConv1D) and name in layer.r for _, layer in lora_layers(model))


def _pissa_to_lora(model, name, tensors, config):
    """A PiSSA adapter changes the base weights; saved as-is it would need that residual base.
    Convert to a plain LoRA of rank 2r on the original base, as PEFT offers: dW = s(BA - B0A0)."""
    if config.init != "pissa":
        return tensors, config
    initial = getattr(model, "lora_initial_factors", {}).get(name, {})
    for module_name, (A0, B0) in initial.items():
        key = PREFIX + module_name
        tensors[f"{key}.lora_A.weight"] = torch.cat([tensors[f"{key}.lora_A.weight"], A0], dim=0)
        tensors[f"{key}.lora_B.weight"] = torch.cat([tensors[f"{key}.lora_B.weight"], -B0], dim=1)
    factor = 2 ** 0.5 if config.use_rslora else 2
    converted = LoraConfig(**{**config.to_dict(), "r": 2 * config.r, "alpha": config.alpha * factor,
                              "init": "default",
                              "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
                              "alpha_pattern": {k: v * factor for k, v in config.alpha_pattern.items()}})
    return tensors, converted


# --- files -> model ---------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory; refuses pickle files and reports broken files in one line."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise LoraError(f"refusing to load {path}: pickle files can run code; convert it to safetensors")
    if not path.is_dir():
        raise LoraError(f"adapter directory {path} does not exist")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.exists():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise LoraError(f"refusing to load {path / pickles[0]}: pickle files can run code; "
                            f"only {WEIGHTS_NAME} is read (convert it to safetensors)")
        raise LoraError(f"{path} has no {WEIGHTS_NAME}")
    if not config_file.exists():
        raise LoraError(f"{path} has no {CONFIG_NAME}")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise LoraError(f"{config_file}: not valid JSON ({one_line(err)})") from None
    except OSError as err:
        raise LoraError(f"{config_file}: cannot be read ({err.strerror or one_line(err)})") from None
    if not isinstance(data, dict):
        raise LoraError(f"{config_file}: expected a JSON object")
    config = LoraConfig.from_peft(data, where=str(config_file))
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"{weights_file}: not a readable safetensors file ({one_line(err)})") from None
    check_finite(tensors, weights_file)
    return config, tensors


def check_finite(tensors: dict[str, torch.Tensor], where: str | os.PathLike):
    """Refuse weights holding NaN or infinity (a diverged run): they would silently poison every
    output of the model they are loaded into."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise LoraError(f"{where}: tensor {key} holds {bad} values; refusing a broken adapter")


def group_by_module(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {'lora_A': A, 'lora_B': B, ...}} from PEFT keys."""
    pattern = re.compile(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                         r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = pattern.fullmatch(bare)
        if match:
            modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    return modules


@dataclass
class CheckedAdapter:
    """An adapter file read and checked against a model, not yet attached (see check_adapter)."""
    config: LoraConfig  # per-module ranks and alphas from the stored shapes (ranks_from_tensors)
    modules: dict[str, dict[str, torch.Tensor]]  # {stored module path: {"lora_A": ..., "lora_B": ...}}
    tensors: dict[str, torch.Tensor]  # every stored tensor, by key
    parameter_keys: dict[str, str]  # {stored module path: parameter path} of parameter targets


def check_adapter(model: nn.Module, path: str | os.PathLike) -> CheckedAdapter:
    """Read the adapter at `path` and check that it fits `model` (LoraError naming the module
    and shapes when not); the model is not touched."""
    config, tensors = read_adapter(path)
    modules = group_by_module(tensors, str(path))
    if not modules:
        raise LoraError(f"{path}/{WEIGHTS_NAME} holds no LoRA weights (keys like {PREFIX}<module>.lora_A.weight)")
    keys = parameter_keys(model, config, modules, path)
    config = ranks_from_tensors(config, modules, expert_counts(model, keys))
    check_fits(model, config, modules, tensors, path, keys)
    return CheckedAdapter(config, modules, tensors, keys)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 trainable: bool = False, activate: bool = True) -> LoraConfig:
    """Attach the adapter stored at `path` under `name`. The model is left untouched when the
    adapter does not fit it (missing module, wrong shape): the error names module and shapes."""
    config = attach_checked(model, check_adapter(model, path), name, activate=activate)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return config


def attach_checked(model: nn.Module, checked: CheckedAdapter, name: str, activate: bool = True) -> LoraConfig:
    """Attach an adapter already read and checked (check_adapter) under `name`, with its weights."""
    attach(model, checked.config, name, activate=activate)
    _copy_weights(model, name, checked.modules, checked.tensors)
    return checked.config


def ranks_from_tensors(config: LoraConfig, modules: dict, experts: dict[str, tuple[str, int]] | None = None
                       ) -> LoraConfig:
    """Trust the stored shapes for per-module ranks; targets are exactly the stored modules.
    `experts` ({key path: (parameter path, experts)}, see parameter_keys) names the stored
    parameter targets: their lora_A holds r rows per expert (None: not known without the model;
    the config's target_parameters are kept)."""
    known, experts = experts is not None, experts or {}
    ranks = {}
    for m, t in modules.items():
        rows = (t.get("lora_A", t.get("lora_embedding_A"))).shape[0]
        target, count = experts.get(m, (m, 1))
        ranks[target] = max(rows // count, 1)
    alphas = {m: config.alpha_for(m) for m in ranks}
    parameters = sorted(target for target, _ in experts.values()) if known else config.target_parameters
    return LoraConfig(**{**config.to_dict(), "target_modules": sorted(set(modules) - set(experts)),
                         "target_parameters": parameters or None,
                         "rank_pattern": exact_patterns(ranks, config.r),
                         "alpha_pattern": exact_patterns(alphas, config.alpha), "init": "default",
                         "exclude_modules": None})


def parameter_keys(model: nn.Module, config: LoraConfig, modules: dict, path) -> dict[str, str]:
    """{stored module path: parameter path} for the LoRA weights of parameter targets. PEFT nests
    one wrapper per targeted parameter of a module, the first-defined innermost: of n targeted
    parameters, the one at depth d (`experts` + d x `.base_layer`) is the (n-1-d)-th; which
    ones are targeted, adapter_config.json's target_parameters says."""
    owners, available = parameter_owners(model), adaptable_modules(model)
    by_owner: dict[str, dict[int, str]] = {}
    for key_path in modules:
        owner, depth = key_path, 0
        while owner.endswith(".base_layer"):
            owner, depth = owner[: -len(".base_layer")], depth + 1
        if key_path not in available and owner in owners:
            by_owner.setdefault(owner, {})[depth] = key_path
    found = {}
    for owner, depths in by_owner.items():
        targeted = [n for n in own_parameters(owners[owner])
                    if parameter_matches(f"{owner}.{n}", config.target_parameters)]
        if sorted(depths) != list(range(len(targeted))):
            raise LoraError(f"adapter {path} stores LoRA weights for {len(depths)} parameter(s) of {owner}, but its "
                            f"target_parameters select {len(targeted)} of its parameters "
                            f"({', '.join(own_parameters(owners[owner]))})")
        for depth, key_path in depths.items():
            found[key_path] = f"{owner}.{targeted[len(targeted) - 1 - depth]}"
    return found


def expert_counts(model: nn.Module, keys: dict[str, str]) -> dict[str, tuple[str, int]]:
    """{stored module path: (parameter path, number of experts: 1 for a 2-D parameter)}."""
    owners = parameter_owners(model)
    counts = {}
    for key_path, target in keys.items():
        owner, _, pname = target.rpartition(".")
        shape = own_parameters(owners[owner])[pname]
        counts[key_path] = (target, shape[0] if len(shape) == 3 else 1)
    return counts


def check_fits(model: nn.Module, config: LoraConfig, modules: dict, tensors: dict, path,
               keys: dict[str, str] | None = None) -> None:
    available = adaptable_modules(model)
    keys = keys or {}
    for module_name, parts in modules.items():
        if module_name in keys:
            check_parameter_fits(model, module_name, keys[module_name], parts, path)
            continue
        if module_name not in available:
            raise LoraError(f"adapter {path} has weights for module {module_name!r}, which this model does not have")
        out_f, in_f = _matrix_shape(available[module_name])
        A = parts.get("lora_A", parts.get("lora_embedding_A"))
        B = parts.get("lora_B", parts.get("lora_embedding_B"))
        if A is None or B is None:
            raise LoraError(f"adapter {path}: module {module_name!r} lacks its lora_A or lora_B tensor")
        r = A.shape[0]
        checks = [("lora_A", A, (r, in_f)), ("lora_B", B, (out_f, r))]
        if config.use_dora:
            if "lora_magnitude_vector" not in parts:
                raise LoraError(f"adapter {path}: DoRA module {module_name!r} lacks its lora_magnitude_vector tensor")
            checks.append(("lora_magnitude_vector", parts["lora_magnitude_vector"], (out_f,)))
        for label, tensor, expected in checks:
            if tuple(tensor.shape) != expected:
                raise LoraError(f"adapter {path}: {module_name}.{label} has shape {tuple(tensor.shape)} but the "
                                f"model's {module_name} needs {expected} (out x in = {out_f} x {in_f}); "
                                f"was it trained on another base model?")
    for entry in config.modules_to_save:
        paths = saved_module_paths(model, entry)
        if not paths:
            raise LoraError(f"adapter {path} lists {entry!r} in modules_to_save, which this model does not have")
        for module_name in paths:
            keys = [k for k in tensors if k.startswith(f"{PREFIX}{module_name}.") and ".lora_" not in k]
            if not keys:
                raise LoraError(f"adapter {path} lists {module_name!r} in modules_to_save but stores no weights for it")
    if config.trainable_token_indices is not None:
        check_token_fits(model, config.trainable_token_indices, tensors, PREFIX, path)
    find_targets(model, config)  # raises if nothing matches


def check_parameter_fits(model: nn.Module, key_path: str, target: str, parts: dict, path) -> None:
    """The stored factors of a parameter target have PEFT's shapes: A (r*E, in), B (out, r*E)."""
    owner, _, pname = target.rpartition(".")
    shape = own_parameters(parameter_owners(model)[owner])[pname]
    experts = shape[0] if len(shape) == 3 else 1
    out_f, in_f = shape[-2:]
    if experts > 1 and getattr(parameter_owners(model)[owner], "is_transposed", False):  # (E, in, out)
        in_f, out_f = out_f, in_f
    A, B = parts.get("lora_A"), parts.get("lora_B")
    if A is None or B is None:
        raise LoraError(f"adapter {path}: {key_path} (LoRA on {target}) lacks its lora_A or lora_B tensor")
    rows = A.shape[0] if A.dim() == 2 else -1
    if A.dim() != 2 or rows % experts or tuple(A.shape) != (rows, in_f) or tuple(B.shape) != (out_f, rows):
        raise LoraError(f"adapter {path}: {key_path} (LoRA on {target}, shape {tuple(shape)}) has lora_A "
                        f"{tuple(A.shape)} and lora_B {tuple(B.shape)}, but needs ({experts}*r, {in_f}) and "
                        f"({out_f}, {experts}*r); was it trained on another base model?")


def _copy_weights(model: nn.Module, name: str, modules: dict, tensors: dict) -> None:
    layers = dict(lora_layers(model))
    for module_name, parts in modules.items():
        layer: LoraLayer = layers[module_name]
        A = parts.get("lora_A", parts.get("lora_embedding_A"))
        B = parts.get("lora_B", parts.get("lora_embedding_B"))
        layer.set_factors(name, A, B)
        if "lora_magnitude_vector" in parts:
            with torch.no_grad():
                layer.lora_magnitude_vector[name].copy_(parts["lora_magnitude_vector"])
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            prefix = f"{PREFIX}{module_name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.modules_to_save[name].load_state_dict(state)
    copy_token_weights(model, name, tensors, PREFIX)
