"""The layer-by-layer runner of every calibration measurement: only one layer's activations are held at a time.

The inputs of every decoder layer (hidden states of layer 0, and the per-layer keyword arguments such as
attention masks and rotary embeddings, which differ between layer types in e.g. Gemma-3) are recorded in
one cheap pass where every layer is replaced by a pass-through recorder. Then layers run one at a time
over all calibration sequences (`LayerStep.run`); measurements hook into those runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .families import Family
from .offload import execution_device, materialized
from .progress import Progress


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
def _recording_layers(family: Family, records: list[list]):
    layers = family.layers
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
    def run(self, layer: nn.Module | None = None,
            before_each: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """Outputs (1, seq, d) of `layer` (default: this step's layer) on every sequence; `before_each(row,
        token_mask)` is called before sequence `row` runs (for hooks that need to know which one it is)."""
        layer = self.layer if layer is None else layer
        outputs = []
        for row, (hidden, kwargs, mask) in enumerate(zip(self.hidden, self.kwargs, self.token_mask)):
            if before_each is not None:
                before_each(row, mask)
            outputs.append(run_layer(layer, hidden, kwargs))
        return outputs


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder layer's output hidden states (1, seq, d) for input `hidden` (1, seq, d)."""
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def layerwise(model: nn.Module, family: Family, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None, progress: bool = True,
              stage: str = "calibration") -> Iterator[LayerStep]:
    """Yield a `LayerStep` per decoder layer; after each, advance the hidden states through the dense layer.

    input_ids: (n, seq) long. attention_mask: (n, seq), 1 on real tokens. Sequences run one at a time, on the
    device the embeddings compute on; each layer runs where its weights are (accelerate moves the inputs).
    With `progress`, one log line per layer (`rotsparse.progress`) names `stage`, the time so far and an ETA.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"calibration input_ids must have shape (n, seq) with n, seq > 0, got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    device = execution_device(family.embed_tokens)  # the weight is on meta when accelerate offloads it
    num_layers = len(family.layers)
    records: list[list[dict]] = [[] for _ in range(num_layers)]
    hidden: list[torch.Tensor] = []
    token_mask: list[torch.Tensor] = []
    with torch.no_grad(), _recording_layers(family, records):
        for row in range(input_ids.shape[0]):
            ids = input_ids[row : row + 1].to(device)
            mask = None if attention_mask is None else attention_mask[row : row + 1].to(device)
            hidden.append(family.embed_tokens(ids))
            token_mask.append(torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
            family.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    bar = Progress(stage, num_layers, enabled=progress, unit="layer")
    for index in range(num_layers):
        layer = family.layers[index]
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
        bar.step()
