"""`sparsify`: calibrate, rotate/scale, fold and install Top-K on a Hugging Face causal LM, in place."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from . import methods
from .adapters import ModelAdapter, get_adapter
from .config import SITES, SparsifyConfig, SparsityPlan
from .evaluation import mean_loss
from .methods import CALIBRATED_METHODS, Calibration
from .offload import adopt_hooks, is_offloaded
from .topk import (TopKLinear, allocate_keep_k, apply_topk_options, install_head_kernel, is_sparsified,
                   reader_sizes_of, site_sizes_of)

logger = logging.getLogger("rotsparse")

PLAN_ATTRIBUTE = "rotsparse_plan"


def sparsify(model: nn.Module, tokenizer=None, sparsity: float | None = None, *, method: str | None = None,
             calibration: str | Sequence[str] | torch.Tensor | None = None, config: SparsifyConfig | None = None,
             progress: bool = True, calibrated: Calibration | None = None, **config_fields) -> nn.Module:
    """Make `model` run with fixed per-token Top-K activations; returns the same model, changed in place.

    calibration: None (`rotsparse.data.DEFAULT_CALIBRATION`: the calibration part of the "mixed" domain,
        equal shares of the embedded pydoc corpus and Python standard-library source), a domain name,
        "embedded", a path or dataset name (see `rotsparse.data.load_texts`), a list of strings, or token
        ids (n, seq).
    config: a full `SparsifyConfig`; otherwise one is built from `sparsity`, `method` and `config_fields`.
    calibrated: the result of `calibrate` on this same (dense) model, to reuse one calibration for
        several sparsities; `calibration` is then ignored.
    The plan (K per site and per reader linear, effective sparsity, per-layer choices) is attached as
    ``model.rotsparse_plan``.
    With ``auto``'s structure check (`methods.AutoOptions.structure_check`), each candidate structure is
    sparsified on a copy of the model (one extra copy in memory at a time) and scored on the held-out check
    sequences; an accelerate-offloaded model skips the check (logged) and takes the error proxy's choice.
    """
    if config is None:
        fields = dict(config_fields)
        if sparsity is not None:
            fields["sparsity"] = sparsity
        if method is not None:
            fields["method"] = method
        config = SparsifyConfig(**fields)
    elif sparsity is not None or method is not None or config_fields:
        raise ValueError("pass either config= or individual settings (sparsity, method, ...), not both")
    if is_sparsified(model) or hasattr(model, PLAN_ATTRIBUTE):
        raise RuntimeError("this model is already sparsified by rotsparse; load the original model to sparsify again")
    adapter = get_adapter(model)
    reader_sizes = reader_sizes_for(adapter)
    if config.method in CALIBRATED_METHODS:
        if calibrated is None:
            calibrated = calibrate(model, tokenizer, calibration, config=config, progress=progress)
        elif calibrated.method != config.method:
            raise ValueError(f"calibrated for method {calibrated.method!r}, asked for {config.method!r}")
        chosen, check_losses = _checked_structure(model, calibrated, config, reader_sizes)
        applied = methods.apply(adapter, chosen, config, reader_sizes)
        plan = SparsityPlan.from_readers(applied.reader_keep_k, reader_sizes, rotated=applied.rotated, config=config,
                                         calibration_tokens=calibrated.tokens, residual_bases=applied.residual_bases,
                                         value_rotated=applied.value_rotated, check_losses=check_losses)
    else:
        site_sizes = site_sizes_for(adapter)
        plan = SparsityPlan(keep_k=allocate_keep_k(site_sizes, config.sparsity, config.coefficients),
                            site_sizes=site_sizes, rotated=False, config=config)
    install_topk(adapter, plan)
    attach_plan(model, plan)
    logger.info("rotsparse: method=%s requested sparsity=%.4f effective sparsity=%.4f",
                config.method, config.sparsity, plan.effective_sparsity)
    return model


def calibrate(model: nn.Module, tokenizer=None, calibration: str | Sequence[str] | torch.Tensor | None = None, *,
              config: SparsifyConfig | None = None, progress: bool = True,
              options: methods.AutoOptions | None = None) -> Calibration:
    """One calibration pass of `config.method` (default ``auto``) on the dense model, for any sparsity.

    Pass the result to `sparsify(..., calibrated=...)` of this model (or of a fresh copy of the same
    weights). `options` switches parts of ``auto`` off, for ablations. Text gives `config.num_sequences`
    calibration sequences plus `config.check_sequences` held-out check sequences after them; with token
    ids (n, seq), the last `config.check_sequences` rows are the check sequences (if n is larger).
    """
    config = config or SparsifyConfig()
    torch.manual_seed(config.seed)
    held_out = config.check_sequences if config.method == "auto" else 0
    input_ids, attention_mask = _calibration_tokens(tokenizer, calibration, config, held_out)
    check_input_ids = None
    if held_out:
        if input_ids.shape[0] > held_out and attention_mask is None:
            input_ids, check_input_ids = input_ids[:-held_out], input_ids[-held_out:]
        else:
            logger.warning("rotsparse: %d calibration sequences are too few to hold out %d for the structure "
                           "check; the error proxy chooses the residual bases", input_ids.shape[0], held_out)
    return methods.calibrate(model, get_adapter(model), input_ids, attention_mask, config, options, progress,
                             check_input_ids)


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
    from .data import DEFAULT_CALIBRATION, calibration_batch, load_texts

    texts = load_texts(DEFAULT_CALIBRATION if calibration is None else calibration, part="calibration")
    input_ids = calibration_batch(tokenizer, texts, num_sequences=config.num_sequences + held_out,
                                  sequence_length=config.sequence_length)
    return input_ids, None


def _checked_structure(model: nn.Module, calibrated: Calibration, config: SparsifyConfig,
                       reader_sizes) -> tuple[Calibration, tuple[tuple[str, float], ...]]:
    """The calibration restricted to the residual-basis structure whose sparsified model has the lowest loss
    on the check sequences (`Calibration.structures`), and (label, loss) of every structure compared.
    Structures that lead to the same plan (bases and K in every layer) are evaluated once; if all do, none is."""
    structures = calibrated.structures()
    if len(structures) == 1 or calibrated.check_input_ids is None or config.sparsity == 0:
        return calibrated, ()
    restricted = {label: calibrated.restricted(options) for label, options in structures.items()}
    same_plan: dict[tuple, list[str]] = {}
    for label, options in structures.items():
        choice, keep_k = methods.planned(restricted[label], config, reader_sizes)
        same_plan.setdefault((tuple(options.rotations[index] for index in choice), keep_k), []).append(label)
    if len(same_plan) == 1:
        return calibrated, ()
    if is_offloaded(model):
        logger.warning("rotsparse: the model is offloaded; the structure check is skipped (the error proxy "
                       "chooses the residual bases)")
        return calibrated, ()
    losses = {}
    for labels in same_plan.values():
        started = time.perf_counter()
        candidate = copy.deepcopy(model)
        candidate_adapter = get_adapter(candidate)
        applied = methods.apply(candidate_adapter, restricted[labels[0]], config, reader_sizes)
        install_topk(candidate_adapter, SparsityPlan.from_readers(applied.reader_keep_k, reader_sizes,
                                                                  rotated=applied.rotated, config=config))
        loss = mean_loss(candidate, calibrated.check_input_ids)
        del candidate, candidate_adapter
        losses.update({label: loss for label in labels})
        logger.info("rotsparse: structure %s: check loss %.4f (%.0f s)", "=".join(labels), loss,
                    time.perf_counter() - started)
    best = min(structures, key=losses.__getitem__)
    return restricted[best], tuple((label, losses[label]) for label in structures)


def site_sizes_for(adapter: ModelAdapter) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(input width, parameters fed) of every site of every layer."""
    return tuple(site_sizes_of(layer_adapter.site_modules()) for layer_adapter in adapter.layer_adapters())


