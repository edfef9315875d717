"""Save a sparsified model once; load it anywhere without calibrating.

The directory is an ordinary Hugging Face checkpoint (safetensors + config.json + tokenizer). The plan
(format version, config, K per site and reader linear) lives in config.json under ``"rotsparse"``; the residual
rotations and output rotations are tensors named ``*.rotsparse_output_rotation`` beside the weights.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

try:  # transformers >= 5: checkpoints are written in the original layout, not the loaded one
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:
    revert_weight_conversion = None

from .families import get_family
from .offload import execution_device
from .plan import CONFIG_KEY, attach_plan, plan_of, read_plan, site_sizes_for
from .runtime import ROTATION_BUFFER, attach_output_rotation, install_topk

__all__ = ["CONFIG_KEY", "load", "plan_of", "read_plan", "save"]


def save(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write weights (safetensors), config.json with the rotsparse plan, and the tokenizer if given."""
    plan_of(model)
    directory = Path(directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _read_checkpoint(directory: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """Shapes of every saved tensor, and the rotation tensors keyed by their module's name."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    shapes, rotations = {}, {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
                if key.endswith("." + ROTATION_BUFFER):
                    rotations[key[: -len(ROTATION_BUFFER) - 1]] = handle.get_tensor(key)
    return shapes, rotations


def _as_saved(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` as `save_pretrained` writes it: transformers 5 reverts its load-time conversions (e.g. batched
    mixture-of-experts weights back to per-expert tensors); earlier versions write it unchanged."""
    if revert_weight_conversion is None:
        return state_dict
    return revert_weight_conversion(model, state_dict)


def _check_weights(directory: Path, saved_shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare saved tensor names and shapes with what the saved config builds; name every difference."""
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = _as_saved(skeleton, skeleton.state_dict(keep_vars=True))
    expected = {key: tuple(value.shape) for key, value in tensors.items()}
    tied_groups: dict[int, list[str]] = {}
    for key, value in tensors.items():
        tied_groups.setdefault(id(value), []).append(key)
    saved = {key: shape for key, shape in saved_shapes.items() if not key.endswith("." + ROTATION_BUFFER)}
    problems = []
    if missing := sorted(group[0] for group in tied_groups.values() if not set(group) & set(saved)):
        problems.append(f"missing tensors {missing}")
    if unexpected := sorted(set(saved) - set(expected)):
        problems.append(f"unexpected tensors {unexpected}")
    problems += [f"{key} has shape {saved[key]}, the config needs {expected[key]}"
                 for key in sorted(set(saved) & set(expected)) if saved[key] != expected[key]]
    if problems:
        raise ValueError(f"{directory}: weights do not match the saved config: " + "; ".join(problems))


@contextmanager
def _quiet_transformers():
    """Silence transformers' load report (it lists our rotation tensors as unexpected) for one call."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load(directory: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         device_map=None, max_memory: dict | None = None, offload_folder: str | Path | None = None) -> nn.Module:
    """Restore a model written by `save` (or `model.save_pretrained` after `sparsify`), with no calibration.

    dtype: None keeps the saved dtype. device_map: passed to from_pretrained (e.g. "auto", or a dict naming
    "cpu" / "disk" for modules) instead of `device`; `max_memory` and `offload_folder` go with it, and
    accelerate dispatches the model over GPUs, CPU and disk (see `rotsparse.offload`).
    """
    directory = Path(directory)
    plan = read_plan(directory)
    saved_shapes, rotations = _read_checkpoint(directory)
    _check_weights(directory, saved_shapes)
    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype="auto" if dtype is None else dtype, device_map=device_map, output_loading_info=True,
            **({} if max_memory is None else {"max_memory": max_memory}),
            **({} if offload_folder is None else {"offload_folder": str(offload_folder)}))
    if info["missing_keys"] or info["mismatched_keys"] or info["error_msgs"]:
        raise ValueError(f"{directory}: weights do not match the saved config: {info}")
    family = get_family(model)
    site_sizes = site_sizes_for(family)
    if site_sizes != plan.site_sizes:
        raise ValueError(f"{directory}: layer shapes {site_sizes} do not match the saved plan {plan.site_sizes}")
    for module_name, rotation in rotations.items():
        module = model.get_submodule(module_name)
        weight = next(module.parameters())  # its device is meta when accelerate offloads it
        attach_output_rotation(module, rotation.to(device=execution_device(module), dtype=weight.dtype))
    install_topk(family, plan)
    attach_plan(model, plan)
    if device_map is None:
        model.to(device)
    return model.eval()
