"""Compiled decode: `compile(model)` puts ``torch.compile`` on a (sparsified or dense) model's forward, the fastest
decode PyTorch offers together with a static KV cache:

    import rotsparse
    model = rotsparse.sparsify(model, tokenizer, sparsity=0.4)
    rotsparse.compile(model)                        # mode="reduce-overhead", fullgraph=True
    output = model.generate(**inputs, max_new_tokens=64, cache_implementation="static")

Why it compiles without a graph break: every kernel is a ``torch.library`` custom op with a fake (meta)
implementation (`rotsparse.kernels.ops`); K is a Python int per linear (static); the decode-vs-prefill choice of
`TopKLinear`, `KernelLinear` and the residual rotations depends on shapes only (one token: the sparse kernel;
more tokens per call, or a batch > 1: the dense-masked path), so it is fixed per compiled graph; the residual
rotation hooks are plain forward hooks, which dynamo inlines.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels

MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes of the inductor backend. On CPU "reduce-overhead" has no CUDA graphs (it then compiles
like "default"); on CUDA it replays the decode step from a CUDA graph."""

EAGER_FORWARD = "rotsparse_eager_forward"
"""Attribute under which `compile` keeps the model's eager forward (so compiling again starts from it)."""


def compile_function(function, mode: str = "reduce-overhead", dynamic: bool | None = None, fullgraph: bool = True,
                     backend: str = "inductor"):
    """``torch.compile(function, ...)`` with rotsparse's defaults (fullgraph: a graph break is an error).

    `mode` applies to the inductor backend only (other backends, e.g. ``"aot_eager"`` in tests, take none)."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {list(MODES)}")
    options = dict(mode=mode) if backend == "inductor" else {}
    return torch.compile(function, dynamic=dynamic, fullgraph=fullgraph, backend=backend, **options)


def compile(model: nn.Module, mode: str = "reduce-overhead", dynamic: bool | None = None, fullgraph: bool = True,
            backend: str = "inductor") -> nn.Module:
    """Compile `model`'s forward in place (``model.forward = torch.compile(model.forward, ...)``); returns `model`.

    Works on a sparsified model (its decode steps run rotsparse's sparse kernels inside the compiled graph) and
    on a dense one alike. Use it with a static KV cache, so that every decode step has the same shapes::

        rotsparse.compile(model, mode="reduce-overhead")
        model.generate(input_ids, max_new_tokens=64, cache_implementation="static")

    or, stepping by hand, a ``transformers.StaticCache`` and an explicit ``cache_position`` per call. The first
    prefill and the first decode step each compile a graph (slow: tens of seconds on CPU); later steps reuse them.

    Args:
        mode: a ``torch.compile`` mode of inductor (`MODES`). On CUDA "reduce-overhead" replays each decode step
            from a CUDA graph; on CPU it compiles like "default".
        dynamic: ``torch.compile``'s `dynamic` (None: specialise first, mark sizes dynamic when they change). A
            size of 1 is always specialised, so the one-token decode graph is static and takes the sparse
            kernels even with ``dynamic=True``.
        fullgraph: raise on a graph break instead of splitting the graph (rotsparse's modules have none).
        backend: ``torch.compile`` backend; `mode` applies to ``"inductor"`` only.

    Compiling again replaces the compiled forward by one compiled from the original eager forward, e.g. after
    ``rotsparse.set_kernels`` or to change the mode.
    """
    eager = model.__dict__.get(EAGER_FORWARD) or model.forward
    parameter = next(model.parameters(), None)
    if parameter is not None:  # build the C++ kernel now, not in the middle of the first compiled step
        kernels.kernel_backend(parameter.device, parameter.dtype)
    compiled = compile_function(eager, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)
    model.__dict__[EAGER_FORWARD] = eager
    model.forward = compiled
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile` has put a compiled forward on `model`."""
    return EAGER_FORWARD in model.__dict__


def eager_forward(model: nn.Module):
    """`model`'s eager forward (the one `compile` compiled, or the model's own)."""
    return model.__dict__.get(EAGER_FORWARD) or model.forward
