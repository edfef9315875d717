"""Sparsify models dispatched by `accelerate` (``device_map`` with CPU / disk offload), one layer at a time.

How accelerate offloads (1.15): for every module of an offloaded block it attaches an ``AlignDevicesHook``
with ``offload=True``. The module's parameters live on the ``meta`` device; their values are in the hook's
``weights_map``, a ``PrefixedDataset`` over one ``OffloadedWeightsLoader`` (a CPU dict for modules offloaded
to the CPU while a GPU computes, memory-mapped ``.dat`` files or the original safetensors checkpoint for
modules offloaded to disk). Each forward loads the values onto the hook's execution device and puts the
parameters back on ``meta`` afterwards. Modules placed directly on a device carry hooks with
``offload=False`` that only move inputs; their weights are ordinary tensors.

What rotsparse does with such a model (``rotsparse.sparsify(model, ...)`` works unchanged):

* Forwards (calibration) already run layer by layer through the hooks. `materialized` (read-only, as
  ``runner.layerwise`` uses it) loads one layer once for all calibration sequences and the
  weight-reading statistics, instead of once per sequence.
* Weight surgery (folding rotations and scales) runs inside ``materialized(layer)``: the layer's offloaded
  tensors are loaded onto the execution device (the GPU when there is one; the CPU here), the hooks are
  told not to offload (``hook.offload = False``) so forwards inside see the real tensors, and on exit the
  modified values are written back into the same store (CPU dict entry, or a ``.dat`` file in the
  loader's offload folder through accelerate's own ``offload_weight`` + index update; a checkpoint the
  model was loaded from is never written to) and the parameters return to ``meta``. Tied parameters loaded
  together stay tied; parameters replaced inside (``Family.untie_embeddings``) are written under their own keys.
  Buffers (rotary tables, rotsparse's output rotations) are kept on the execution device, not offloaded.
* Installing Top-K needs no data: `adopt_hooks` gives the new `TopKLinear` (same parameter names) the
  hooks of the ``nn.Linear`` it replaces, reading the same store entries. An offloaded `TopKLinear` gets
  `InputMajorOffloadHook`, which re-lays out the loaded (out, in) weight input-channel-major for the
  decode kernel.

Peak host memory while sparsifying: the runtime and the modules placed on the CPU (bounded by
``max_memory["cpu"]``), plus the calibration result kept until folding (for every layer, each candidate
rotation d x d in float64: 128 MiB per layer and candidate at d = 4096), plus the larger of one layer loaded
with its float64 folding temporaries (about three float64 copies of its largest linear) and the embedding /
head fold (both tables plus two float64 copies of vocab x hidden), plus the calibration activations.
`eval/offload.py` measures it against that bound (eval/results/offload.md).

A sparsified dispatched model saves with `rotsparse.save` (``save_pretrained`` reads meta tensors back
from the hooks' stores, shard by shard) and `rotsparse.load(directory, device_map=...)` dispatches it again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, named_module_tensors, offload_weight
from torch import nn

from .kernels.reference import to_input_major

__all__ = ["InputMajorOffloadHook", "adopt_hooks", "execution_device", "is_offloaded", "materialized"]

BEFORE_DISK_WRITE: list = []
"""Callables ``(loader, path)`` called before a ``.dat`` file of a disk store is written (`rotsparse.undo`
copies a file it would overwrite)."""


def _align_hooks(module: nn.Module) -> list:
    """The accelerate ``AlignDevicesHook``s attached to `module` itself (none without accelerate)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _offload_hooks(module: nn.Module) -> list[tuple[nn.Module, object]]:
    """(submodule, hook) for every offloading hook in `module`'s subtree."""
    return [(sub, hook) for sub in module.modules() for hook in _align_hooks(sub) if hook.offload]


