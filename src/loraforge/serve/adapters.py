"""Adapters by name: where they live on disk (AdapterRegistry) and which sit in memory
(AdapterCache, an LRU of kernel slots).

An adapter name is a plain name: letters, digits, '.', '_' and '-', no '..', no separators.
A name that is not plain is refused before any file system access. Adapters come from the
subdirectories of the served directory, or are registered at run time from a path under one
of the allowed roots (symlinks and '..' resolved first). Every file read must itself resolve
inside the adapters directory or an allowed root: a symlinked file pointing elsewhere is refused.
An adapter is checked before it is served: its config parses, its weights fit the base model
and hold only finite values. Error messages name files and tensors, never quote file contents.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraforge import LoraError, one_line
from loraforge.core.config import LoraConfig
from loraforge.core.io import CONFIG_NAME, WEIGHTS_NAME, CheckedAdapter, attach_checked, check_adapter
from loraforge.core.layers import LoraEmbedding, LoraLayer, LoraLinear
from loraforge.core.ops import delete_adapter, lora_layers
from loraforge.serve.kernel import MultiLoraKernel
from loraforge.serve.metrics import ServeMetrics

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
SCRATCH = "serve-loading"  # the name an adapter has on the model while its factors are read
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
log = logging.getLogger("loraforge.serve")


class BadAdapterName(LoraError):
    """400: the name is not a plain adapter name."""


class AdapterNotFound(LoraError):
    """404: no adapter of that name."""


class BadAdapterPath(BadAdapterName):
    """400: a runtime lora_path that cannot be used (not resolvable, no adapter in it)."""


class AdapterForbidden(LoraError):
    """403: a runtime path outside the allowed roots."""


class AdapterLoadFailed(LoraError):
    """The adapter exists but cannot be served (corrupt file, another base model, DoRA...)."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise BadAdapterName(f"{shown(name)} is not a plain adapter name (letters, digits, '.', '_', '-'; "
                             f"at most 128 characters; no paths)")
    return name


def shown(value: object, limit: int = 64) -> str:
    """`value` as an error message may quote it: repr (escapes control characters), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class AdapterRegistry:
    """Name -> adapter directory: the subdirectories of `root` plus runtime registrations."""

    def __init__(self, root: str | Path | None, allowed_roots: list[str | Path] = ()):
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise LoraError(f"adapters directory {root} does not exist")
        self.allowed = [Path(p).resolve() for p in allowed_roots]
        self.runtime: dict[str, Path] = {}
        self.versions: Counter = Counter()  # name -> runtime (un)registrations: a reloaded name is a new adapter
        self.lock = threading.Lock()

    def available(self) -> dict[str, Path]:
        """Every servable adapter: {name: resolved directory}, sorted by name."""
        found = {}
        if self.root is not None:
            for child in self.root.iterdir():
                resolved = child.resolve()
                if NAME_RE.fullmatch(child.name) and _inside(resolved, self.root) and is_adapter_dir(resolved):
                    found[child.name] = resolved
        with self.lock:
            found.update(self.runtime)
        return dict(sorted(found.items()))

    def path_of(self, name: str) -> Path:
        """The directory of adapter `name` (BadAdapterName, AdapterNotFound)."""
        check_name(name)
        with self.lock:
            if name in self.runtime:
                return self.runtime[name]
        if self.root is not None:
            path = (self.root / name).resolve()
            if not _inside(path, self.root):
                raise BadAdapterName(f"adapter {name!r} resolves outside the adapters directory")
            if is_adapter_dir(path):
                return path
        raise AdapterNotFound(f"the model '{name}' does not exist")

    def version(self, name: str) -> int:
        with self.lock:
            return self.versions[name]

    def is_runtime(self, name: str) -> bool:
        with self.lock:
            return name in self.runtime

    def register(self, name: str, path: str) -> Path:
        """Add a runtime adapter from `path`, which must resolve under an allowed root, with
        every adapter file inside it too."""
        check_name(name)
        if not isinstance(path, str) or not path or "\x00" in path:
            raise BadAdapterPath("lora_path must be a non-empty string without NUL bytes")
        try:
            resolved = Path(path).expanduser().resolve()
            is_dir = is_adapter_dir(resolved)
        except (OSError, RuntimeError) as err:  # too long, a symlink loop...
            raise BadAdapterPath(f"lora_path {shown(path)} cannot be resolved ({type(err).__name__})") from None
        if not any(_inside(resolved, root) for root in self.allowed):
            raise AdapterForbidden(f"lora_path {shown(path)} is outside the allowed roots (start the server with "
                                   f"--allow-root to permit a directory)")
        if not is_dir:
            raise BadAdapterPath(f"lora_path {shown(path)} holds no adapter ({CONFIG_NAME} + {WEIGHTS_NAME})")
        self.confine(resolved)
        taken = set(self.available())
        with self.lock:
            if name in self.runtime or name in taken:
                raise BadAdapterName(f"an adapter named '{name}' is already being served")
            self.runtime[name] = resolved
            self.versions[name] += 1
        return resolved

    def confine(self, directory: Path):
        """AdapterForbidden when one of the adapter files in `directory` resolves (through a
        symlink) outside the adapters directory and the allowed roots."""
        roots = [r for r in (self.root, *self.allowed) if r is not None]
        for file_name in ADAPTER_FILES:
            resolved = (directory / file_name).resolve()
            if not any(_inside(resolved, root) for root in roots):
                raise AdapterForbidden(f"{directory.name}/{file_name} resolves outside the adapters directory "
                                       f"and the allowed roots; refusing to read it")

    def stamp(self, directory: Path) -> tuple:
        """What identifies the current content of an adapter's files (changes when they are rewritten)."""
        stamp = [str(directory)]
        for file_name in ADAPTER_FILES:
            try:
                info = os.stat(directory / file_name)
                stamp.append((info.st_ino, info.st_size, info.st_mtime_ns))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def unregister(self, name: str):
        check_name(name)
        with self.lock:
            if name in self.runtime:
                del self.runtime[name]
                self.versions[name] += 1
                return
        if name in self.available():
            raise BadAdapterName(f"adapter '{name}' is served from the adapters directory; remove its "
                                 f"directory instead of unloading it")
        raise AdapterNotFound(f"the model '{name}' does not exist")


