"""Sparse decode kernels for fixed Top-K activation sparsity.

For one token, a linear layer ``y = W x`` with ``W`` of shape ``(out, in)`` only
needs the ``K`` weight columns whose activations survive Top-K.  The kernels
take the weight in *input-channel-major* layout ``weight_t = W.t()`` of shape
``(in, out)``, **contiguous**, so each selected input channel is one contiguous
row, and compute::

    y[j] = sum_{i in TopK(|x|, K)} x[i] * weight_t[i, j]  (+ bias[j])

``topk_gemv`` also takes several tokens (..., in): each keeps its own Top-K, and
the C++ kernel streams the union of up to 8 tokens' kept rows once for all of
them (the sparse modules call it for up to ``KERNEL_MAX_TOKENS`` tokens).

Backends (picked per call, see :func:`kernel_backend`):

* ``"cpp"``    -- CPU: fused select + gather-GEMV in C++/OpenMP (AVX-512 when
  the compiler targets it), JIT-compiled on first use with
  ``torch.utils.cpp_extension.load`` and cached by torch.
* ``"triton"`` -- CUDA: one Triton kernel per call in which every program
  finds the exact Top-K itself (radix select on the bits of |x|) and gathers
  only the kept weight rows (``rotsparse/kernels/triton_gemv.py``).
* ``"torch"``  -- pure PyTorch fallback (correct, slower); used when the C++
  build fails (one warning says why), when Triton is missing, or for dtypes
  the native kernels do not handle.

Weight-only quantized weights: :func:`topk_gemv_int8` (int8 ``(in, out)`` with
one scale per output column) and :func:`topk_gemv_int4` (two 4-bit values per
byte along the output dimension, ``(in, out / 2)``, scales per group of input
channels ``(in / group, out)``); ``keep_k = in`` is their dense GEMV.
:func:`topk_residual_gemv`: the kept inputs through the float weight, the dropped ones through a 1- or 2-bit copy
(`SparsifyConfig.residual_bits`).

Public API: :func:`topk_gemv`, :func:`index_gemv`, :func:`topk_indices`,
:func:`dense_gemv` (one token through a row-major ``(out, in)`` weight, e.g. the
lm_head), :func:`topk_mask`, :func:`kernel_backend`, :func:`build_extension`.
Layout: ``build.py`` (C++ JIT build, backend choice), ``ops.py`` (every
``torch.library`` op with its fake and autograd), ``reference.py`` (PyTorch
reference and fallbacks, the one per-token Top-K selection), ``triton_gemv.py``
(the CUDA kernel); this module validates arguments and picks eager or op.
``topk_gemv``, ``index_gemv`` and ``topk_indices`` are ``torch.library``
custom ops (``torch.ops.rotsparse.*``, with fake implementations) so
``torch.compile`` can trace code that calls them; in plain eager mode without
autograd the public functions skip the custom-op layer (~25 us per call).
``topk_gemv`` also has an autograd formula (straight-through w.r.t. the mask).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .build import INT4_KERNEL_MAX_TOKENS, INT8_KERNEL_MAX_TOKENS, KERNEL_MAX_TOKENS, NATIVE_DTYPES, build_extension, cpp_ext, kernel_backend
from .reference import RESIDUAL_GROUP, check_keep_k, to_input_major, topk_mask

__all__ = [
    "INT4_KERNEL_MAX_TOKENS",
    "INT8_KERNEL_MAX_TOKENS",
    "KERNEL_MAX_TOKENS",
    "build_extension",
    "dense_gemv",
    "index_gemv",
    "kernel_backend",
    "several_tokens_on_cpu",
    "to_input_major",
    "topk_gemv",
    "topk_gemv_int4",
    "topk_gemv_int8",
    "topk_indices",
    "topk_mask",
    "topk_residual_gemv",
]

_PLAIN = (Tensor, torch.nn.Parameter)


def _check_gemv_args(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], check_contiguous: bool = True,
                     several_tokens: bool = False) -> None:
    if not isinstance(x, Tensor) or not isinstance(weight_t, Tensor):
        raise TypeError("x and weight_t must be tensors")
    if weight_t.dim() != 2:
        raise ValueError(f"weight_t must be 2-D (in, out), got shape {tuple(weight_t.shape)}")
    if check_contiguous and not weight_t.is_contiguous():
        raise ValueError(
            "weight_t must be contiguous with shape (in, out) (input-channel-major); "
            "for an nn.Linear weight W (out, in) pass W.t().contiguous() once and keep it"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dtype != weight_t.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype}, weight_t is {weight_t.dtype}")
    if x.device != weight_t.device:
        raise ValueError(f"device mismatch: x on {x.device}, weight_t on {weight_t.device}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    n_in, n_out = weight_t.shape
    if x.shape[-1] != n_in:
        raise ValueError(
            f"shape mismatch: x has {x.shape[-1]} features, weight_t expects in={n_in} "
            f"(x {tuple(x.shape)}, weight_t {tuple(weight_t.shape)})"
        )
    if x.numel() != n_in and not several_tokens:
        raise ValueError(
            f"index_gemv and dense_gemv handle exactly one token (x of shape (in,), (1, in) or (1, 1, in)); "
            f"got x of shape {tuple(x.shape)}. Use topk_gemv for several tokens."
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError("bias must be a tensor or None")
        if bias.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        if bias.device != weight_t.device:
            raise ValueError(f"device mismatch: bias on {bias.device}, weight_t on {weight_t.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: bias is {bias.dtype}, x is {x.dtype}")


def topk_gemv(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Fused Top-K + sparse GEMV, per token.

    One token reads only its kept rows of ``weight_t``. Several tokens (a batched decode step, a short
    prompt) are taken 8 at a time: every token's Top-K, then one pass over the union of their kept rows, each
    row read once for all of them (the C++ kernel; elsewhere the masked product).

    Args:
        x: (..., in): one token ((in,), (1, in), (1, 1, in)) or several; float32 / bfloat16 (float16 also
            works).
        weight_t: (in, out), contiguous, same dtype and device as ``x``
            (the transpose of an ``nn.Linear`` weight).
        bias: (out,) or None.
        keep_k: number of input channels kept, 0 <= keep_k <= in.

    Returns:
        ``x.shape[:-1] + (out,)`` tensor of ``x.dtype``, equal (up to float
        rounding, float32 accumulation) to ``topk_mask(x, keep_k) @ weight_t + bias``.
    """
    _check_gemv_args(x, weight_t, bias, several_tokens=True)
    keep_k = check_keep_k(keep_k, weight_t.shape[0])
    if _eager_fast_path(x, weight_t, bias):
        # Same computation as the custom op, minus its ~25 us of Python dispatch.
        return ops.topk_gemv_dispatch(x, weight_t, bias, keep_k)
    return torch.ops.rotsparse.topk_gemv(x, weight_t, bias, keep_k)


