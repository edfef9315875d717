"""`sparsify` and `calibrate`: the pipeline on a Hugging Face causal LM, in place.

calibrate (`measure`) -> choose bases and K (`choose`) -> fold them into the weights (`fold`) -> install the
run-time Top-K modules (`runtime`), whose decode steps run the kernels (`kernels`); the plan (`plan`) records
every choice.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .budget import allocate_keep_k
from .choose import ReaderKeepK, choose_value_rotations, planned
from .config import AutoOptions, SparsifyConfig
from .data import DEFAULT_CALIBRATION, calibration_batch, is_dataset_source, load_texts
from .evaluation import mean_loss
from .families import Family, get_family
from .fold import fold_choices
from .measure import Calibration, calibrate_model
from .offload import is_offloaded
from .plan import PLAN_ATTRIBUTE, SparsityPlan, attach_plan, reader_sizes_for, site_sizes_for
from .progress import Progress
from .runtime import install_topk, is_sparsified, set_kernels
from .undo import all_or_nothing

__all__ = ["calibrate", "check_finite", "set_kernels", "sparsify", "validate"]

logger = logging.getLogger("rotsparse")


def sparsify(model: nn.Module, tokenizer=None, sparsity: float | None = None, *, method: str | None = None,
             calibration: str | Sequence[str] | torch.Tensor | None = None, config: SparsifyConfig | None = None,
             progress: bool = True, calibrated: Calibration | None = None, **config_fields) -> nn.Module:
    """Make `model` run with fixed per-token Top-K activations; returns the same model, changed in place.

    calibration: None (`rotsparse.data.DEFAULT_CALIBRATION`: the calibration part of the "mixed" domain, the
        embedded pydoc corpus and Python standard-library source), a domain name, "embedded", a path or dataset name
        (see `rotsparse.data.load_texts`), a list of strings, or token ids (n, seq).
    config: a full `SparsifyConfig`; otherwise one is built from `sparsity`, `method` and `config_fields`.
    calibrated: the result of `calibrate` on this same (dense) model, to reuse one calibration for
        several sparsities; `calibration` is then ignored, and the plan records the calibration's options.
    The plan (K per site and per reader linear, effective sparsity, per-layer choices) is attached as
    ``model.rotsparse_plan``.
    With ``auto``'s structure check (`AutoOptions.structure_check`), each candidate structure is
    sparsified on a copy of the model (one extra copy in memory at a time) and scored on the held-out check
    sequences; an accelerate-offloaded model skips the check (logged) and takes the error proxy's choice.
    All-or-nothing: every setting is checked (`validate`) and the calibration text read before the model is
    touched; after that, any exception (KeyboardInterrupt and MemoryError included) restores the model exactly
    (`rotsparse.undo.all_or_nothing`; docs/reliability.md) and propagates.
    """
    config = _make_config(config, sparsity, method, config_fields)
    family = validate(model, tokenizer, calibration, config, calibrated, progress)
    reader_sizes = reader_sizes_for(family)
    inputs = None
    if config.spec.calibrated and calibrated is None:  # read and tokenize before the model is touched
        inputs = _calibration_inputs(model, tokenizer, calibration, config)
    with all_or_nothing(model):
        if config.spec.calibrated:
            if calibrated is None:
                calibrated = _calibrate(model, family, config, progress, *inputs)
            check_finite(calibrated)
            config = dataclasses.replace(config, options=calibrated.options)
            chosen, check_losses = _checked_structure(model, calibrated, config, reader_sizes, progress)
            applied = apply(family, chosen, config, reader_sizes)
            plan = SparsityPlan.from_readers(applied.reader_keep_k, reader_sizes, rotated=applied.rotated,
                                             config=config, calibration_tokens=calibrated.tokens,
                                             residual_bases=applied.residual_bases,
                                             value_rotated=applied.value_rotated, check_losses=check_losses)
        else:
            site_sizes = site_sizes_for(family)
            plan = SparsityPlan(keep_k=allocate_keep_k(site_sizes, config.topk_sparsity, config.coefficients),
                                site_sizes=site_sizes, rotated=False, config=config)
        install_topk(family, plan)
        attach_plan(model, plan)
    logger.info("rotsparse: method=%s requested sparsity=%.4f effective sparsity=%.4f",
                config.method, config.sparsity, plan.effective_sparsity)
    return model


def _make_config(config, sparsity, method, config_fields) -> SparsifyConfig:
    if config is None:
        fields = dict(config_fields)
        if sparsity is not None:
            fields["sparsity"] = sparsity
        if method is not None:
            fields["method"] = method
        unknown = sorted(set(fields) - {item.name for item in dataclasses.fields(SparsifyConfig)})
        if unknown:
            raise TypeError(f"unknown sparsify settings {unknown}; SparsifyConfig has "
                            f"{[item.name for item in dataclasses.fields(SparsifyConfig)]}")
        return SparsifyConfig(**fields)
    if sparsity is not None or method is not None or config_fields:
        raise ValueError("pass either config= or individual settings (sparsity, method, ...), not both")
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    return config


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter dtypes `sparsify` accepts (the kernels' and the folds' cast-back dtypes)."""


