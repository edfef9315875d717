"""Layer-by-layer calibration: only one layer's activations are held at any time.

The inputs of every decoder layer (hidden states of layer 0, and the per-layer keyword arguments such as
attention masks and rotary embeddings, which differ between layer types in e.g. Gemma-3) are recorded in
one cheap pass where every layer is replaced by a pass-through recorder. Then layers run one at a time
over all calibration sequences, and hooks accumulate uncentred second moments in float64.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter
from .offload import execution_device, materialized


class _InputRecorder(nn.Module):
    """Stands in for a decoder layer: records (hidden_states, kwargs) and passes hidden_states through."""

    def __init__(self, layer: nn.Module, records: list):
        super().__init__()
        self.wrapped = layer
        self.records = records

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["wrapped"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("rotsparse expects decoder layers to be called with keyword arguments after hidden_states")
        self.records.append(kwargs)
        return hidden_states


@contextlib.contextmanager
def _recording_layers(adapter: ModelAdapter, records: list[list]):
    layers = adapter.layers
    originals = list(layers)
    for index, layer in enumerate(originals):
        layers[index] = _InputRecorder(layer, records[index])
    try:
        yield
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


@dataclass
class LayerStep:
    """One decoder layer during calibration.

    hidden[i]: input hidden states of sequence i, shape (1, seq, d). kwargs[i]: its layer keyword arguments.
    token_mask[i]: (1, seq) bool, False on padding.
    """

    index: int
    layer: nn.Module
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    token_mask: list[torch.Tensor]
    outputs: list[torch.Tensor] | None = None
    """Set by a consumer that already ran the dense layer, so it is not run twice."""

    @torch.no_grad()
    def run(self, layer: nn.Module | None = None) -> list[torch.Tensor]:
        """Outputs of `layer` (default: this step's layer) on every sequence."""
        layer = self.layer if layer is None else layer
        outputs = []
        for hidden, kwargs in zip(self.hidden, self.kwargs):
            output = layer(hidden, **kwargs)
            outputs.append(output[0] if isinstance(output, tuple) else output)
        return outputs


def layerwise(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None, progress: bool = True) -> Iterator[LayerStep]:
    """Yield a `LayerStep` per decoder layer; after each, advance the hidden states through the dense layer.

    input_ids: (n, seq) long. attention_mask: (n, seq), 1 on real tokens. Sequences run one at a time.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"calibration input_ids must have shape (n, seq) with n, seq > 0, got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    device = execution_device(adapter.embed_tokens)  # the weight is on meta when accelerate offloads it
    num_layers = len(adapter.layers)
    records: list[list[dict]] = [[] for _ in range(num_layers)]
    hidden: list[torch.Tensor] = []
    token_mask: list[torch.Tensor] = []
    with torch.no_grad(), _recording_layers(adapter, records):
        for row in range(input_ids.shape[0]):
            ids = input_ids[row : row + 1].to(device)
            mask = None if attention_mask is None else attention_mask[row : row + 1].to(device)
            hidden.append(adapter.embed_tokens(ids))
            token_mask.append(torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
            adapter.base(input_ids=ids, attention_mask=mask, use_cache=False)
    for index in tqdm(range(num_layers), desc="calibrating layers", disable=not progress):
        layer = adapter.layers[index]
        kwargs = [records[index][row] for row in range(len(hidden))]
        step = LayerStep(index, layer, hidden, kwargs, token_mask)
        with materialized(layer, writeback=False):  # an offloaded layer is loaded once, not per sequence
            yield step
            outputs = step.outputs if step.outputs is not None else step.run()
        for output, mask in zip(outputs, token_mask):
            if not torch.isfinite(output[mask]).all():
                raise FloatingPointError(
                    f"NaN/Inf in the activations after decoder layer {index}; the model or its inputs are broken "
                    f"(try float32, or check the weights)"
                )
        hidden[:] = outputs
        records[index] = []


def normalized_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) per row, in float64, as RMSNorm computes it before its scale. (n, d) -> (n, d)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class SecondMoment:
    """Running uncentred second moment X^T X (d, d) in float64 and its token count."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
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


def residual_moments(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, max_sequences: int = 4) -> ResidualMoments:
    """`ResidualMoments` of every layer from one forward pass over the first `max_sequences` sequences (n, seq).

    The statistics of residual bases shared by several layers (``auto``'s ``global`` and ``run<G>``
    candidates), which a layer-by-layer pass cannot give while it is at the first layer of the group.
    """
    input_ids = input_ids[:max_sequences]
    attention_mask = None if attention_mask is None else attention_mask[:max_sequences]
    moments, sink_rows = [], []
    for step in layerwise(model, adapter, input_ids, attention_mask, progress=False):
        layer_adapter = adapter.layer_adapter_class(step.layer)
        norm = layer_adapter.attn_input_norm
        eps = layer_adapter.norm_eps(norm)
        moment, sinks = SecondMoment(norm.weight.shape[-1]), []
        masks = iter(step.token_mask)  # `run` feeds the sequences in this order

        def hook(module, args, moment=moment, sinks=sinks, masks=masks, eps=eps):
            mask = next(masks)
            moment.add(normalized_rows(args[0][mask], eps))
            sinks.append(normalized_rows(args[0][0, int(mask[0].int().argmax())][None], eps))

        handle = norm.register_forward_pre_hook(hook)
        try:
            step.outputs = step.run()
        finally:
            handle.remove()
        moments.append(moment.mean)
        sink_rows.append(torch.cat(sinks).cpu())
    return ResidualMoments(moments, sink_rows)


@dataclass
class LossSensitivity:
    """How much the next-token loss moves when a site linear's output moves, per layer, site and reader
    (`LayerAdapter.site_modules` order).

    fisher[layer][site][reader]: (out,) float64, mean squared loss gradient of each output over real tokens
        (the diagonal empirical Fisher: an output error e costs about sum(fisher * e^2) / 2 in loss).
    token_energy[layer][site][reader]: (n, seq) float64, squared gradient norm of each token's output row,
        0 on padding; its mean over real tokens is fisher.sum().
    sequences: how many calibration sequences (the first ones) were measured.
    """

    fisher: list[dict[str, list[torch.Tensor]]]
    token_energy: list[dict[str, list[torch.Tensor]]]
    sequences: int


def loss_sensitivity(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor,
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
    for step in layerwise(model, adapter, input_ids, attention_mask, progress=False):
        inputs.append(list(step.hidden))  # the step's list is refilled with the next layer's inputs
        kwargs.append(step.kwargs)
        masks = step.token_mask
        step.outputs = step.run()
        last_outputs = step.outputs
    grads = []
    with torch.enable_grad(), materialized(adapter.final_norm, adapter.lm_head, writeback=False):
        for hidden, ids, mask in zip(last_outputs, input_ids, masks):
            hidden = hidden.detach().requires_grad_()
            logits = adapter.logits(hidden)
            targets = ids[None, 1:].to(logits.device).masked_fill(~mask[:, 1:], -100)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                               ignore_index=-100, reduction="sum")
            (grad,) = torch.autograd.grad(loss, hidden)
            grads.append(grad)
    num_layers = len(adapter.layers)
    fisher, token_energy = [None] * num_layers, [None] * num_layers
    for index in tqdm(reversed(range(num_layers)), total=num_layers, desc="loss sensitivity",
                      disable=not progress):
        layer_adapter = adapter.layer_adapter_class(adapter.layers[index])
        linears = layer_adapter.site_modules()
        sums = {site: [0.0] * len(modules) for site, modules in linears.items()}
        energies = {site: [torch.zeros(input_ids.shape, dtype=torch.float64) for _ in modules]
                    for site, modules in linears.items()}
        current_row: list = []

        def make_hook(site: str, position: int):
            def accumulate(grad):
                row, mask = current_row
                squares = grad.detach()[0].double().pow(2) * mask[0, :, None]  # (seq, out), 0 on padding
                sums[site][position] = sums[site][position] + squares.sum(0).cpu()
                energies[site][position][row] = squares.sum(1).cpu()

            def hook(module, args, output):
                output.register_hook(accumulate)

            return hook

        handles = [module.register_forward_hook(make_hook(site, position))
                   for site, modules in linears.items() for position, module in enumerate(modules)]
        try:
            with torch.enable_grad(), materialized(layer_adapter.layer, writeback=False):
                for row, (hidden, layer_kwargs, mask) in enumerate(zip(inputs[index], kwargs[index], masks)):
                    current_row[:] = [row, mask]
                    hidden = hidden.detach().requires_grad_()
                    output = layer_adapter.layer(hidden, **layer_kwargs)
                    output = output[0] if isinstance(output, tuple) else output
                    (grads[row],) = torch.autograd.grad(output, hidden, grads[row])
        finally:
            for handle in handles:
                handle.remove()
        fisher[index] = {site: [entry / tokens for entry in entries] for site, entries in sums.items()}
        token_energy[index] = energies
        inputs[index] = None
    return LossSensitivity(fisher, token_energy, input_ids.shape[0])
