"""Every ``torch.library`` op of rotsparse (``torch.ops.rotsparse.*``): its eager implementation (backend
dispatch: C++ on CPU, Triton on CUDA, the PyTorch reference otherwise), its fake (meta) implementation for
``torch.compile``, and the autograd formula of ``topk_gemv`` (straight-through w.r.t. the Top-K mask).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_gemv
from .build import NATIVE_DTYPES, cpp_ext, triton_available
from .reference import (index_gemv_torch, topk_gemv_int4_torch, topk_gemv_int8_torch, topk_gemv_torch,
                        topk_indices_torch, topk_residual_gemv_torch, topk_select)


def topk_gemv_dispatch(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    if x.dtype in NATIVE_DTYPES:
        if x.device.type == "cpu":
            ext = cpp_ext()
            if ext is not None:
                return ext.topk_gemv(x, weight_t, bias, int(keep_k))
        elif x.device.type == "cuda" and triton_available() and x.numel() == weight_t.shape[0]:
            return triton_gemv.topk_gemv_triton(x, weight_t, bias, int(keep_k))
    return topk_gemv_torch(x, weight_t, bias, int(keep_k))


def index_gemv_dispatch(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.dtype in NATIVE_DTYPES:
        if x.device.type == "cpu":
            ext = cpp_ext()
            if ext is not None:
                return ext.index_gemv(x, indices, weight_t, bias)  # checks the index range
        elif x.device.type == "cuda" and triton_available():
            return triton_gemv.index_gemv_triton(x, indices, weight_t, bias)
    if x.device.type == "cpu" and indices.numel():  # (no host sync on accelerators)
        if int(indices.min()) < 0 or int(indices.max()) >= weight_t.shape[0]:
            raise ValueError(f"indices out of range [0, {weight_t.shape[0]})")
    return index_gemv_torch(x, indices, weight_t, bias)


def topk_indices_dispatch(x: Tensor, keep_k: int) -> Tensor:
    n = x.shape[-1]
    x1 = x.reshape(n)
    if x1.device.type == "cpu" and x1.dtype in NATIVE_DTYPES:
        ext = cpp_ext()
        if ext is not None:
            return ext.topk_indices(x1, int(keep_k))
    elif x1.device.type == "cuda" and x1.dtype in NATIVE_DTYPES and triton_available():
        indices = triton_gemv.topk_indices_triton(x1.contiguous(), int(keep_k))
        if indices is not None:
            return indices
    return topk_indices_torch(x1, keep_k)


def dense_gemv_dispatch(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.device.type == "cpu" and x.dtype in NATIVE_DTYPES:
        ext = cpp_ext()
        if ext is not None:
            return ext.dense_gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def topk_gemv_int8_dispatch(x: Tensor, qweight_t: Tensor, scale: Tensor, bias: Optional[Tensor],
                            keep_k: int) -> Tensor:
    if x.device.type == "cpu" and x.dtype in NATIVE_DTYPES:
        ext = cpp_ext()
        if ext is not None:
            return ext.topk_gemv_int8(x, qweight_t, scale, bias, int(keep_k))
    return topk_gemv_int8_torch(x, qweight_t, scale, bias, int(keep_k))


def topk_gemv_int4_dispatch(x: Tensor, packed_t: Tensor, scales: Tensor, bias: Optional[Tensor],
                            keep_k: int) -> Tensor:
    if x.device.type == "cpu" and x.dtype in NATIVE_DTYPES:
        ext = cpp_ext()
        if ext is not None:
            return ext.topk_gemv_int4(x, packed_t, scales, bias, int(keep_k))
    return topk_gemv_int4_torch(x, packed_t, scales, bias, int(keep_k))


def topk_residual_gemv_dispatch(x: Tensor, weight_t: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor],
                                keep_k: int, bits: int, copy_k: int) -> Tensor:
    if x.device.type == "cpu" and x.dtype in NATIVE_DTYPES:
        ext = cpp_ext()
        if ext is not None:
            return ext.topk_residual_gemv(x, weight_t, codes, scales, bias, int(keep_k), int(bits), int(copy_k))
    return topk_residual_gemv_torch(x, weight_t, codes, scales, bias, int(keep_k), int(bits), int(copy_k))


@torch.library.custom_op("rotsparse::topk_residual_gemv", mutates_args=())
def _topk_residual_gemv_op(x: Tensor, weight_t: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor],
                           keep_k: int, bits: int, copy_k: int) -> Tensor:
    return topk_residual_gemv_dispatch(x, weight_t, codes, scales, bias, keep_k, bits, copy_k)


@_topk_residual_gemv_op.register_fake
def _topk_residual_gemv_fake(x: Tensor, weight_t: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor],
                             keep_k: int, bits: int, copy_k: int) -> Tensor:
    torch._check(x.shape[-1] == weight_t.shape[0])
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@torch.library.custom_op("rotsparse::topk_gemv_int8", mutates_args=())
def _topk_gemv_int8_op(x: Tensor, qweight_t: Tensor, scale: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    return topk_gemv_int8_dispatch(x, qweight_t, scale, bias, keep_k)


@_topk_gemv_int8_op.register_fake
def _topk_gemv_int8_fake(x: Tensor, qweight_t: Tensor, scale: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    torch._check(x.shape[-1] == qweight_t.shape[0])
    return x.new_empty((*x.shape[:-1], qweight_t.shape[1]))


@torch.library.custom_op("rotsparse::topk_gemv_int4", mutates_args=())
def _topk_gemv_int4_op(x: Tensor, packed_t: Tensor, scales: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    return topk_gemv_int4_dispatch(x, packed_t, scales, bias, keep_k)


@_topk_gemv_int4_op.register_fake
def _topk_gemv_int4_fake(x: Tensor, packed_t: Tensor, scales: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    torch._check(x.shape[-1] == packed_t.shape[0])
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.custom_op("rotsparse::index_gemv", mutates_args=())
def _index_gemv_op(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    return index_gemv_dispatch(x, indices, weight_t, bias)


@_index_gemv_op.register_fake
def _index_gemv_fake(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    torch._check(x.shape[-1] == weight_t.shape[0])
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@torch.library.custom_op("rotsparse::topk_indices", mutates_args=())
def _topk_indices_op(x: Tensor, keep_k: int) -> Tensor:
    return topk_indices_dispatch(x, keep_k).clone()  # fresh storage (the C++ op returns a view)


@_topk_indices_op.register_fake
def _topk_indices_fake(x: Tensor, keep_k: int) -> Tensor:
    torch._check(keep_k >= 0)
    torch._check(keep_k <= x.shape[-1])
    return x.new_empty((keep_k,), dtype=torch.long)


@torch.library.custom_op("rotsparse::topk_gemv", mutates_args=())
def _topk_gemv_op(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    return topk_gemv_dispatch(x, weight_t, bias, keep_k)


@_topk_gemv_op.register_fake
def _topk_gemv_fake(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    torch._check(x.shape[-1] == weight_t.shape[0])
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@torch.library.custom_op("rotsparse::dense_gemv", mutates_args=())
def _dense_gemv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return dense_gemv_dispatch(x, weight, bias)


@_dense_gemv_op.register_fake
def _dense_gemv_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    torch._check(x.shape[-1] == weight.shape[1])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _topk_gemv_setup_context(ctx, inputs, output):
    x, weight_t, bias, keep_k = inputs
    ctx.save_for_backward(x, weight_t)
    ctx.keep_k = keep_k
    ctx.has_bias = bias is not None


def _topk_gemv_backward(ctx, grad):
    # Straight-through w.r.t. the selection: the Top-K mask is treated as constant.
    x, weight_t = ctx.saved_tensors
    n = x.shape[-1]
    mask = torch.zeros_like(x, dtype=torch.bool)
    if ctx.keep_k == n:
        mask.fill_(True)
    elif ctx.keep_k > 0:
        mask.scatter_(-1, topk_select(x, ctx.keep_k), True)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = (grad @ weight_t.t()) * mask
    if ctx.needs_input_grad[1]:
        gw = (x * mask).reshape(-1, n).t() @ grad.reshape(-1, weight_t.shape[1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.reshape(-1, weight_t.shape[1]).sum(0)
    return gx, gw, gb, None


torch.library.register_autograd(
    "rotsparse::topk_gemv", _topk_gemv_backward, setup_context=_topk_gemv_setup_context
)
