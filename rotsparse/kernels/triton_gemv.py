"""Triton Top-K sparse GEMV for CUDA tensors (batch-1 decode).

Same contract as :func:`rotsparse.kernels.topk_gemv`::

    y[j] = sum_{i in TopK(|x|, K)} x[i] * weight_t[i, j]  (+ bias[j])

with ``weight_t`` of shape (in, out), contiguous.  Two launches per call:

1. ``_select_kernel``: program 0 finds the K-th largest |x| by a radix search
   on its float32 bit pattern (non-negative floats order like their bits; two
   bits per pass, 8 passes for bfloat16), keeps every entry above it and the
   first tied ones up to exactly K, and writes their indices in ascending order
   (a prefix sum compacts them); all programs initialise the float32
   accumulator with the bias (or zeros).  This replaces ``torch.topk`` +
   ``sort``, which cost 50-130 us per call on an H100.
2. ``_gather_gemv_kernel``: grid (column blocks, K-splits); each program gathers
   its selected rows of ``weight_t`` (contiguous runs of ``BLOCK_N`` columns) and
   accumulates in float32; K-splits combine with float32 atomics.

Triton is imported lazily (inside :func:`_kernels`), so importing this module
never fails on machines without Triton or CUDA; callers check availability
first (``rotsparse.kernels.kernel_backend``).  Under ``TRITON_INTERPRET=1`` the
kernels also run on CPU tensors (Triton's interpreter), which the tests use.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

MAX_SELECT_WIDTH = 1 << 16  # wider inputs select with torch.topk (one program holds the whole row)
# float32 bits that are always 0 for a value of this dtype (even number: the selection tests two per pass)
_LOW_BIT = {torch.bfloat16: 16, torch.float16: 12}


class GatherConfig(NamedTuple):
    """Tile of ``_gather_gemv_kernel``: columns and rows per step, warps, programs launched per SM."""

    block_n: int
    block_k: int
    num_warps: int
    programs_per_sm: int
    num_stages: int = 1  # software-pipelined row steps (loads of the next steps issued ahead)


def default_config(dtype: torch.dtype) -> GatherConfig:
    """Tile for Llama-2-7B shapes on an H100: the best of a first sweep over 128-512 columns (bf16,
    eval/results/gather_sweep_cuda_first.md). The later sweep (gather_sweep_cuda.md) found 1024 columns ~13%
    faster; not adopted yet, since the committed kernel_bench_cuda.md was measured with this tile."""
    return GatherConfig(block_n=512 if dtype.itemsize == 2 else 128, block_k=32, num_warps=4, programs_per_sm=4)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _select_kernel(
        x_ptr,  # (in,) activations
        idx_ptr,  # (K,) int64 out: kept input channels, ascending
        acc_ptr,  # (out,) float32 out: bias or zeros
        bias_ptr,
        n_in,
        n_out,
        K,
        BLOCK: tl.constexpr,
        LOW_BIT: tl.constexpr,
        INIT_BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = pid * INIT_BLOCK + tl.arange(0, INIT_BLOCK)  # every program initialises a block of acc
        col_mask = cols < n_out
        if HAS_BIAS:
            init = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        else:
            init = tl.zeros((INIT_BLOCK,), dtype=tl.float32)
        tl.store(acc_ptr + cols, init, mask=col_mask)
        if pid == 0:  # program 0 also selects
            offs = tl.arange(0, BLOCK)
            valid = offs < n_in
            magnitude = tl.abs(tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32))
            bits = tl.where(valid, magnitude.to(tl.int32, bitcast=True), -1)  # padding never selected
            # threshold = bits of the K-th largest |x|, found from the top bit down (bit 31, the sign, is 0),
            # two bits per pass; bits below LOW_BIT are 0 for every input of the dtype (16 for bfloat16)
            threshold = tl.where(tl.sum((bits >= (1 << 30)).to(tl.int32), axis=0) >= K, 1 << 30, 0)
            field = (1 << 21) - 1  # the three counts of a pass share one int64 sum, 21 bits each
            for low in range(28, LOW_BIT - 2, -2):
                t1 = threshold | (1 << low)
                t2 = threshold | (2 << low)
                t3 = threshold | (3 << low)
                counts = tl.sum((bits >= t1).to(tl.int64) + ((bits >= t2).to(tl.int64) << 21)
                                + ((bits >= t3).to(tl.int64) << 42), axis=0)
                c1 = (counts & field).to(tl.int32)
                c2 = ((counts >> 21) & field).to(tl.int32)
                c3 = (counts >> 42).to(tl.int32)
                threshold = tl.where(c3 >= K, t3, tl.where(c2 >= K, t2, tl.where(c1 >= K, t1, threshold)))
            # keep all above the threshold and the first ties (index order) up to exactly K; one int64 prefix
            # sum counts both, and a kept entry's output slot is (above so far) + min(ties so far, ties needed)
            above = bits > threshold
            tied = bits == threshold
            ties_needed = K - tl.sum(above.to(tl.int32), axis=0)
            running = tl.cumsum(above.to(tl.int64) + (tied.to(tl.int64) << 32), axis=0)
            ties_so_far = (running >> 32).to(tl.int32)
            keep = above | (tied & (ties_so_far <= ties_needed))
            position = (running & 0xFFFFFFFF).to(tl.int32) + tl.minimum(ties_so_far, ties_needed) - 1
            tl.store(idx_ptr + position, offs.to(tl.int64), mask=keep)

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
        NUM_STAGES: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
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

    return _select_kernel, _gather_gemv_kernel


def _device_context(x: Tensor):
    # (a CPU tensor only reaches the kernels under TRITON_INTERPRET=1, Triton's CPU interpreter)
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _init_accumulator(bias: Optional[Tensor], n_out: int, device: torch.device) -> Tensor:
    if bias is not None:
        return bias.to(torch.float32, copy=True)
    return torch.zeros(n_out, device=device, dtype=torch.float32)


def _gather(x1: Tensor, idx: Tensor, weight_t: Tensor, acc: Tensor, config: GatherConfig) -> None:
    """acc (out,) float32 += x1[idx] @ weight_t[idx], in place."""
    n_out = weight_t.shape[1]
    K = idx.numel()
    if K == 0 or n_out == 0:
        return
    n_blocks = cdiv(n_out, config.block_n)
    k_blocks = cdiv(K, config.block_k)
    # Enough programs to fill the GPU, splitting K if the column blocks alone do not.
    split = max(1, min(k_blocks, cdiv(config.programs_per_sm * _num_sms(x1.device), n_blocks)))
    k_per_split = cdiv(cdiv(K, split), config.block_k) * config.block_k
    split = cdiv(K, k_per_split)
    with _device_context(x1):
        _kernels()[1][(n_blocks, split)](
            x1, idx, weight_t, acc, K, n_out, weight_t.stride(0), k_per_split,
            BLOCK_K=config.block_k, BLOCK_N=config.block_n, USE_ATOMIC=split > 1, NUM_STAGES=config.num_stages,
            num_warps=config.num_warps,
        )


def index_gemv_triton(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor],
                      config: Optional[GatherConfig] = None) -> Tensor:
    """y = x[indices] @ weight_t[indices] (+ bias) on CUDA; shapes as topk_gemv.

    ``indices``: 1-D int64 CUDA tensor of distinct input channels (ascending is
    best for DRAM locality).  Inputs are assumed validated by the caller.
    """
    n_in, n_out = weight_t.shape
    x1 = x.reshape(n_in).contiguous()
    acc = _init_accumulator(bias, n_out, x.device)
    _gather(x1, indices.contiguous(), weight_t, acc, config or default_config(x.dtype))
    return acc.to(x.dtype).reshape(*x.shape[:-1], n_out)


def select_triton(x1: Tensor, keep_k: int, bias: Optional[Tensor], n_out: int,
                  num_warps: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(indices (K,) int64 ascending: the K largest |x1|, ties by index; accumulator (n_out,) float32 holding
    the bias or zeros), in one launch.  x1: (in,) contiguous, 0 < keep_k < in <= MAX_SELECT_WIDTH."""
    n_in = x1.numel()
    idx = torch.empty(keep_k, dtype=torch.long, device=x1.device)
    acc = torch.empty(n_out, dtype=torch.float32, device=x1.device)
    block = max(16, 1 << (n_in - 1).bit_length())
    init_block = 1024
    with _device_context(x1):
        _kernels()[0][(max(1, cdiv(n_out, init_block)),)](
            x1, idx, acc, acc if bias is None else bias, n_in, n_out, keep_k,
            BLOCK=block, LOW_BIT=_LOW_BIT.get(x1.dtype, 0), INIT_BLOCK=init_block, HAS_BIAS=bias is not None,
            num_warps=num_warps or min(32, max(8, block // 512)),
        )
    return idx, acc


def _selects(n_in: int, keep_k: int) -> bool:
    """Whether `select_triton` handles this width and K (the others need no selection, or are too wide)."""
    return 0 < keep_k < n_in <= MAX_SELECT_WIDTH


def topk_gemv_triton(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int,
                     config: Optional[GatherConfig] = None) -> Tensor:
    """Top-K selection + gather-GEMV for one token on CUDA (two launches, see the module docstring)."""
    n_in, n_out = weight_t.shape
    x1 = x.reshape(n_in).contiguous()
    if keep_k >= n_in:  # dense: cuBLAS reads the (in, out) layout at full bandwidth
        y = x1.unsqueeze(0) @ weight_t
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], n_out)
    if not _selects(n_in, keep_k):  # K = 0, or wider than the selection kernel takes
        idx = x1.abs().topk(keep_k, sorted=False).indices.sort().values
        return index_gemv_triton(x, idx, weight_t, bias, config)
    idx, acc = select_triton(x1, keep_k, bias, n_out)
    _gather(x1, idx, weight_t, acc, config or default_config(x.dtype))
    return acc.to(x.dtype).reshape(*x.shape[:-1], n_out)


def topk_indices_triton(x1: Tensor, keep_k: int) -> Optional[Tensor]:
    """The K largest |x1| (ascending indices) through the selection kernel; x1 (in,) contiguous.
    None where the kernel does not apply (K = 0, K = in, in > MAX_SELECT_WIDTH)."""
    return select_triton(x1, keep_k, None, 0)[0] if _selects(x1.numel(), keep_k) else None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
