"""Save a sparsified model once; load it anywhere without calibrating -- with rotsparse or plain transformers.

The directory is an ordinary Hugging Face checkpoint (safetensors + config.json + tokenizer + README.md model
card). The plan (format version, config, K per site and reader linear) lives in config.json under
``"rotsparse"``; ``quantization_config`` (``quant_method: "rotsparse"``, see `rotsparse.hf_quantizer`) makes
``AutoModelForCausalLM.from_pretrained`` build the sparse model once rotsparse is imported. The residual
rotations and output rotations are tensors named ``*.rotsparse_output_rotation`` beside the weights.

`save` is atomic (a temporary folder beside the target, renamed into place) and never overwrites without
``overwrite=True``; `load` (and the quantizer) check the checkpoint against its plan before reading any weight
(`check_checkpoint`), and every refusal is a `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

try:  # transformers >= 5: checkpoints are written in the original layout, not the loaded one
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:
    revert_weight_conversion = None

from .config import SITES
from .families import get_family
from .plan import (CONFIG_KEY, CheckpointError, SparsityPlan, plan_from_section, plan_of, quantization_section,
                   read_plan, site_sizes_for)
from .runtime import ROTATION_BUFFER, attach_output_rotation

__all__ = ["CONFIG_KEY", "CheckpointError", "check_checkpoint", "check_save_target", "declare_rotations",
           "implied_rotations", "load", "model_card", "orthogonality_tolerance", "plan_from_section", "plan_of",
           "read_plan", "save"]

WEIGHTS_SUFFIX = ".safetensors"


# saving ------------------------------------------------------------------------------------------

def save(model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False,
         metrics: dict[str, float] | None = None) -> Path:
    """Write weights (safetensors only), config.json with the plan and ``quantization_config``, the tokenizer if
    given, and a README.md model card (with `metrics`, e.g. ``{"wikitext2 perplexity": 17.3}``, if given).

    Everything is written into a temporary folder beside `directory` and renamed into place, so `directory` is
    either as before or complete; a failure at any point leaves it untouched. Refused (FileExistsError) unless
    ``overwrite=True``: a non-empty folder, a file, or the folder the model was loaded from; with
    ``overwrite=True`` the folder is replaced whole (no stale shards or index files survive).
    """
    plan = plan_of(model)
    target = Path(directory).expanduser().absolute()
    check_save_target(model, target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the saved folder gets the usual mode
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(model, plan, metrics))
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _source_folder(model: nn.Module) -> Path | None:
    """The local folder `model` was loaded from, if any (its config's ``_name_or_path``)."""
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    path = Path(str(name)).expanduser()
    return path.resolve() if name and path.is_dir() else None


def check_save_target(model: nn.Module, target: str | Path, overwrite: bool = False) -> None:
    """FileExistsError unless `save` may write `model` to `target` (see `save`); call it before long work."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        if not overwrite:
            raise FileExistsError(f"{target} is a file; pass overwrite=True to replace it (CLI: --overwrite)")
        return
    if not target.exists() or overwrite:
        return
    if _source_folder(model) == target.resolve():
        raise FileExistsError(f"{target} is the folder this model was loaded from; save elsewhere or pass "
                              f"overwrite=True to replace it (CLI: --overwrite)")
    if any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it (CLI: --overwrite)")


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is renamed aside first and removed only after."""
    if not target.exists():
        os.replace(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    os.replace(target, aside / "old")
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside / "old", target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def model_card(model: nn.Module, plan: SparsityPlan, metrics: dict[str, float] | None = None) -> str:
    """README.md text: base model, method, requested/effective sparsity, calibration tokens, metrics, usage."""
    base = str(getattr(model.config, "_name_or_path", "") or "")
    source = _source_folder(model)
    shown_base = source.name if source is not None else base  # no local paths of the machine that saved it
    lines = ["---", "library_name: transformers", "tags:", "- rotsparse", "- activation-sparsity"]
    if base and source is None:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {shown_base or 'model'} with rotsparse activation sparsity", "",
              "| | |", "|---|---|",
              f"| base model | {shown_base or 'unknown'} |",
              f"| method | {plan.config.method} |",
              f"| requested sparsity | {plan.config.sparsity:.4f} |",
              f"| effective sparsity | {plan.effective_sparsity:.4f} |",
              f"| calibration tokens | {plan.calibration_tokens} |",
              f"| residual stream rotated | {plan.rotated} |"]
    if plan.config.residual_bits:
        band = plan.config.residual_band
        copied = "all" if band is None else f"the largest, {band:g} of each linear's inputs"
        lines.append(f"| dropped inputs through a {plan.config.residual_bits}-bit weight copy | {copied} (recomputed "
                     f"from the weights when loading) |")
    lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in (metrics or {}).items()]
    lines += ["", "## Load", "", "```python", "import rotsparse  # registers the rotsparse quantization method",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")  # TopKLinear with the saved K',
              'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", "",
              "Without `import rotsparse`, transformers does not know the `rotsparse` quantization method and loads "
              "a different (dense) model after a warning: always import rotsparse first.", ""]
    return "\n".join(lines)