def decode_topk_gemv(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """:func:`topk_gemv` for callers whose arguments are consistent by construction (a `TopKLinear`'s decode
    step, one token or a few, a residual rotation): plain CPU tensors of one native dtype in eager mode go straight to the C++
    kernel (which still checks shapes), skipping the Python validation; anything else is `topk_gemv`."""
    if (x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and weight_t.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and _eager_fast_path(x, weight_t, bias)):
        ext = cpp_ext()
        if ext is not None:
            return ext.topk_gemv(x, weight_t, bias, keep_k)
    return topk_gemv(x, weight_t, bias, keep_k)


def _check_quantized_args(x: Tensor, qweight_t: Tensor, scales: Tensor, bias: Optional[Tensor],
                          qdtype: torch.dtype, scale_dtype: torch.dtype, out: int, several_tokens: bool = False) -> None:
    if not all(isinstance(t, Tensor) for t in (x, qweight_t, scales)):
        raise TypeError("x, qweight_t and scales must be tensors")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if qweight_t.dtype != qdtype or scales.dtype != scale_dtype:
        raise TypeError(f"expected a {qdtype} weight and {scale_dtype} scales, got {qweight_t.dtype} and {scales.dtype}")
    if qweight_t.dim() != 2 or not qweight_t.is_contiguous() or not scales.is_contiguous():
        raise ValueError("the quantized weight must be a contiguous 2-D (in, ...) tensor and the scales contiguous")
    if len({x.device, qweight_t.device, scales.device}) != 1:
        raise ValueError(f"device mismatch: x on {x.device}, weight on {qweight_t.device}, scales on {scales.device}")
    n_in = qweight_t.shape[0]
    if x.dim() == 0 or x.shape[-1] != n_in or (x.numel() != n_in and not several_tokens):
        raise ValueError(f"one token of {n_in} features expected (x of shape (in,), (1, in) or (1, 1, in)), got x of "
                         f"shape {tuple(x.shape)}")
    if bias is not None and (bias.shape != (out,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must have shape ({out},), x's dtype and device")


def topk_gemv_int8(x: Tensor, qweight_t: Tensor, scale: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Fused Top-K + sparse GEMV through an int8 weight, per token.

    ``y = scale * (topk_mask(x, keep_k) @ qweight_t) (+ bias)``; qweight_t: (in, out) int8, contiguous; scale:
    (out,) float32; x: (..., in), one token or several (as :func:`topk_gemv`), float32 / bfloat16 / float16 (the
    output's dtype); float32 accumulation. Only the kept rows of qweight_t are read (several tokens: the union of
    theirs); ``keep_k = in`` is the dense int8 GEMV. Custom op ``torch.ops.rotsparse.topk_gemv_int8``.
    """
    _check_quantized_args(x, qweight_t, scale, bias, torch.int8, torch.float32, qweight_t.shape[-1],
                          several_tokens=True)
    if scale.shape != (qweight_t.shape[1],):
        raise ValueError(f"scale must have shape ({qweight_t.shape[1]},), got {tuple(scale.shape)}")
    keep_k = check_keep_k(keep_k, qweight_t.shape[0])
    if _eager_fast_path(x, qweight_t, scale, bias):
        return ops.topk_gemv_int8_dispatch(x, qweight_t, scale, bias, keep_k)
    return torch.ops.rotsparse.topk_gemv_int8(x, qweight_t, scale, bias, keep_k)


def topk_gemv_int4(x: Tensor, packed_t: Tensor, scales: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Fused Top-K + sparse GEMV through a packed int4 weight, per token.

    packed_t: (in, out / 2) uint8, two 4-bit values n in [0, 15] per byte along the output dimension
    (`reference.pack_int4`); scales: (in / group, out) float16; the weight is ``scales[i // group, j] *
    (n[i, j] - 8)``. The kept activations are rounded to int8 with one scale per weight group (max |x| / 127, as
    llama.cpp's Q8_0 activations; `reference.group_int8_activations`) so that a group's rows are integer dot
    products (VNNI where the CPU has it). Only the kept rows and the scale rows of their groups are read;
    ``keep_k = in`` is the dense int4 GEMV. x: (..., in), one token or several; on the CPU several tokens go in
    passes of up to 8 over the union of their kept rows, each 4-row block of the weight unpacked once for all of
    them (VNNI CPUs; elsewhere token by token). Shapes of x and the output as in :func:`topk_gemv_int8`. Custom op
    ``torch.ops.rotsparse.topk_gemv_int4``.
    """
    _check_quantized_args(x, packed_t, scales, bias, torch.uint8, torch.float16, scales.shape[-1],
                          several_tokens=True)
    n_in = packed_t.shape[0]
    if scales.dim() != 2 or scales.shape[1] != 2 * packed_t.shape[1] or not 0 < scales.shape[0] <= n_in \
            or n_in % scales.shape[0]:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit the packed weight {tuple(packed_t.shape)}: "
                         f"expected (in / group, 2 * {packed_t.shape[1]}) with the group dividing in={n_in}")
    keep_k = check_keep_k(keep_k, n_in)
    if _eager_fast_path(x, packed_t, scales, bias):
        return ops.topk_gemv_int4_dispatch(x, packed_t, scales, bias, keep_k)
    return torch.ops.rotsparse.topk_gemv_int4(x, packed_t, scales, bias, keep_k)


def topk_residual_gemv(x: Tensor, weight_t: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor],
                       keep_k: int, bits: int, copy_k: Optional[int] = None) -> Tensor:
    """Top-K GEMV of ONE token whose largest dropped inputs go through a low-bit copy of the weight.

    ``y = topk_mask(x, keep_k) @ weight_t + (topk_mask(x, keep_k + copy_k) - topk_mask(x, keep_k)) @ R (+ bias)``;
    copy_k None: every dropped input (``in - keep_k``). weight_t (in, out) as in :func:`topk_gemv`; R the residual
    copy (`reference.residual_weight_torch`): codes (in, groups * 64 * bits / 8) uint8, scales (in, groups)
    float16, groups = ceil(out / 64), bits 1 or 2. Reads the kept rows of weight_t and the copied rows of the copy.
    Custom op ``torch.ops.rotsparse.topk_residual_gemv`` (no autograd).
    """
    _check_gemv_args(x, weight_t, bias)
    n_in, n_out = weight_t.shape
    if bits not in (1, 2):
        raise ValueError(f"bits must be 1 or 2, got {bits!r}")
    groups = -(-n_out // RESIDUAL_GROUP)
    if (codes.dtype != torch.uint8 or codes.shape != (n_in, groups * RESIDUAL_GROUP * bits // 8)
            or scales.dtype != torch.float16 or scales.shape != (n_in, groups)
            or not codes.is_contiguous() or not scales.is_contiguous()):
        raise ValueError(f"the residual copy of a ({n_in}, {n_out}) weight must be contiguous uint8 codes "
                         f"({n_in}, {groups * RESIDUAL_GROUP * bits // 8}) and float16 scales ({n_in}, {groups}); got "
                         f"{codes.dtype} {tuple(codes.shape)} and {scales.dtype} {tuple(scales.shape)}")
    keep_k = check_keep_k(keep_k, n_in)
    copy_k = n_in - keep_k if copy_k is None else check_keep_k(copy_k, n_in - keep_k)
    if _eager_fast_path(x, weight_t, codes, scales, bias):
        return ops.topk_residual_gemv_dispatch(x, weight_t, codes, scales, bias, keep_k, bits, copy_k)
    return torch.ops.rotsparse.topk_residual_gemv(x, weight_t, codes, scales, bias, keep_k, bits, copy_k)


def index_gemv(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Sparse GEMV over precomputed input channels, one token (inference only: no autograd).

    ``y = x[indices] @ weight_t[indices] (+ bias)``; ``indices``: 1-D int64 on
    x's device, distinct, ascending is fastest (e.g. from :func:`topk_indices`,
    so q/k/v projections sharing an input can share one selection).  The index
    range is checked on CPU only (on CUDA it is the caller's responsibility).
    Shapes as in :func:`topk_gemv`; custom op ``torch.ops.rotsparse.index_gemv``.
    """
    _check_gemv_args(x, weight_t, bias)
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype != torch.long:
        raise ValueError("indices must be a 1-D int64 tensor")
    if indices.device != x.device:
        raise ValueError(f"device mismatch: indices on {indices.device}, x on {x.device}")
    if _eager_fast_path(x, weight_t, bias, indices):
        return ops.index_gemv_dispatch(x, indices, weight_t, bias)
    return torch.ops.rotsparse.index_gemv(x, indices, weight_t, bias)


def dense_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Dense GEMV for ONE token through a row-major weight: ``F.linear(x, weight, bias)``.

    ``weight``: ``(out, in)``, contiguous (an ``nn.Linear`` weight as stored, so
    the lm_head needs no re-layout and stays tied to the embeddings); ``x``:
    ``(in,)``, ``(1, in)`` or ``(1, 1, in)``.  On CPU (float32 / bfloat16 /
    float16) a C++/OpenMP kernel streams the rows with float32 accumulation,
    at memory bandwidth where torch's own bf16 single-token ``F.linear`` is
    about half as fast; elsewhere, and when autograd must record, it is
    ``F.linear`` itself.  Custom op ``torch.ops.rotsparse.dense_gemv``.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("x and weight must be tensors")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D (out, in) tensor, got shape {tuple(weight.shape)}")
    _check_gemv_args(x, weight.t(), bias, check_contiguous=False)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return torch.nn.functional.linear(x, weight, bias)
    if _eager_fast_path(x, weight, bias):
        return ops.dense_gemv_dispatch(x, weight, bias)
    return torch.ops.rotsparse.dense_gemv(x, weight, bias)


def topk_indices(x: Tensor, keep_k: int) -> Tensor:
    """Ascending int64 indices, shape (keep_k,), of the keep_k largest |x| of ONE token.

    x: (in,), (1, in) or (1, 1, in).  Exactly keep_k indices (ties broken
    arbitrarily); custom op ``torch.ops.rotsparse.topk_indices``.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError("x must be a tensor with at least one dimension")
    n = x.shape[-1]
    keep_k = check_keep_k(keep_k, n)
    if x.numel() != n:
        raise ValueError(f"topk_indices handles one token, got x of shape {tuple(x.shape)}")
    if _eager_fast_path(x):
        return ops.topk_indices_dispatch(x, keep_k)
    return torch.ops.rotsparse.topk_indices(x, keep_k)


def several_tokens_on_cpu(x: Tensor, width: int, max_tokens: int = KERNEL_MAX_TOKENS) -> bool:
    """x holds 2 to `max_tokens` tokens of `width` features on the CPU: a call the C++ `topk_gemv` (and
    `topk_gemv_int8` / `topk_gemv_int4`) takes in its several-token form rather than the caller's masked product."""
    return x.device.type == "cpu" and width < x.numel() <= max_tokens * width


def _eager_fast_path(*tensors: Optional[Tensor]) -> bool:
    """True when the implementation can be called directly instead of through the
    custom op: plain tensors, eager mode (no torch.compile / tracing / dispatch
    modes) and nothing that autograd must record."""
    if torch.compiler.is_compiling():  # first: under dynamo the rest would only be traced
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False  # tensor subclasses (FakeTensor, FunctionalTensor, DTensor, ...)
    if _dispatch_modes_active():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return True


def _dispatch_modes_active() -> bool:
    try:
        return torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
    except AttributeError:  # private API moved: be conservative
        return True
