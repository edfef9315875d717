"""Weight surgery: fold residual bases, value-head rotations and WINA scales into a model's weights, exactly.

Every fold computes in float64 (`rotsparse.rotation`) and casts back to the model's dtype once. Nothing here
measures or chooses; offloaded (accelerate) layers are materialized one at a time.
"""

from __future__ import annotations

import torch

from .families import Family, Layer, norm_scale, set_unit_norm
from .measure import Calibration
from .offload import materialized
from .rotation import (column_scale, expand_head_scale, fold_input, grouped_head_scale, head_block_rotation,
                       residual_rotation, rotate_embedding, rotate_output, scale_input, scale_output)
from .runtime import attach_output_rotation


@torch.no_grad()
def fold_rotations(family: Family, rotations: list[torch.Tensor | None]) -> None:
    """Fold per-layer rotations Q_l (d, d; None = identity) and the pre-norm scales into the weights.

    Embeddings -> E Q_0; q/k/v and gate/up -> W diag(g) Q_l; o_proj/down_proj outputs -> Q_l^T W (or, after
    a post-norm, an output rotation on that norm); residual rotations Q_l^T Q_{l+1} between layers whose bases
    differ (the same tensor object, or None twice, is one basis: no residual rotation); lm_head -> W Q_last
    (diag(g_final) folded only when rotated). Exact; float64, cast back once.
    """
    layers = family.layer_views()
    if len(rotations) != len(layers):
        raise ValueError(f"{len(rotations)} rotations for {len(layers)} layers")
    with materialized(family.embed_tokens, family.lm_head):  # offloaded (accelerate) modules: one at a time
        if rotations[0] is not None or rotations[-1] is not None:
            family.untie_embeddings()
        embed = family.embed_tokens
        if rotations[0] is not None:
            embed.weight.copy_(rotate_embedding(embed.weight, rotations[0].to(embed.weight.device)))
    for index, (layer, rotation) in enumerate(zip(layers, rotations)):
        with materialized(layer.layer):
            _fold_layer(layer, rotation)
            following = rotations[index + 1] if index + 1 < len(rotations) else None
            if index + 1 < len(rotations) and rotation is not following:
                weight = layer.qkv[0].weight
                identity = torch.eye(family.hidden_size, dtype=torch.float64, device=weight.device)
                matrix = residual_rotation(identity if rotation is None else rotation.to(weight.device),
                                          identity if following is None else following.to(weight.device))
                attach_output_rotation(layer.layer, matrix.to(device=weight.device, dtype=weight.dtype))
    if rotations[-1] is not None:
        head, final_norm = family.lm_head, family.final_norm
        with materialized(head, final_norm):
            scale = norm_scale(family.spec, final_norm)
            head.weight.copy_(fold_input(head.weight, scale, rotations[-1].to(head.weight.device)))
            set_unit_norm(family.spec, final_norm)