def reader_sizes_for(adapter: ModelAdapter) -> tuple[tuple[tuple[tuple[int, int], ...], ...], ...]:
    """(input width, parameters) of every reader linear of every site of every layer."""
    return tuple(reader_sizes_of(layer_adapter.site_modules()) for layer_adapter in adapter.layer_adapters())


def attach_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """Attach the plan to the model, and to its config so that `save_pretrained` writes it."""
    setattr(model, PLAN_ATTRIBUTE, plan)
    model.config.rotsparse = plan.to_dict()


def install_topk(adapter: ModelAdapter, plan: SparsityPlan) -> None:
    """Replace every site linear by a `TopKLinear` with the plan's K (per reader linear where the plan has
    them), and route the (dense) lm_head through the dense decode kernel (`KernelLinear`: same weight, same
    function)."""
    layer_adapters = adapter.layer_adapters()
    if len(plan.keep_k) != len(layer_adapters):
        raise ValueError(f"plan has {len(plan.keep_k)} layers, model has {len(layer_adapters)}")
    for index, layer_adapter in enumerate(layer_adapters):
        for position, site in enumerate(SITES):
            linears = layer_adapter.site_linears()[site]
            for (parent, name), keep_k in zip(linears, plan.site_reader_keep_k(index, position, len(linears))):
                linear = getattr(parent, name)  # adopt_hooks: an accelerate-offloaded linear keeps its store
                setattr(parent, name, adopt_hooks(linear, TopKLinear.from_linear(linear, keep_k, site)))
    apply_topk_options(adapter.model, plan.config)
    install_head_kernel(adapter.model)


def set_kernels(model: nn.Module, enabled: bool) -> None:
    """Switch the sparse decode kernels on or off (off: the dense-masked path, same function)."""
    for module in model.modules():
        if isinstance(module, TopKLinear):
            module.use_kernel = enabled