# reading and checking ----------------------------------------------------------------------------

def implied_rotations(model: nn.Module, plan: SparsityPlan) -> set[str] | None:
    """Names of the modules that carry an output rotation (d, d) in the model `plan` was folded into.

    A residual rotation on decoder layer l where the bases of l and l+1 differ (`plan.residual_bases`: equal names
    share one basis for "identity", "global" and layers of one "run<G>"; "pca*" bases are per layer), and on the
    post-norms (families that have them) of every rotated layer (`rotsparse.fold.fold_rotations`). None for a
    rotated plan saved before `residual_bases` existed: then any decoder layer or post-norm may carry one.
    """
    names = {id(module): name for name, module in model.named_modules()}
    layers = get_family(model).layer_views()
    if plan.residual_bases and len(plan.residual_bases) != len(layers):
        raise CheckpointError(f"the plan has residual bases for {len(plan.residual_bases)} layers, the model has "
                              f"{len(layers)}")
    rotated = plan.rotation_layers()
    if rotated is None:
        return None
    residual, post_norm = rotated
    implied = {names[id(layers[index].layer)] for index in residual}
    for index in post_norm:
        layer = layers[index]
        implied |= {names[id(norm)] for norm in (layer.attn_output_norm, layer.mlp_output_norm) if norm is not None}
    return implied


def _allowed_rotation_modules(model: nn.Module) -> set[str]:
    """Every module a rotation may sit on: decoder layers and their post-norms."""
    names = {id(module): name for name, module in model.named_modules()}
    allowed = set()
    for layer in get_family(model).layer_views():
        allowed.add(names[id(layer.layer)])
        allowed |= {names[id(norm)] for norm in (layer.attn_output_norm, layer.mlp_output_norm) if norm is not None}
    return allowed


