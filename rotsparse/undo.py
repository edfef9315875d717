"""All-or-nothing changes to a model: `all_or_nothing(model)` undoes everything done inside it on any exception.

An undo log, not a copy. On entry it keeps references (no tensor data) to what may be replaced: every module's
attribute dictionaries (parameter, buffer, submodule and hook slots), every parameter's ``requires_grad`` and
``grad``, the attributes of the model's config (and its text config), and the entries of accelerate offload
stores. While the block runs, a `TorchFunctionMode` sees every in-place torch operation; the first time one
writes into the storage of a tensor the model held on entry (a parameter or buffer), that tensor is cloned to
the CPU before the write. Offloaded tensors are never written in place (`rotsparse.offload` replaces store
entries); a ``.dat`` file of a disk store that is about to be overwritten is first copied into a folder beside
it. On an exception (KeyboardInterrupt and MemoryError included) the clones are copied back, the slots,
flags, config attributes, store entries and files are restored, and the exception propagates; on success the
log is dropped. Extra memory: one CPU copy of each tensor changed in place (none for offloaded tensors; disk
space for overwritten ``.dat`` files). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping

import torch
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
from torch import nn
from torch.overrides import TorchFunctionMode

from . import offload

__all__ = ["all_or_nothing"]

_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                     "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
_NOT_DATA = {"requires_grad_", "retain_grad_", "share_memory_", "record_stream_"}


def _writes_in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__") and name not in _NOT_DATA)


def _storage_key(tensor: torch.Tensor) -> int | None:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.is_sparse:
        return None
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        return None


class _InPlaceRecorder(TorchFunctionMode):
    """Clones a watched tensor to the CPU the first time an in-place operation is about to write into it."""

    def __init__(self, watched: dict[int, list[torch.Tensor]]):
        super().__init__()
        self.watched = watched
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _record(self, target) -> None:
        key = _storage_key(target)
        for tensor in self.watched.pop(key, ()) if key is not None else ():  # all tensors sharing the storage
            self.saved.append((tensor, tensor.detach().to("cpu", copy=True)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched:
            if args and _writes_in_place(func):
                self._record(args[0])
            out = kwargs.get("out")
            if out is not None:
                for target in (out if isinstance(out, (tuple, list)) else (out,)):
                    self._record(target)
        return func(*args, **kwargs)


class _ModuleSlots:
    """A module's attribute dictionary and the containers in it (parameters, buffers, submodules, hooks), kept
    by reference; `restore` puts the same container objects back with their entry-time contents."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.attributes = dict(module.__dict__)
        self.contents = {name: (value, value.copy()) for name, value in self.attributes.items()
                         if isinstance(value, (dict, set, list))}

    def restore(self) -> None:
        for container, content in self.contents.values():
            container.clear()
            container.update(content) if not isinstance(container, list) else container.extend(content)
        self.module.__dict__.clear()
        self.module.__dict__.update(self.attributes)


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = getattr(config, "get_text_config", lambda: None)()
    return [config] if text is None or text is config else [config, text]


def _offload_stores(model: nn.Module) -> list:
    """The distinct accelerate stores (loader or mapping) behind the model's offloading hooks."""
    stores, seen = [], set()
    for module in model.modules():
        for hook in offload._align_hooks(module):
            weights_map = getattr(hook, "weights_map", None)
            store = weights_map.dataset if isinstance(weights_map, PrefixedDataset) else weights_map
            if store is not None and id(store) not in seen:
                seen.add(id(store))
                stores.append(store)
    return stores


class _StoreEntries:
    """Entry-time entries of one offload store (references: `rotsparse.offload` replaces entries, never writes
    into them) and copies of the disk files it is about to overwrite."""

    def __init__(self, store):
        self.store = store
        if isinstance(store, OffloadedWeightsLoader):
            self.state = (dict(store.state_dict), dict(store.index), list(store.all_keys), store.save_folder)
        elif isinstance(store, MutableMapping):
            self.state = dict(store)
        else:
            self.state = None
        self.backups: dict[str, str] = {}
        self.folder: str | None = None

    def before_write(self, loader, path: str) -> None:
        if loader is not self.store or path in self.backups or not os.path.exists(path):
            return
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="rotsparse-undo-", dir=os.path.dirname(path) or None)
        backup = os.path.join(self.folder, str(len(self.backups)))
        shutil.copyfile(path, backup)
        self.backups[path] = backup

    def restore(self) -> None:
        store = self.store
        if isinstance(store, OffloadedWeightsLoader):
            state_dict, index, all_keys, save_folder = self.state
            store.state_dict.clear()
            store.state_dict.update(state_dict)
            store.index.clear()
            store.index.update(index)
            store.all_keys[:] = all_keys
            store.save_folder = save_folder
        elif isinstance(store, MutableMapping):
            for key in [key for key in store if key not in self.state]:
                del store[key]
            store.update(self.state)
        for path, backup in self.backups.items():
            shutil.copyfile(backup, path)

    def discard(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Run the block; on any exception restore `model` (weights, module slots, hooks, config, offload stores)
    to its state on entry and re-raise. Nested use is allowed (the inner block logs into its own record)."""
    slots = [_ModuleSlots(module) for module in model.modules()]
    flags = [(parameter, parameter.requires_grad, parameter.grad) for parameter in model.parameters()]
    configs = [(config, dict(config.__dict__)) for config in _configs(model)]
    stores = [_StoreEntries(store) for store in _offload_stores(model)]
    watched: dict[int, list[torch.Tensor]] = {}
    for tensor in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        key = _storage_key(tensor)
        if key is not None:
            watched.setdefault(key, []).append(tensor)
    recorder = _InPlaceRecorder(watched)
    listeners = [store.before_write for store in stores]
    offload.BEFORE_DISK_WRITE.extend(listeners)
    try:
        with recorder:
            yield
    except BaseException:
        with torch.no_grad():
            for tensor, saved in reversed(recorder.saved):
                tensor.copy_(saved.to(tensor.device))
        for entry in slots:
            entry.restore()
        for parameter, requires_grad, grad in flags:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad
        for config, attributes in configs:
            config.__dict__.clear()
            config.__dict__.update(attributes)
        for store in stores:
            store.restore()
        raise
    finally:
        for listener in listeners:
            offload.BEFORE_DISK_WRITE.remove(listener)
        for store in stores:
            store.discard()
        recorder.saved.clear()