@dataclass
class Loaded:
    slot: int
    stamp: tuple  # AdapterRegistry.stamp of the files it was read from
    rank: int


class AdapterCache:
    """At most `kernel.capacity` adapters in kernel slots, least recently used evicted first.
    An adapter pinned by a running request is never evicted. Engine thread only."""

    def __init__(self, model: nn.Module, kernel: MultiLoraKernel, registry: AdapterRegistry,
                 metrics: ServeMetrics | None = None):
        self.model, self.kernel, self.registry = model, kernel, registry
        self.metrics = metrics or ServeMetrics()
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()
        self.pins: Counter = Counter()
        self.retired: set[str] = set()  # unloaded while running: evicted when unpinned
        self.loads = self.evictions = 0

    def acquire(self, name: str) -> int | None:
        """Pin adapter `name` and return its slot, loading it if needed; None when every slot
        is pinned (try again later). Raises AdapterNotFound / AdapterLoadFailed."""
        path = self.registry.path_of(name)
        stamp = self.registry.stamp(path)
        entry = self.loaded.get(name)
        if entry is not None and entry.stamp != stamp:  # re-registered or rewritten: reload when free
            if self.pins[name]:
                return None
            self.evict(name)
            entry = None
        if entry is None:
            slot = self._free_slot()
            if slot is None:
                return None
            entry = self._load(name, path, stamp, slot)
        self.loaded.move_to_end(name)
        self.retired.discard(name)
        self.pins[name] += 1
        return entry.slot

    def release(self, name: str):
        self.pins[name] -= 1
        if self.pins[name] <= 0:
            del self.pins[name]
            if name in self.retired:
                self.retire(name)

    def retire(self, name: str):
        """Drop `name` from memory now, or when its last running request finishes."""
        self.retired.discard(name)
        if name in self.loaded and not self.evict(name):
            self.retired.add(name)

    def evict(self, name: str) -> bool:
        """Free the slot of `name` unless a running request pins it."""
        if name not in self.loaded or self.pins[name]:
            return False
        self.kernel.clear_slot(self.loaded.pop(name).slot)
        self.evictions += 1
        self.metrics.adapter_evictions.inc()
        self.metrics.loaded_adapters.set(len(self.loaded))
        return True

    def _free_slot(self) -> int | None:
        used = {e.slot for e in self.loaded.values()}
        free = [s for s in range(1, self.kernel.capacity + 1) if s not in used]
        if free:
            return free[0]
        for name in list(self.loaded):  # least recently used first
            if not self.pins[name]:
                slot = self.loaded[name].slot
                self.evict(name)
                return slot
        return None

    def check(self, name: str):
        """Read and check adapter `name` without giving it a slot (AdapterLoadFailed)."""
        self._read(name, self.registry.path_of(name))

    def _read(self, name: str, path: Path) -> dict:
        try:
            self.registry.confine(path)
            return read_factors(self.model, path)
        except LoraError as err:
            raise AdapterLoadFailed(f"adapter '{name}' cannot be loaded: {one_line(err, 400)}") from None
        except Exception as err:  # noqa: BLE001 - a broken file must fail its own requests only
            log.warning("adapter %r cannot be loaded", name, exc_info=err)
            raise AdapterLoadFailed(f"adapter '{name}' cannot be loaded ({type(err).__name__})") from None

    def _load(self, name: str, path: Path, stamp: tuple, slot: int) -> Loaded:
        factors = self._read(name, path)
        self.kernel.set_slot(slot, factors)
        self.loads += 1
        entry = Loaded(slot, stamp, max((A.shape[0] // getattr(layer, "num_experts", 1)
                                         for layer, (A, _, _) in factors.items()), default=0))
        self.loaded[name] = entry
        self.metrics.adapter_loads.inc()
        self.metrics.loaded_adapters.set(len(self.loaded))
        return entry


