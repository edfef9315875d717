"""`sparsify`: calibrate, rotate/scale, fold and install Top-K on a Hugging Face causal LM, in place."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from . import methods
from .adapters import ModelAdapter, get_adapter
from .config import SITES, SparsifyConfig, SparsityPlan
from .methods import CALIBRATED_METHODS, Calibration
from .offload import adopt_hooks
from .topk import TopKLinear, allocate_keep_k, apply_topk_options, install_head_kernel, is_sparsified, site_sizes_of

logger = logging.getLogger("rotsparse")

PLAN_ATTRIBUTE = "rotsparse_plan"


def sparsify(model: nn.Module, tokenizer=None, sparsity: float | None = None, *, method: str | None = None,
             calibration: str | Sequence[str] | torch.Tensor | None = None, config: SparsifyConfig | None = None,
             progress: bool = True, calibrated: Calibration | None = None, **config_fields) -> nn.Module:
    """Make `model` run with fixed per-token Top-K activations; returns the same model, changed in place.

    calibration: "embedded" / None (the embedded corpus' calibration part), a path or dataset name
        (see `rotsparse.data.load_texts`), a list of strings, or token ids (n, seq).
    config: a full `SparsifyConfig`; otherwise one is built from `sparsity`, `method` and `config_fields`.
    calibrated: the result of `calibrate` on this same (dense) model, to reuse one calibration for
        several sparsities; `calibration` is then ignored.
    The plan (K per site, effective sparsity) is attached as ``model.rotsparse_plan``.
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
    site_sizes = site_sizes_for(adapter)
    rotated = False
    if config.method in CALIBRATED_METHODS:
        if calibrated is None:
            calibrated = calibrate(model, tokenizer, calibration, config=config, progress=progress)
        elif calibrated.method != config.method:
            raise ValueError(f"calibrated for method {calibrated.method!r}, asked for {config.method!r}")
        keep_k, rotated, _ = methods.apply(adapter, calibrated, config, site_sizes)
    else:
        keep_k = allocate_keep_k(site_sizes, config.sparsity, config.coefficients)
    plan = SparsityPlan(keep_k=keep_k, site_sizes=site_sizes, rotated=rotated, config=config,
                        calibration_tokens=calibrated.tokens if calibrated is not None else 0)
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
    weights). `options` switches parts of ``auto`` off, for ablations.
    """
    config = config or SparsifyConfig()
    torch.manual_seed(config.seed)
    input_ids, attention_mask = _calibration_tokens(tokenizer, calibration, config)
    return methods.calibrate(model, get_adapter(model), input_ids, attention_mask, config, options, progress)


def _calibration_tokens(tokenizer, calibration, config: SparsifyConfig):
    """(input_ids (n, seq), attention_mask or None) from whatever the user passed."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int32, torch.int64) or calibration.ndim != 2:
            raise ValueError(f"calibration token ids must be an integer tensor (n, seq), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        return calibration.long(), None
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to calibrate on text")
    from .data import calibration_batch, load_texts

    texts = load_texts("embedded" if calibration is None else calibration, part="calibration")
    input_ids = calibration_batch(tokenizer, texts, num_sequences=config.num_sequences,
                                  sequence_length=config.sequence_length)
    return input_ids, None


def site_sizes_for(adapter: ModelAdapter) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(input width, parameters fed) of every site of every layer."""
    return tuple(site_sizes_of(layer_adapter.site_modules()) for layer_adapter in adapter.layer_adapters())


def attach_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """Attach the plan to the model, and to its config so that `save_pretrained` writes it."""
    setattr(model, PLAN_ATTRIBUTE, plan)
    model.config.rotsparse = plan.to_dict()


def install_topk(adapter: ModelAdapter, plan: SparsityPlan) -> None:
    """Replace every site linear by a `TopKLinear` with the plan's K, and route the (dense) lm_head through
    the dense decode kernel (`KernelLinear`: same weight, same function)."""
    layer_adapters = adapter.layer_adapters()
    if len(plan.keep_k) != len(layer_adapters):
        raise ValueError(f"plan has {len(plan.keep_k)} layers, model has {len(layer_adapters)}")
    for layer_adapter, layer_k in zip(layer_adapters, plan.keep_k):
        for site, keep_k in zip(SITES, layer_k):
            for parent, name in layer_adapter.site_linears()[site]:
                linear = getattr(parent, name)  # adopt_hooks: an accelerate-offloaded linear keeps its store
                setattr(parent, name, adopt_hooks(linear, TopKLinear.from_linear(linear, keep_k, site)))
    apply_topk_options(adapter.model, plan.config)
    install_head_kernel(adapter.model)


def set_kernels(model: nn.Module, enabled: bool) -> None:
    """Switch the sparse decode kernels on or off (off: the dense-masked path, same function)."""
    for module in model.modules():
        if isinstance(module, TopKLinear):
            module.use_kernel = enabled