def validate(model: nn.Module, tokenizer, calibration, config: SparsifyConfig, calibrated: Calibration | None = None,
             progress: bool = True) -> Family:
    """Every check `sparsify` makes before it changes anything; returns the model's `Family`.

    The model must be an unsparsified causal LM of a supported family with finite floating weights of a
    supported dtype; `block_size` must divide every Top-K site's width; `calibrated` must come from this
    method and this model's depth; token ids must be an integer (n, seq) tensor within the vocabulary.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if is_sparsified(model) or hasattr(model, PLAN_ATTRIBUTE):
        raise RuntimeError("this model is already sparsified by rotsparse; load the original model to sparsify again")
    family = get_family(model)
    for name, tensor in model.named_parameters():
        if not tensor.is_floating_point() or tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {name} has dtype {tensor.dtype}; rotsparse sparsifies "
                            f"{', '.join(str(dtype) for dtype in SUPPORTED_DTYPES)} models (not quantized ones)")
    layer_of = {id(tensor): index for index, layer in enumerate(family.layers)
                for tensor in [*layer.parameters(), *layer.buffers()]}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor.detach())).reshape(tensor.shape[0] if tensor.ndim else 1, -1).any(-1)
            where = f"decoder layer {layer_of[id(tensor)]}, " if id(tensor) in layer_of else ""
            raise FloatingPointError(f"non-finite values (NaN/Inf) in {name} ({where}rows "
                                     f"{bad.nonzero().flatten()[:8].tolist()}); the model was not changed")
    if config.block_size:
        widths = sorted({width for layer in reader_sizes_for(family) for site in layer for width, _ in site})
        bad = [width for width in widths if width % config.block_size]
        if bad:
            raise ValueError(f"block_size {config.block_size} does not divide the Top-K input widths {bad} "
                             f"(all widths: {widths})")
    if config.weight_bits is not None:
        _check_quantizable(model, family, config)
    if config.residual_bits:
        if is_offloaded(model):
            raise ValueError("residual_bits: an accelerate-offloaded model is not supported; load it on one device")
        if any(getattr(layer, "experts", None) is not None for layer in family.layer_views()):
            raise ValueError("residual_bits: mixture-of-experts layers (batched expert weights) have no residual "
                             "copy; sparsify without residual_bits")
    if calibrated is not None:
        if not isinstance(calibrated, Calibration):
            raise TypeError(f"calibrated must be the result of rotsparse.calibrate, got {type(calibrated).__name__}")
        if not config.spec.calibrated:
            raise ValueError(f"method {config.method!r} does not calibrate; do not pass calibrated=")
        if calibrated.method != config.method:
            raise ValueError(f"calibrated for method {calibrated.method!r}, asked for {config.method!r}")
        if len(calibrated.layers) != len(family.layers):
            raise ValueError(f"calibrated has {len(calibrated.layers)} layers, the model {len(family.layers)}")
        check_finite(calibrated)
    elif config.spec.calibrated:
        _check_calibration_source(model, tokenizer, calibration)
    return family


def _check_quantizable(model: nn.Module, family: Family, config: SparsifyConfig) -> None:
    """ValueError unless every Top-K linear can take `config.weight_bits` (int4: `group_size` divides its input
    width and its output width is even); accelerate-offloaded models are not quantized."""
    if is_offloaded(model):
        raise ValueError("weight_bits: quantizing an accelerate-offloaded model is not supported; load it on one device")
    if config.weight_bits != 4:
        return
    shapes = sorted({(width, params // width) for layer in reader_sizes_for(family) for site in layer
                     for width, params in site})
    bad = [(width, out) for width, out in shapes if width % config.group_size or out % 2]
    if bad:
        raise ValueError(f"weight_bits=4 needs group_size {config.group_size} to divide every Top-K linear's input "
                         f"width and even output widths; (input, output) widths {bad} do not fit (all: {shapes})")


def _check_calibration_source(model: nn.Module, tokenizer, calibration) -> None:
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int32, torch.int64) or calibration.ndim != 2 or 0 in calibration.shape:
            raise ValueError(f"calibration token ids must be a non-empty integer tensor (n, seq), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
        if calibration.min() < 0 or (vocab is not None and calibration.max() >= vocab):
            raise ValueError(f"calibration token ids must be in [0, {vocab}), got [{int(calibration.min())}, "
                             f"{int(calibration.max())}]")
        return
    if not (calibration is None or isinstance(calibration, (str, os.PathLike)) or is_dataset_source(calibration)
            or (isinstance(calibration, Sequence) and all(isinstance(text, str) for text in calibration))):
        raise TypeError(f"calibration must be 'embedded', a path or dataset name, a datasets.Dataset or "
                        f"rotsparse.data.DatasetText, a list of strings or token ids, "
                        f"got {type(calibration).__name__}")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to calibrate on text")


def check_finite(calibration: Calibration) -> None:
    """Raise FloatingPointError naming the tensor and the decoder layer if anything `fold` would write into the
    weights (candidate rotations, value-head rotations, WINA scales, error curves) is NaN or infinite."""
    for index, layer in enumerate(calibration.layers):
        named = [(f"residual basis {name!r}", tensor) for name, tensor in zip(calibration.options.rotations,
                                                                             layer.rotations)]
        named += [(f"value-head rotation {i}", tensor) for i, tensor in enumerate(layer.value_rotations)]
        named += [(f"WINA scales {site}[{i}]", tensor) for site, values in layer.scales.items()
                  for i, tensor in enumerate(values)]
        named += [(f"Top-K error curve {site}[{i}]", tensor) for site, values in layer.curves.items()
                  for i, tensor in enumerate(values)]
        for name, tensor in named:
            if tensor is not None and not torch.isfinite(tensor).all():
                raise FloatingPointError(f"non-finite values (NaN/Inf) in the {name} of decoder layer {index}; "
                                         f"the model was not changed")


def calibrate(model: nn.Module, tokenizer=None, calibration: str | Sequence[str] | torch.Tensor | None = None, *,
              config: SparsifyConfig | None = None, progress: bool = True,
              options: AutoOptions | None = None) -> Calibration:
    """One calibration pass of `config.method` (default ``auto``) on the dense model, for any sparsity.

    Pass the result to `sparsify(..., calibrated=...)` of this model (or of a fresh copy of the same
    weights). `options` replaces `config.options` (ablations of ``auto``). Text gives `config.num_sequences`
    calibration sequences plus `config.check_sequences` held-out check sequences after them (for methods
    with `Method.check_held_out`); with token ids (n, seq), the last `config.check_sequences` rows are the
    check sequences (if n is larger).
    """
    config = config or SparsifyConfig()
    if options is not None:
        config = dataclasses.replace(config, options=options)
    if not config.spec.calibrated:
        raise ValueError(f"method {config.method!r} needs no calibration")
    family = get_family(model)
    _check_calibration_source(model, tokenizer, calibration)
    inputs = _calibration_inputs(model, tokenizer, calibration, config)
    with all_or_nothing(model):
        calibrated = _calibrate(model, family, config, progress, *inputs)
    check_finite(calibrated)
    return calibrated


def _calibration_inputs(model, tokenizer, calibration, config: SparsifyConfig):
    """(input_ids, attention_mask, check_input_ids) of a calibration: text read and tokenized, the held-out
    check sequences split off."""
    held_out = config.check_sequences if config.spec.check_held_out else 0
    input_ids, attention_mask = _calibration_tokens(tokenizer, calibration, config, held_out)
    check_input_ids = None
    if held_out:
        if input_ids.shape[0] > held_out and attention_mask is None:
            input_ids, check_input_ids = input_ids[:-held_out], input_ids[-held_out:]
        else:
            logger.warning("rotsparse: %d calibration sequences are too few to hold out %d for the structure "
                           "check; the error proxy chooses the residual bases", input_ids.shape[0], held_out)
    return input_ids, attention_mask, check_input_ids


def _calibrate(model, family, config, progress, input_ids, attention_mask, check_input_ids) -> Calibration:
    return calibrate_model(model, family, input_ids, attention_mask, config, progress, check_input_ids)


def _calibration_tokens(tokenizer, calibration, config: SparsifyConfig, held_out: int):
    """(input_ids (n, seq), attention_mask or None) from whatever the user passed; from text,
    `config.num_sequences` + `held_out` sequences."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int32, torch.int64) or calibration.ndim != 2:
            raise ValueError(f"calibration token ids must be an integer tensor (n, seq), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        return calibration.long(), None
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to calibrate on text")
    texts = load_texts(DEFAULT_CALIBRATION if calibration is None else calibration, part="calibration")
    input_ids = calibration_batch(tokenizer, texts, num_sequences=config.num_sequences + held_out,
                                  sequence_length=config.sequence_length)
    return input_ids, None


@dataclass(frozen=True)
class Applied:
    """What `apply` folded: K per reader linear per site per layer, and per layer the residual basis (candidate
    name) and whether its value heads were rotated."""

    reader_keep_k: ReaderKeepK
    residual_bases: tuple[str, ...]
    value_rotated: tuple[bool, ...]

    @property
    def rotated(self) -> bool:
        return any(name != "identity" for name in self.residual_bases)


def apply(family: Family, calibration: Calibration, config: SparsifyConfig, reader_sizes) -> Applied:
    """Choose bases, value rotations and K for `config.sparsity` and fold them into the weights."""
    choice, keep_k = planned(calibration, config, reader_sizes)
    value_choice = choose_value_rotations(calibration.layers, keep_k)
    fold_choices(family, calibration, choice, value_choice)
    names = tuple(calibration.options.rotations[index] for index in choice)
    return Applied(keep_k, names, tuple(layer.value_rotations[index] is not None
                                        for layer, index in zip(calibration.layers, value_choice)))


def _checked_structure(model: nn.Module, calibrated: Calibration, config: SparsifyConfig, reader_sizes,
                       progress: bool = True) -> tuple[Calibration, tuple[tuple[str, float], ...]]:
    """The calibration restricted to the residual-basis structure whose sparsified model has the lowest loss
    on the check sequences (`Calibration.structures`), and (label, loss) of every structure compared.
    Structures that lead to the same plan (bases and K in every layer) are evaluated once; if all do, none is."""
    structures = calibrated.structures()
    if len(structures) == 1 or calibrated.check_input_ids is None or config.sparsity == 0:
        return calibrated, ()
    restricted = {label: calibrated.restricted(options) for label, options in structures.items()}
    same_plan: dict[tuple, list[str]] = {}
    for label, options in structures.items():
        choice, keep_k = planned(restricted[label], config, reader_sizes)
        same_plan.setdefault((tuple(options.rotations[index] for index in choice), keep_k), []).append(label)
    if len(same_plan) == 1:
        return calibrated, ()
    if is_offloaded(model):
        logger.warning("rotsparse: the model is offloaded; the structure check is skipped (the error proxy "
                       "chooses the residual bases)")
        return calibrated, ()
    losses = {}
    bar = Progress("structure check", len(same_plan), enabled=progress, unit="structure")
    for labels in same_plan.values():
        candidate = copy.deepcopy(model)
        candidate_family = get_family(candidate)
        applied = apply(candidate_family, restricted[labels[0]], config, reader_sizes)
        install_topk(candidate_family, SparsityPlan.from_readers(applied.reader_keep_k, reader_sizes,
                                                                 rotated=applied.rotated, config=config))
        loss = mean_loss(candidate, calibrated.check_input_ids)
        del candidate, candidate_family
        losses.update({label: loss for label in labels})
        bar.step(detail=f"{'='.join(labels)}: check loss {loss:.4f}")
    best = min(structures, key=losses.__getitem__)
    return restricted[best], tuple((label, losses[label]) for label in structures)