def is_offloaded(module: nn.Module) -> bool:
    """True when some tensors of `module` live in an accelerate offload store (meta until a forward)."""
    return bool(_offload_hooks(module))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else the device of its first
    non-meta tensor (CPU when it has none)."""
    for sub in module.modules():
        for hook in _align_hooks(sub):
            if hook.execution_device is not None:
                device = hook.execution_device
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _slot(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owning submodule, leaf name) of a dotted tensor name."""
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def _get(owner: nn.Module, leaf: str) -> torch.Tensor:
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _set(owner: nn.Module, leaf: str, tensor: torch.Tensor) -> None:
    if leaf in owner._parameters:
        owner._parameters[leaf] = tensor
    else:
        owner._buffers[leaf] = tensor


def _hook_tensor_names(sub: nn.Module, hook) -> list[str]:
    """The tensor names `hook`'s pre_forward reads from its weights_map (accelerate's own enumeration)."""
    return [name for name, _ in named_module_tensors(sub, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules, remove_non_persistent=True)]


@dataclass
class _Onloaded:
    module: nn.Module
    hooks: list[tuple[nn.Module, object]]


def _onload(modules: tuple[nn.Module, ...], device) -> list[_Onloaded]:
    """Load every offloaded tensor of `modules` onto its execution device (or `device`) and stop the hooks
    from offloading. Tensors tied together (the same Parameter object) are loaded once and stay tied."""
    loaded: dict[int, torch.Tensor] = {}
    keep_alive: list[torch.Tensor] = []
    states = []
    for module in modules:
        hooks = _offload_hooks(module)
        if not hooks:
            continue
        for sub, hook in hooks:
            target = device if device is not None else hook.execution_device
            for name in _hook_tensor_names(sub, hook):
                owner, leaf = _slot(sub, name)
                old = _get(owner, leaf)
                if id(old) not in loaded:
                    value = hook.weights_map[name].to(device=target, dtype=old.dtype)
                    if leaf in getattr(owner, "input_major_parameters", ()):
                        value = to_input_major(value)
                    if leaf in owner._parameters:
                        value = nn.Parameter(value, requires_grad=old.requires_grad)
                    loaded[id(old)] = value
                    keep_alive.append(old)
                _set(owner, leaf, loaded[id(old)])
            hook.offload = False
        states.append(_Onloaded(module, hooks))
    return states


def _offload(state: _Onloaded, writeback: bool, metas: dict) -> None:
    """Write the current tensors back into the hooks' stores (if `writeback`), put them back on meta and
    let the hooks offload again. Buffers stay on the execution device (rotations are used by forward hooks
    that run after accelerate's post-forward). `metas` is shared by the modules of one `materialized` call,
    so that tied tensors stay tied (each name they are stored under is written)."""
    for sub, hook in state.hooks:
        hook.offload_buffers = False
        for name in _hook_tensor_names(sub, hook):
            owner, leaf = _slot(sub, name)
            tensor = _get(owner, leaf)
            if tensor.device.type == "meta":
                continue
            if writeback:
                _store(hook.weights_map, name, tensor.detach())
            if id(tensor) not in metas:  # (tensor, its meta stand-in); holding the tensor keeps its id unique
                meta = tensor.detach().to("meta")
                metas[id(tensor)] = (tensor, nn.Parameter(meta, requires_grad=tensor.requires_grad)
                                     if leaf in owner._parameters else meta)
            _set(owner, leaf, metas[id(tensor)][1])
        hook.offload = True


@contextlib.contextmanager
def materialized(*modules: nn.Module, writeback: bool = True, device=None) -> Iterator[None]:
    """Within the block, the offloaded tensors of `modules` are real tensors on their execution device
    (or `device`), and forwards through the modules use them without reloading.

    writeback: on a normal exit, write the (possibly modified) parameters back into the offload store;
    with False the store is left as it was (read-only use: calibration). Modules without offloaded
    tensors (plain models, modules placed on a device) are left alone: the block is then a no-op.
    Pass tied modules (embeddings and head) in one call so that they stay tied.
    """
    states = _onload(modules, device)
    if not states:
        yield
        return
    metas: dict = {}
    try:
        yield
    except BaseException:
        for state in reversed(states):
            _offload(state, False, metas)
        raise
    for state in reversed(states):
        _offload(state, writeback, metas)