def orthogonality_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted max |Q^T Q - I| (computed in float64) of a rotation stored in `dtype`."""
    return max(1e-6, 8 * torch.finfo(dtype).eps)


def _safetensors_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Saved key -> (file, shape, dtype) of every tensor in the safetensors `files`."""
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    tensors[key] = (file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError) for bad files
            raise CheckpointError(f"{file}: not a readable safetensors file ({type(error).__name__}: {error})") \
                from error
    return tensors


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    """Tensor `key` of safetensors `file`; CheckpointError naming both if it cannot be read."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(key)
    except Exception as error:
        raise CheckpointError(f"{file}: tensor {key} cannot be read ({type(error).__name__}: {error})") from error


def check_checkpoint(model: nn.Module, plan: SparsityPlan, checkpoint_files) -> dict[str, torch.dtype]:
    """Check saved files against `plan` and the empty (meta) `model` built from the same config.json, before
    any weight is loaded; CheckpointError naming the file and tensor on the first kind of problem found.

    Checks: only safetensors files; the plan's layer shapes and K in range; the rotation tensors are exactly
    those the plan implies (`implied_rotations`), each (d, d), finite and orthogonal (max |Q^T Q - I| in float64
    within `orthogonality_tolerance` of its dtype); every other tensor the model needs is there with its shape,
    and nothing else is. Returns module name -> model dtype of each rotation, for `declare_rotations`.
    """
    files = [Path(file) for file in checkpoint_files]
    if not files:
        raise CheckpointError(f"{model.config.name_or_path}: no {WEIGHTS_SUFFIX} weights")
    if bad := [file for file in files if not file.name.endswith(WEIGHTS_SUFFIX)]:
        raise CheckpointError(f"{bad[0]}: rotsparse reads weights from {WEIGHTS_SUFFIX} files only (no pickle); "
                              f"load with use_safetensors=True")
    where = files[0].parent
    family = get_family(model)
    sizes = site_sizes_for(family)
    if sizes != plan.site_sizes:
        raise CheckpointError(f"{where}/config.json: layer shapes {sizes} do not match the saved plan "
                              f"{plan.site_sizes}")
    for index, (layer_k, layer_sizes) in enumerate(zip(plan.keep_k, plan.site_sizes)):
        for site, k, (width, _) in zip(SITES, layer_k, layer_sizes):
            if not 0 <= k <= width:
                raise CheckpointError(f"{where}/config.json: layer {index} site {site}: K = {k} is outside "
                                      f"[0, {width}]")
    saved = _safetensors_headers(files)
    suffix = "." + ROTATION_BUFFER
    found = {key[: -len(suffix)]: key for key in saved if key.endswith(suffix)}
    implied = implied_rotations(model, plan)
    allowed = _allowed_rotation_modules(model) if implied is None else implied
    if extra := sorted(set(found) - allowed):
        key = found[extra[0]]
        raise CheckpointError(f"{saved[key][0]}: unexpected rotation tensor {key}: the plan (residual bases "
                              f"{list(plan.residual_bases)}) puts no rotation on {extra[0]}")
    if implied is not None and (missing := sorted(implied - set(found))):
        raise CheckpointError(f"{where}: missing rotation tensor {missing[0]}{suffix}: the plan (residual bases "
                              f"{list(plan.residual_bases)}) needs one")
    hidden = family.hidden_size
    dtypes = {}
    for module_name, key in sorted(found.items()):
        file, shape, _ = saved[key]
        if shape != (hidden, hidden):
            raise CheckpointError(f"{file}: rotation tensor {key} has shape {shape}, expected {(hidden, hidden)}")
        rotation = _read_tensor(file, key).to("cpu")  # explicit: from_pretrained calls this under a meta device
        if not torch.isfinite(rotation).all():
            raise CheckpointError(f"{file}: rotation tensor {key} holds NaN or infinite values")
        matrix = rotation.double()
        error = (matrix.T @ matrix - torch.eye(hidden, dtype=torch.float64, device="cpu")).abs().max().item()
        if error > orthogonality_tolerance(rotation.dtype):
            raise CheckpointError(f"{file}: rotation tensor {key} is not orthogonal (max |Q^T Q - I| = {error:.3g}, "
                                  f"tolerance {orthogonality_tolerance(rotation.dtype):.3g} for {rotation.dtype})")
        dtypes[module_name] = next(model.get_submodule(module_name).parameters()).dtype
    _check_weights(model, {key: value for key, value in saved.items() if not key.endswith(suffix)})
    return dtypes


def _check_weights(model: nn.Module, saved: dict[str, tuple[Path, tuple[int, ...], str]]) -> None:
    """Saved weight names and shapes against the (meta) model's; tied weights count as present if one is.
    transformers 5 saves some weights in their original layout (e.g. batched mixture-of-experts weights as one
    tensor per expert): the model's are compared in that layout."""
    tensors = model.state_dict(keep_vars=True)
    if revert_weight_conversion is not None:
        tensors = revert_weight_conversion(model, tensors)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    problems = []
    for key, value in tensors.items():
        if key not in saved and tied.get(key) not in saved:
            problems.append(f"missing tensor {key}")
        elif key in saved and saved[key][1] != tuple(value.shape):
            problems.append(f"{saved[key][0].name}: {key} has shape {saved[key][1]}, the config needs "
                            f"{tuple(value.shape)}")
    problems += [f"{saved[key][0].name}: unexpected tensor {key}" for key in sorted(set(saved) - set(tensors))]
    if problems:
        where = next(iter(saved.values()))[0].parent if saved else "checkpoint"
        raise CheckpointError(f"{where}: weights do not match the saved config: " + "; ".join(problems))


def declare_rotations(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Register an empty (d, d) output-rotation buffer (meta) on each named module, for loading to fill."""
    hidden = get_family(model).hidden_size
    for module_name, dtype in dtypes.items():
        attach_output_rotation(model.get_submodule(module_name),
                               torch.empty(hidden, hidden, dtype=dtype, device="meta"))


# loading -----------------------------------------------------------------------------------------

def load(directory: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         device_map=None, max_memory: dict | None = None, offload_folder: str | Path | None = None) -> nn.Module:
    """Restore a model written by `save` (or `model.save_pretrained` after `sparsify`), with no calibration.

    The same path as ``AutoModelForCausalLM.from_pretrained(directory)`` after ``import rotsparse`` (the
    `rotsparse.hf_quantizer`, registered by importing the package), also for folders saved before
    ``quantization_config`` was written; only safetensors are read. dtype: None keeps the saved dtype.
    device_map: passed to from_pretrained (e.g. "auto", or a dict naming "cpu" / "disk" for modules) instead of
    `device`; `max_memory` and `offload_folder` go with it, and accelerate dispatches the model over GPUs, CPU
    and disk (see `rotsparse.offload`).
    """
    directory = Path(directory)
    read_plan(directory)
    files = sorted(directory.glob("*" + WEIGHTS_SUFFIX))
    if not files:
        raise FileNotFoundError(f"no {WEIGHTS_SUFFIX} weights in {directory}")
    _safetensors_headers(files)  # a truncated or corrupt file is named before transformers opens it
    has_quantization_config = "quantization_config" in json.loads((directory / "config.json").read_text())
    options = {} if has_quantization_config else {"quantization_config": quantization_section()}
    if max_memory is not None:
        options["max_memory"] = max_memory
    if offload_folder is not None:
        options["offload_folder"] = str(offload_folder)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto" if dtype is None else dtype,
                                                 device_map=device_map, use_safetensors=True, **options)
    if device_map is None:
        model.to(device)
    return model.eval()