def _fold_layer(layer: Layer, rotation: torch.Tensor | None) -> None:
    for norm, linears in ((layer.attn_input_norm, layer.qkv),
                          (layer.mlp_input_norm, layer.gate_up)):
        if norm is None and rotation is None:
            continue
        scale = None if norm is None else layer.norm_scale(norm)  # no pre-norm: the linears read the residual
        for linear in linears:
            device = linear.weight.device
            linear.weight.copy_(fold_input(linear.weight, None if scale is None else scale.to(device),
                                           None if rotation is None else rotation.to(device)))
        if norm is not None:
            layer.set_unit_norm(norm)
    if rotation is None:
        return
    for output_norm, linear in ((layer.attn_output_norm, layer.o_proj),
                                (layer.mlp_output_norm, layer.down_proj)):
        if output_norm is None:
            weight, bias = rotate_output(linear.weight, linear.bias, rotation.to(linear.weight.device))
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        else:
            weight = output_norm.weight
            attach_output_rotation(output_norm, rotation.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def fold_value_rotation(layer: Layer, rotations: torch.Tensor) -> None:
    """Rotate every value head (kv_heads, head_dim, head_dim): v_proj rows (and bias) -> R^T W_v per value head,
    o_proj columns -> W_o R per query head (its group's R). Exact: attention mixes each head's values linearly."""
    heads, kv_heads = layer.attention_heads()
    if rotations.shape[0] != kv_heads:
        raise ValueError(f"{rotations.shape[0]} value-head rotations for {kv_heads} value heads")
    v_proj, o_proj = layer.v_proj, layer.o_proj
    value_block = head_block_rotation(rotations, kv_heads).to(v_proj.weight.device)
    weight, bias = rotate_output(v_proj.weight, v_proj.bias, value_block)
    v_proj.weight.copy_(weight)
    if bias is not None:
        v_proj.bias.copy_(bias)
    query_block = head_block_rotation(rotations, heads).to(o_proj.weight.device)
    o_proj.weight.copy_(fold_input(o_proj.weight, None, query_block))


@torch.no_grad()
def fold_scales(layer: Layer, scales: dict[str, torch.Tensor] | None = None) -> None:
    """Fold WINA scales into one layer whose pre-norms are unit (after `fold_rotations`); exact for any scales.

    scales: h1/h3 (d,), h2 (num_kv_heads * head_dim,), h4 (intermediate,), as `rotsparse.measure` measured
    them; None measures plain column norms here. First h2/h4: v_proj rows (and bias) *= c, o_proj columns
    /= c (c shared within GQA groups); up_proj rows *= c, down_proj columns /= c. Then h1/h3: pre-norm
    scale := c, q/k/v and gate/up W := W diag(1/c). A site without a pre-norm (OLMo-2) reads the residual stream
    itself, which has no per-site place for a scale: its h1/h3 scales are not folded (calibration measures them
    as ones). The h2/h4 producer is `Layer.v_proj` / `Layer.up_proj` (rows of a fused linear, Phi-3).
    """
    heads, kv_heads = layer.attention_heads()
    if scales is None:
        scales = {"h2": grouped_head_scale(column_scale([layer.o_proj.weight]), heads, kv_heads),
                  "h4": column_scale([layer.down_proj.weight])}
    for producer, consumer, output_scale, input_scale in (
            (layer.v_proj, layer.o_proj, scales["h2"],
             expand_head_scale(scales["h2"], heads, kv_heads)),
            (layer.up_proj, layer.down_proj, scales["h4"], scales["h4"])):
        device = producer.weight.device
        weight, bias = scale_output(producer.weight, producer.bias, output_scale.to(device))
        producer.weight.copy_(weight)
        if bias is not None:
            producer.bias.copy_(bias)
        consumer.weight.copy_(scale_input(consumer.weight, input_scale.to(consumer.weight.device)))
    for site, norm, linears in (("h1", layer.attn_input_norm, layer.qkv),
                                ("h3", layer.mlp_input_norm, layer.gate_up)):
        if norm is None:
            continue
        scale = scales.get(site)
        if scale is None:
            scale = column_scale([linear.weight for linear in linears])
        for linear in linears:
            linear.weight.copy_(scale_input(linear.weight, scale.to(linear.weight.device)))
        unit = layer.norm_scale(norm).double()  # unit norm: 1 in the family's convention
        norm.weight.copy_(norm.weight.double() + scale.to(norm.weight.device) - unit)


def fold_choices(family: Family, calibration: Calibration, choice: list[int], value_choice: list[int]) -> None:
    """Fold what was chosen for one sparsity: per layer the residual basis (`choice`: candidate index), the
    value-head rotation (`value_choice`) and, with scaling, the WINA scales measured for those candidates."""
    fold_rotations(family, [layer.rotations[index] for layer, index in zip(calibration.layers, choice)])
    for view, layer, index, value_index in zip(family.layer_views(), calibration.layers, choice, value_choice):
        with materialized(view.layer):
            if layer.value_rotations[value_index] is not None:
                fold_value_rotation(view, layer.value_rotations[value_index])
            if calibration.options.scaling:
                chosen = {"h1": index, "h2": value_index, "h3": index, "h4": 0}
                fold_scales(view, {site: values[chosen[site]] for site, values in layer.scales.items()})
