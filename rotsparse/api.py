"""`sparsify`: calibrate, rotate, fold and install Top-K on a Hugging Face causal LM, in place."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .calibration import collect_statistics
from .config import SITES, SparsifyConfig, SparsityPlan
from .rotation import fold_input, pca_rotation, residual_adapter, rotate_embedding, rotate_output
from .topk import TopKLinear, allocate_keep_k, attach_output_rotation, is_sparsified, site_sizes_of

logger = logging.getLogger("rotsparse")

PLAN_ATTRIBUTE = "rotsparse_plan"


def sparsify(model: nn.Module, tokenizer=None, sparsity: float | None = None, *, method: str | None = None,
             calibration: str | Sequence[str] | torch.Tensor | None = None, config: SparsifyConfig | None = None,
             progress: bool = True, **config_fields) -> nn.Module:
    """Make `model` run with fixed per-token Top-K activations; returns the same model, changed in place.

    calibration: "embedded" / None (the embedded corpus' calibration part), a path or dataset name
        (see `rotsparse.data.load_texts`), a list of strings, or token ids (n, seq).
    config: a full `SparsifyConfig`; otherwise one is built from `sparsity`, `method` and `config_fields`.
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
    torch.manual_seed(config.seed)

    rotated = config.method == "larosa"
    if rotated:
        input_ids, attention_mask = _calibration_tokens(tokenizer, calibration, config)
        statistics = collect_statistics(model, adapter, input_ids, attention_mask, progress=progress)
        rotations = [pca_rotation(layer.attn_input) for layer in statistics]
        fold_rotations(adapter, rotations)

    site_sizes = site_sizes_for(adapter)
    keep_k = allocate_keep_k(site_sizes, config.sparsity, config.coefficients)
    plan = SparsityPlan(keep_k=keep_k, site_sizes=site_sizes, rotated=rotated, config=config)
    install_topk(adapter, plan)
    attach_plan(model, plan)
    logger.info("rotsparse: method=%s requested sparsity=%.4f effective sparsity=%.4f",
                config.method, config.sparsity, plan.effective_sparsity)
    return model


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
    return tuple(
        site_sizes_of({site: [getattr(parent, name) for parent, name in pairs]
                       for site, pairs in layer_adapter.site_linears().items()})
        for layer_adapter in adapter.layer_adapters()
    )


def attach_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """Attach the plan to the model, and to its config so that `save_pretrained` writes it."""
    setattr(model, PLAN_ATTRIBUTE, plan)
    model.config.rotsparse = plan.to_dict()


@torch.no_grad()
def fold_rotations(adapter: ModelAdapter, rotations: list[torch.Tensor]) -> None:
    """Fold per-layer rotations Q_l (d, d) and the pre-norm scales into the weights; exact at sparsity 0.

    Embeddings -> E Q_0; q/k/v and gate/up -> W diag(g) Q_l; o_proj/down_proj outputs -> Q_l^T W (or, after
    a post-norm, an output rotation on that norm); adapters Q_l^T Q_{l+1} between layers; lm_head ->
    W diag(g_final) Q_last. Math in float64, cast back once.
    """
    layer_adapters = adapter.layer_adapters()
    if len(rotations) != len(layer_adapters):
        raise ValueError(f"{len(rotations)} rotations for {len(layer_adapters)} layers")
    adapter.untie_embeddings()
    embed = adapter.embed_tokens
    embed.weight.copy_(rotate_embedding(embed.weight, rotations[0].to(embed.weight.device)))
    for index, (layer_adapter, rotation) in enumerate(zip(layer_adapters, rotations)):
        _fold_layer(layer_adapter, rotation)
        if index + 1 < len(rotations):
            weight = layer_adapter.attn_input_norm.weight
            adapter_matrix = residual_adapter(rotation, rotations[index + 1])
            attach_output_rotation(layer_adapter.layer, adapter_matrix.to(device=weight.device, dtype=weight.dtype))
    head, final_norm = adapter.lm_head, adapter.final_norm
    scale = adapter.layer_adapter_class.norm_scale(final_norm)
    head.weight.copy_(fold_input(head.weight, scale, rotations[-1].to(head.weight.device)))
    adapter.layer_adapter_class.set_unit_norm(final_norm)


def _fold_layer(layer_adapter, rotation: torch.Tensor) -> None:
    for norm, linears in ((layer_adapter.attn_input_norm, layer_adapter.qkv),
                          (layer_adapter.mlp_input_norm, layer_adapter.gate_up)):
        scale = layer_adapter.norm_scale(norm)
        for linear in linears:
            linear.weight.copy_(fold_input(linear.weight, scale, rotation.to(linear.weight.device)))
        layer_adapter.set_unit_norm(norm)
    for output_norm, linear in ((layer_adapter.attn_output_norm, layer_adapter.o_proj),
                                (layer_adapter.mlp_output_norm, layer_adapter.down_proj)):
        if output_norm is None:
            weight, bias = rotate_output(linear.weight, linear.bias, rotation.to(linear.weight.device))
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        else:
            weight = output_norm.weight
            attach_output_rotation(output_norm, rotation.to(device=weight.device, dtype=weight.dtype))


def install_topk(adapter: ModelAdapter, plan: SparsityPlan) -> None:
    """Replace every site linear by a `TopKLinear` with the plan's K."""
    layer_adapters = adapter.layer_adapters()
    if len(plan.keep_k) != len(layer_adapters):
        raise ValueError(f"plan has {len(plan.keep_k)} layers, model has {len(layer_adapters)}")
    for layer_adapter, layer_k in zip(layer_adapters, plan.keep_k):
        for site, keep_k in zip(SITES, layer_k):
            for parent, name in layer_adapter.site_linears()[site]:
                setattr(parent, name, TopKLinear.from_linear(getattr(parent, name), keep_k, site))


def set_kernels(model: nn.Module, enabled: bool) -> None:
    """Switch the sparse decode kernels on or off (off: the dense-masked path, same function)."""
    for module in model.modules():
        if isinstance(module, TopKLinear):
            module.use_kernel = enabled
