"""Triton Top-K sparse GEMV for CUDA tensors (batch-1 decode).

Same contract as :func:`rotsparse.kernels.topk_gemv`::

    y[j] = sum_{i in TopK(|x|, K)} x[i] * weight_t[i, j]  (+ bias[j])

with ``weight_t`` of shape (in, out), contiguous.  Selection uses ``torch.topk``
(then a sort, so rows are visited in address order); the Triton kernel gathers
the selected rows and accumulates in float32.  The grid is (column blocks,
K-splits); with more than one K-split, partial sums are combined with float32
atomics into a buffer pre-initialised with the bias.

Triton is imported lazily (inside :func:`_kernel`), so importing this module
never fails on machines without Triton or CUDA; callers check availability
first (``rotsparse.kernels.kernel_backend``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

_BLOCK_N = 128
_BLOCK_K = 32


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_gemv_kernel(
        x_ptr,  # (in,) activations, input dtype
        idx_ptr,  # (K,) int64 selected input channels
        w_ptr,  # (in, out) weight_t, row stride = stride_w
        y_ptr,  # (out,) float32 accumulator (bias or zeros already in it)
        K,
        N,
        stride_w,
        k_per_split,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_ATOMIC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs < k_end
            rows = tl.load(idx_ptr + offs, mask=k_mask, other=0).to(tl.int64)
            xv = tl.load(x_ptr + rows, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + rows[:, None] * stride_w + cols[None, :],
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
        if USE_ATOMIC:
            tl.atomic_add(y_ptr + cols, acc, mask=col_mask)
        else:
            prev = tl.load(y_ptr + cols, mask=col_mask, other=0.0)
            tl.store(y_ptr + cols, prev + acc, mask=col_mask)

    return _gather_gemv_kernel


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def index_gemv_triton(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y = x[indices] @ weight_t[indices] (+ bias) on CUDA; shapes as topk_gemv.

    ``indices``: 1-D int64 CUDA tensor of distinct input channels (ascending is
    best for DRAM locality).  Inputs are assumed validated by the caller.
    """
    n_in, n_out = weight_t.shape
    out_shape = (*x.shape[:-1], n_out)
    x1 = x.reshape(n_in)
    if not x1.is_contiguous():
        x1 = x1.contiguous()
    idx = indices.contiguous()
    K = idx.numel()
    if bias is not None:
        y32 = bias.to(torch.float32, copy=True)
    else:
        y32 = torch.zeros(n_out, device=x.device, dtype=torch.float32)
    if K > 0 and n_out > 0:
        n_blocks = triton_cdiv(n_out, _BLOCK_N)
        k_blocks = triton_cdiv(K, _BLOCK_K)
        # Enough programs to fill the GPU (~4 per SM), splitting K if needed.
        split = max(1, min(k_blocks, triton_cdiv(4 * _num_sms(x.device), n_blocks)))
        k_per_split = triton_cdiv(triton_cdiv(K, split), _BLOCK_K) * _BLOCK_K
        split = triton_cdiv(K, k_per_split)
        with torch.cuda.device(x.device):
            _kernel()[(n_blocks, split)](
                x1,
                idx,
                weight_t,
                y32,
                K,
                n_out,
                weight_t.stride(0),
                k_per_split,
                BLOCK_K=_BLOCK_K,
                BLOCK_N=_BLOCK_N,
                USE_ATOMIC=split > 1,
                num_warps=4,
            )
    return y32.to(x.dtype).reshape(out_shape)


def topk_gemv_triton(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Top-K (torch.topk) + Triton gather-GEMV for one token on CUDA."""
    n_in = weight_t.shape[0]
    x1 = x.reshape(n_in)
    if keep_k >= n_in:
        idx = torch.arange(n_in, device=x.device)
    elif keep_k == 0:
        idx = torch.empty(0, dtype=torch.long, device=x.device)
    else:
        idx = x1.abs().topk(keep_k, sorted=False).indices.sort().values
    return index_gemv_triton(x, idx, weight_t, bias)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