# writing into accelerate's stores ----------------------------------------------------------------

def _store(weights_map, name: str, tensor: torch.Tensor) -> None:
    """Make `weights_map[name]` return `tensor` from now on (CPU dict entry or disk file)."""
    if isinstance(weights_map, PrefixedDataset):
        key, store = weights_map.prefix + name, weights_map.dataset
    else:
        key, store = name, weights_map
    if isinstance(store, OffloadedWeightsLoader):
        if key in store.state_dict:
            store.state_dict[key] = tensor.to("cpu").contiguous()
        else:
            _write_to_disk(store, key, tensor)
        if key not in store.all_keys:
            store.all_keys.append(key)
    elif isinstance(store, MutableMapping):
        store[key] = tensor.to("cpu").contiguous()
    else:
        raise TypeError(f"cannot write {key!r} back into an offload store of type {type(store).__name__}")


def _write_to_disk(loader, key: str, tensor: torch.Tensor) -> None:
    """accelerate's own disk format: ``<save_folder>/<key>.dat`` (memory-mapped) + index entry. Entries that
    pointed into a safetensors checkpoint are redirected; the checkpoint itself is not touched."""
    if loader.save_folder is None:
        folder = tempfile.mkdtemp(prefix="rotsparse-offload-")
        weakref.finalize(loader, shutil.rmtree, folder, ignore_errors=True)
        loader.save_folder = folder
    os.makedirs(loader.save_folder, exist_ok=True)
    for listener in list(BEFORE_DISK_WRITE):
        listener(loader, os.path.join(loader.save_folder, f"{key}.dat"))
    entry = offload_weight(tensor.to("cpu").contiguous(), key, loader.save_folder, index={})
    loader.index[key] = entry[key]


# Top-K linears under offload ---------------------------------------------------------------------

class InputMajorOffloadHook(AlignDevicesHook):
    """``AlignDevicesHook`` for an offloaded module whose weights are kept input-major (those its
    ``input_major_parameters`` name: `rotsparse.runtime.TopKLinear`, `rotsparse.runtime.TopKExperts`): after
    loading a stored (..., out, in) weight, lay it out input-channel-major (a transpose view of a contiguous
    (..., in, out) tensor) for the decode kernels."""

    def pre_forward(self, module, *args, **kwargs):
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        for name in module.input_major_parameters:
            weight = module._parameters.get(name)
            if weight is not None and weight.device.type != "meta" and not weight.transpose(-2, -1).is_contiguous():
                module._parameters[name] = nn.Parameter(to_input_major(weight), requires_grad=weight.requires_grad)
        return args, kwargs


def adopt_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give `new` (which replaces `old` under the same name, with the same parameter names) accelerate hooks
    configured like `old`'s; returns `new`. A no-op without hooks. Offloaded parameters need no loading:
    the new hooks read the same store entries."""
    hooks = []
    for hook in _align_hooks(old):
        settings = dict(execution_device=hook.execution_device, offload=hook.offload,
                        io_same_device=hook.io_same_device, weights_map=hook.weights_map,
                        offload_buffers=hook.offload_buffers, place_submodules=hook.place_submodules,
                        skip_keys=hook.skip_keys, tied_params_map=hook.tied_params_map)
        input_major = hook.offload and getattr(new, "input_major_parameters", ())
        hook_class = InputMajorOffloadHook if input_major else AlignDevicesHook
        hooks.append(hook_class(**settings))
    if hooks:
        add_hook_to_module(new, hooks[0] if len(hooks) == 1 else SequentialHook(*hooks))
    return new
