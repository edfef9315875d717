"""Calibration statistics of the dense model, each from one layer-by-layer pass (`rotsparse.runner`): uncentred
second moments (`SecondMoment`), the residual stream's moments per layer (`residual_moments`) and the loss
sensitivity of every site linear's outputs (`loss_sensitivity`). All in float64, on the device each layer
computes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from .families import Family
from .offload import execution_device, materialized
from .progress import Progress
from .runner import layerwise, run_layer


def normalized_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) per row, in float64, as RMSNorm computes it before its scale. (n, d) -> (n, d)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class SecondMoment:
    """Running uncentred second moment X^T X (d, d) in float64 on `device`, and its token count."""

    def __init__(self, width: int, device: torch.device | str):
        self.sum = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(device=self.sum.device, dtype=torch.float64)
        if not torch.isfinite(rows).all():
            raise FloatingPointError("NaN/Inf in calibration activations")
        self.sum += rows.T @ rows
        self.tokens += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen")
        return self.sum / self.tokens


@dataclass
class ResidualMoments:
    """Per decoder layer, statistics of its normalised attention input in the dense model.

    moments[l]: (d, d) float64 uncentred second moment over real tokens.
    sink_rows[l]: (n, d) float64, the row of each sequence's first real token (its attention sink).
    """

    moments: list[torch.Tensor]
    sink_rows: list[torch.Tensor]


def residual_moments(model: nn.Module, family: Family, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, max_sequences: int = 4,
                     progress: bool = False) -> ResidualMoments:
    """`ResidualMoments` of every layer from one forward pass over the first `max_sequences` sequences (n, seq).

    The statistics of residual bases shared by several layers (``auto``'s ``global`` and ``run<G>``
    candidates), which a layer-by-layer pass cannot give while it is at the first layer of the group.
    """
    input_ids = input_ids[:max_sequences]
    attention_mask = None if attention_mask is None else attention_mask[:max_sequences]
    moments, sink_rows = [], []
    for step in layerwise(model, family, input_ids, attention_mask, progress, stage="residual moments"):
        layer = family.layer(step.layer)
        norm = layer.pre_norm("h1")  # None: q/k/v read the raw residual stream, hooked at their first reader
        eps = None if norm is None else layer.norm_eps(norm)
        moment, sinks, current = SecondMoment(family.hidden_size, execution_device(step.layer)), [], {}

        def rows_of(x, eps=eps):
            return x.double() if eps is None else normalized_rows(x, eps)

        def hook(module, args, moment=moment, sinks=sinks, current=current, rows_of=rows_of):
            mask = current["mask"]
            moment.add(rows_of(args[0][mask]))
            sinks.append(rows_of(args[0][0, int(mask[0].int().argmax())][None]))

        handle = layer.site_input("h1").register_forward_pre_hook(hook)
        try:
            step.outputs = step.run(before_each=lambda row, mask, current=current: current.update(mask=mask))
        finally:
            handle.remove()
        moments.append(moment.mean)
        sink_rows.append(torch.cat(sinks))
    return ResidualMoments(moments, sink_rows)


@dataclass
class LossSensitivity:
    """How much the next-token loss moves when a site linear's output moves, per layer, site and reader
    (`Layer.site_modules` order).

    fisher[layer][site][reader]: (out,) float64, mean squared loss gradient of each output over real tokens
        (the diagonal empirical Fisher: an output error e costs about sum(fisher * e^2) / 2 in loss).
    token_energy[layer][site][reader]: (n, seq) float64, squared gradient norm of each token's output row,
        0 on padding; its mean over real tokens is fisher.sum().
    sequences: how many calibration sequences (the first ones) were measured.
    """

    fisher: list[dict[str, list[torch.Tensor]]]
    token_energy: list[dict[str, list[torch.Tensor]]]
    sequences: int


def loss_sensitivity(model: nn.Module, family: Family, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, progress: bool = True,
                     max_sequences: int = 4) -> LossSensitivity:
    """`LossSensitivity` of every site linear's outputs over the first `max_sequences` sequences (n, seq).

    Layer by layer, like calibration: a forward pass keeps every layer's input hidden states for those
    sequences, then the loss gradient is carried back one layer at a time (each layer recomputed with
    gradients on its input only). No parameter gradients are kept.
    """
    input_ids = input_ids[:max_sequences]
    attention_mask = None if attention_mask is None else attention_mask[:max_sequences]
    tokens = input_ids.numel() if attention_mask is None else int(attention_mask.bool().sum())
    if input_ids.numel() and (tokens == 0 or input_ids.shape[1] < 2):  # empty input: `layerwise` names the shape
        raise ValueError("calibration sequences are too short to measure loss sensitivity (need >= 2 tokens)")
    inputs, kwargs, masks = [], [], None
    for step in layerwise(model, family, input_ids, attention_mask, progress, stage="loss sensitivity, forward"):
        inputs.append(list(step.hidden))  # the step's list is refilled with the next layer's inputs
        kwargs.append(step.kwargs)
        masks = step.token_mask
        step.outputs = step.run()
        last_outputs = step.outputs
    grads = []
    with torch.enable_grad(), materialized(family.final_norm, family.lm_head, writeback=False):
        for hidden, ids, mask in zip(last_outputs, input_ids, masks):
            hidden = hidden.detach().requires_grad_()
            logits = family.logits(hidden)
            targets = ids[None, 1:].to(logits.device).masked_fill(~mask[:, 1:], -100)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                               ignore_index=-100, reduction="sum")
            (grad,) = torch.autograd.grad(loss, hidden)
            grads.append(grad)
    num_layers = len(family.layers)
    fisher, token_energy = [None] * num_layers, [None] * num_layers
    bar = Progress("loss sensitivity, backward", num_layers, enabled=progress, unit="layer")
    for index in reversed(range(num_layers)):
        layer = family.layer(family.layers[index])
        device = execution_device(layer.layer)
        linears = layer.site_modules()
        sums = {site: [0.0] * len(modules) for site, modules in linears.items()}
        energies = {site: [torch.zeros(input_ids.shape, dtype=torch.float64, device=device) for _ in modules]
                    for site, modules in linears.items()}
        current_row: list = []

        def make_hook(site: str, position: int):
            def accumulate(grad):
                row, mask = current_row
                squares = grad.detach()[0].double().pow(2) * mask[0, :, None]  # (seq, out), 0 on padding
                sums[site][position] = sums[site][position] + squares.sum(0)
                energies[site][position][row] = squares.sum(1)

            def hook(module, args, output):
                output.register_hook(accumulate)

            return hook

        handles = [module.register_forward_hook(make_hook(site, position))
                   for site, modules in linears.items() for position, module in enumerate(modules)]
        try:
            with torch.enable_grad(), materialized(layer.layer, writeback=False):
                for row, (hidden, layer_kwargs, mask) in enumerate(zip(inputs[index], kwargs[index], masks)):
                    current_row[:] = [row, mask]
                    hidden = hidden.detach().requires_grad_()
                    output = run_layer(layer.layer, hidden, layer_kwargs)
                    (grads[row],) = torch.autograd.grad(output, hidden, grads[row])
        finally:
            for handle in handles:
                handle.remove()
        fisher[index] = {site: [entry / tokens for entry in entries] for site, entries in sums.items()}
        token_energy[index] = energies
        inputs[index] = None
        bar.step()
    return LossSensitivity(fisher, token_energy, input_ids.shape[0])