def peek_config(path: Path) -> LoraConfig:
    """The adapter's config, refusing what the batched kernel cannot serve unmerged."""
    try:
        data = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise LoraError(f"{CONFIG_NAME}: not readable UTF-8 JSON ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise LoraError(f"{CONFIG_NAME}: expected a JSON object")
    try:
        config = LoraConfig.from_peft(data, where=CONFIG_NAME)
    except (LoraError, TypeError, ValueError) as err:  # its messages may quote the file: keep them in the log
        log.warning("%s: %s", path / CONFIG_NAME, one_line(err, 300))
        raise LoraError(f"{CONFIG_NAME} is not a LoRA config this server can use "
                        f"(loraforge/PEFT format, peft_type LORA)") from None
    if config.use_dora:
        raise LoraError("DoRA adapters are not served unmerged; serve it alone with --merge")
    if config.modules_to_save:
        raise LoraError("adapters with modules_to_save are not served unmerged; serve it alone with --merge")
    if config.trainable_token_indices is not None:  # new tokens: the base's vocabulary and tokenizer lack them
        raise LoraError("adapters with trainable tokens (--add-tokens) need the grown vocabulary and tokenizer: "
                        "merge it first (loraforge merge) and serve the merged model")
    return config


@torch.no_grad()
def read_factors(model: nn.Module, path: Path) -> dict[LoraLayer, tuple[torch.Tensor, torch.Tensor, float]]:
    """{layer: (A, B, scaling)} of the adapter at `path`, checked against `model` by
    loraforge's own loader (core.io.check_adapter). When every module it adapts is already a
    Linear LoRA wrapper (after the first adapter, the usual case), the factors are taken from
    the file directly; otherwise the adapter is attached under a scratch name, read, then
    removed, so the model keeps only (empty) wrappers, whose router serves the stacked factors."""
    peek_config(path)
    checked = check_adapter(model, path)
    named = _direct_factors(model, checked)
    if named is None:
        named = _attached_factors(model, checked)
    for module_name, (_, A, B, scaling) in named.items():
        check_factors(module_name, A, B, scaling)
    return {layer: (A, B, scaling) for layer, A, B, scaling in named.values()}


def _direct_factors(model: nn.Module, checked: CheckedAdapter) -> dict | None:
    """{module: (layer, A, B, scaling)} as the attach path would hold them (each layer's device
    and dtype, the config's scaling), or None when a module is not yet wrapped or not Linear."""
    layers = dict(lora_layers(model))
    if checked.parameter_keys or not all(isinstance(layers.get(m), LoraLinear) for m in checked.modules):
        return None
    named = {}
    for module_name, parts in checked.modules.items():
        layer = layers[module_name]
        device, dtype = layer.factor_placement()
        named[module_name] = (layer, parts["lora_A"].to(device, dtype, copy=True),
                              parts["lora_B"].to(device, dtype, copy=True), checked.config.scaling_for(module_name))
    return named


def _attached_factors(model: nn.Module, checked: CheckedAdapter) -> dict:
    """{module: (layer, A, B, scaling)} read from the adapter attached under a scratch name,
    which is removed again (the wrappers it made stay)."""
    attach_checked(model, checked, SCRATCH, activate=False)
    try:
        named = {}
        for module_name, layer in lora_layers(model):
            if SCRATCH not in layer.r:
                continue
            if isinstance(layer, LoraEmbedding):
                raise LoraError(f"LoRA on embeddings ({module_name}) is not served unmerged; use --merge")
            A, B = layer.factors(SCRATCH)
            named[module_name] = (layer, A.detach().clone(), B.detach().clone(), layer.scaling[SCRATCH])
        return named
    finally:
        delete_adapter(model, SCRATCH)


def check_factors(module_name: str, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """Refuse factors holding NaN or infinity (a diverged run), also after scaling: they would
    turn every output of the adapter into garbage."""
    if not math.isfinite(scaling):
        raise LoraError(f"{module_name}: the scaling (lora_alpha / r) is not finite")
    for label, tensor in (("lora_A", A), ("lora_B", B), ("lora_B x scaling", B * scaling)):
        if not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"tensor {module_name}.{label} holds NaN or infinite values; refusing a broken adapter")
