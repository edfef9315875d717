"""Triton Top-K sparse GEMV for CUDA tensors (batch-1 decode).

Same contract as :func:`rotsparse.kernels.topk_gemv`::

    y[j] = sum_{i in TopK(|x|, K)} x[i] * weight_t[i, j]  (+ bias[j])

with ``weight_t`` of shape (in, out), contiguous.  One launch per call: ``_topk_gemv_kernel``, grid (column
blocks, row splits); each program

1. selects: finds T, the key of the K-th largest |x| (the bits of |x|: non-negative floats order like their bit
   patterns), and the index of the last kept entry of those tied at T (ties to the lowest indices), so that the
   kept rows are {key > T} and {key == T, index <= last} with no running count.  x is loaded once and its keys
   stay in registers (up to 32 per thread); T comes from a binary search on the key (one bit per round: one
   count of key >= candidate over the block, so 15 rounds for 16-bit dtypes, 31 for float32) where each thread
   holds more than 8 keys, else from a radix select (5 bits per pass, a 32-bin ``tl.histogram`` per pass: 3
   passes for 16-bit dtypes, 7 for float32, costlier per entry but fewer block-wide steps); inputs too wide to
   keep in registers are re-read per radix pass.  ``last`` comes from one prefix count of the tied entries.  The
   input vector is small (4-11k values, read from L2), so every program repeats the selection instead of waiting
   for a separate launch and an index array; the default tile runs one program of 16 warps per SM, so each SM
   selects once;
2. gathers: walks its share of the input rows and fetches only the kept rows of ``weight_t`` (masked loads:
   dropped rows are never read) for its block of columns, accumulating in float32;
3. writes ``y``: with several row splits, partial sums go with atomics into a float32 scratch row that is
   kept per device, stream and output width; the last program of a column block (an atomic counter tells) reads the
   sum back, leaves the scratch and its counter at zero for the next call, adds the bias, casts and stores.
   No initialisation, index array or cast launch.  Calls on one stream run in order, so they never share
   a scratch row concurrently (a graph replayed on another stream than it was captured on must not overlap
   eager calls of the capturing stream).

``index_gemv_triton`` (given indices) runs the same kernel with rows read from the index array, split over
the K entries; ``topk_indices_triton`` runs the selection alone (``_select_kernel``, one program).

Triton is imported lazily (inside :func:`_kernels`), so importing this module never fails on machines without
Triton or CUDA; callers check availability first (``rotsparse.kernels.kernel_backend``).  Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (Triton's interpreter), which the tests use.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# bits of |x| as an integer key: the float's bit pattern without its sign
_KEY_BITS = {torch.float32: 31, torch.bfloat16: 15, torch.float16: 15}


class GatherConfig(NamedTuple):
    """Tile of ``_topk_gemv_kernel``: columns and rows per step, warps, programs launched per SM."""

    block_n: int
    block_k: int
    num_warps: int
    programs_per_sm: int
    num_stages: int = 1  # software-pipelined row steps (loads of the next steps issued ahead)


def default_config(dtype: torch.dtype) -> GatherConfig:
    """Tile of the gather over given indices, for Llama-2-7B shapes on an H100: 2 KB of each row (the best
    bf16 tile of eval/results/gather_sweep_cuda.md, 1024 columns x 32 rows, 4 warps); 3 programs per SM, as
    many as its registers hold at once (4 left a second wave of a few programs at 40% sparsity)."""
    return GatherConfig(block_n=2048 // dtype.itemsize, block_k=32, num_warps=4, programs_per_sm=3)


def select_config(dtype: torch.dtype) -> GatherConfig:
    """Tile of the fused selection + gather: one program of 16 warps per SM (each program selects, so few
    programs with many warps), each thread 16 bytes of a row; all warps side by side along the columns.  Best
    of 4096/2048/1024 columns x 16-64 rows on an H100 for Llama-2-7B shapes (bf16 and float32)."""
    return GatherConfig(block_n=4096 if dtype.itemsize == 2 else 2048, block_k=16, num_warps=16,
                        programs_per_sm=1)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    # jit helpers: a kernel resolves the functions it calls as globals
    global _key, _pick_digit, _radix_digit, _digit_histogram, _threshold, _keep, _store_output

    @triton.jit
    def _key(xv, KEY_BITS: tl.constexpr):
        # |x| as a non-negative int32 ordered like |x|: the bit pattern without the sign
        if KEY_BITS == 15:
            key = xv.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        else:
            key = xv.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return key

    @triton.jit
    def _pick_digit(fits_a, above_a, at_digit_a, fits_b, above_b, at_digit_b):
        return fits_a + fits_b, tl.maximum(above_a, above_b), tl.minimum(at_digit_a, at_digit_b)

    @triton.jit
    def _radix_digit(hist, threshold, above, matching, K, n_in, SHIFT: tl.constexpr):
        """One radix step: from the histogram of the next digit of the keys that match `threshold`'s decided
        bits, the digit of the K-th largest key, and the new (threshold, above, matching)."""
        # entries with key >= threshold | (digit << SHIFT), for each digit: non-increasing, >= K up to the digit
        # of the K-th largest key
        at_least = above + matching - tl.cumsum(hist, axis=0) + hist
        fits = at_least >= K
        n_fit, above, at_digit = tl.reduce(
            (fits.to(tl.int32), tl.where(fits, above, at_least), tl.where(fits, at_least, n_in)), 0, _pick_digit)
        return threshold | ((n_fit - 1) << SHIFT), above, at_digit - above

    @triton.jit
    def _digit_histogram(key, valid, threshold, SHIFT: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr):
        """Histogram (NBINS,) of the key bits [SHIFT, SHIFT + BITS) of the valid keys whose higher bits equal
        the threshold's (the bits decided so far)."""
        match = valid & ((key >> (SHIFT + BITS)) == (threshold >> (SHIFT + BITS)))
        return tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), NBINS, mask=match)

    @triton.jit
    def _threshold(x_ptr, n_in, K, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, DIGIT: tl.constexpr,
                   RESIDENT: tl.constexpr, SEARCH: tl.constexpr):
        """(T, last) for 0 < K < n_in: the K largest |x| (ties to the lowest indices) are the entries with
        key > T and those with key == T at index <= last.  RESIDENT (BLOCK >= n_in): x is read once and its keys
        stay in registers, T from a binary search (SEARCH) or a radix select; else a radix select re-reading x in
        blocks of BLOCK.  Radix: DIGIT bits per pass from the top (the last pass may have fewer)."""
        threshold = tl.full([], 0, tl.int32)  # the bits decided so far
        above = tl.full([], 0, tl.int32)  # entries whose key is above every key with these bits
        matching = tl.full([], 0, tl.int32) + n_in  # entries whose key has these bits
        NBINS: tl.constexpr = (1 << DIGIT) if DIGIT >= 5 else 32
        if SEARCH:  # resident keys; binary search, one bit per round: count(key >= candidate) >= K?
            offs = tl.arange(0, BLOCK)
            valid = offs < n_in
            xv = tl.load(x_ptr + offs, mask=valid, other=0.0)
            if xv.dtype == tl.bfloat16:  # (all-32-bit arithmetic: the bfloat16 bits are the float32's top half)
                key = (xv.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF) >> 16
            else:
                key = _key(xv, KEY_BITS)
            key = tl.where(valid, key, -1)
            lo = tl.full([], 0, tl.int32) + n_in  # count(key >= threshold)
            hi = tl.full([], 0, tl.int32)  # count(key > threshold): the largest count below K seen
            for p in tl.static_range(KEY_BITS):
                SHIFT = KEY_BITS - 1 - p
                cnt = tl.sum((key >= threshold + (1 << SHIFT)).to(tl.int32), axis=0)
                fits = cnt >= K
                threshold = tl.where(fits, threshold + (1 << SHIFT), threshold)
                lo = tl.where(fits, cnt, lo)
                hi = tl.where(fits, hi, tl.maximum(hi, cnt))
            need = K - hi  # tied entries kept: 1 <= need <= lo - hi
            last = tl.full([], 0, tl.int32) + n_in
            if need < lo - hi:
                tied = key == threshold
                rank = tl.cumsum(tied.to(tl.int32), axis=0)
                last = tl.max(tl.where(tied & (rank == need), offs, -1), axis=0)
        elif RESIDENT:  # one load
            offs = tl.arange(0, BLOCK)
            valid = offs < n_in
            key = _key(tl.load(x_ptr + offs, mask=valid, other=0.0), KEY_BITS)
            for p in tl.static_range((KEY_BITS + DIGIT - 1) // DIGIT):
                LOW = DIGIT * (p + 1)  # pass p: bits [SHIFT, SHIFT + BITS); the last pass may have fewer
                SHIFT = (KEY_BITS - LOW) * (LOW <= KEY_BITS)
                BITS = DIGIT - (LOW - KEY_BITS) * (LOW > KEY_BITS)
                hist = _digit_histogram(key, valid, threshold, SHIFT, BITS, NBINS)
                threshold, above, matching = _radix_digit(hist, threshold, above, matching, K, n_in, SHIFT)
            need = K - above  # tied entries kept: 1 <= need <= matching
            last = tl.full([], 0, tl.int32) + n_in
            if need < matching:
                tied = valid & (key == threshold)
                rank = tl.cumsum(tied.to(tl.int32), axis=0)
                last = tl.max(tl.where(tied & (rank == need), offs, -1), axis=0)
        else:
            for p in tl.static_range((KEY_BITS + DIGIT - 1) // DIGIT):
                LOW = DIGIT * (p + 1)  # as above
                SHIFT = (KEY_BITS - LOW) * (LOW <= KEY_BITS)
                BITS = DIGIT - (LOW - KEY_BITS) * (LOW > KEY_BITS)
                hist = tl.zeros([NBINS], dtype=tl.int32)  # next digit of the matching keys
                for start in range(0, n_in, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    valid = offs < n_in
                    key = _key(tl.load(x_ptr + offs, mask=valid, other=0.0), KEY_BITS)
                    hist += _digit_histogram(key, valid, threshold, SHIFT, BITS, NBINS)
                threshold, above, matching = _radix_digit(hist, threshold, above, matching, K, n_in, SHIFT)
            need = K - above
            last = tl.full([], 0, tl.int32) + n_in
            if need < matching:
                last = last * 0 - 1
                seen = tl.full([], 0, tl.int32)
                for start in range(0, n_in, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    valid = offs < n_in
                    tied = valid & (_key(tl.load(x_ptr + offs, mask=valid, other=0.0), KEY_BITS) == threshold)
                    rank = seen + tl.cumsum(tied.to(tl.int32), axis=0)
                    last = tl.maximum(last, tl.max(tl.where(tied & (rank == need), offs, -1), axis=0))
                    seen += tl.sum(tied.to(tl.int32), axis=0)
        return threshold, last

    @triton.jit
    def _keep(key, rows, in_range, threshold, last):
        return in_range & ((key > threshold) | ((key == threshold) & (rows <= last)))

    @triton.jit
    def _select_kernel(x_ptr, idx_ptr, n_in, K, KEY_BITS: tl.constexpr, SEL_BLOCK: tl.constexpr,
                       DIGIT: tl.constexpr, RESIDENT: tl.constexpr, SEARCH: tl.constexpr, BLOCK: tl.constexpr):
        # idx (K,) int64 out: the K largest |x|, ascending indices
        threshold, last = _threshold(x_ptr, n_in, K, KEY_BITS, SEL_BLOCK, DIGIT, RESIDENT, SEARCH)
        kept = tl.full([], 0, tl.int32)
        for start in range(0, n_in, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n_in
            key = _key(tl.load(x_ptr + offs, mask=valid, other=0.0), KEY_BITS)
            keep = _keep(key, offs, valid, threshold, last)
            position = kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(idx_ptr + position, offs.to(tl.int64), mask=keep)
            kept += tl.sum(keep.to(tl.int32), axis=0)

    @triton.jit
    def _store_output(y_ptr, bias_ptr, cols, col_mask, acc, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _topk_gemv_kernel(
        x_ptr,  # (in,) activations
        idx_ptr,  # (K,) int64 input channels to gather (unless SELECT)
        w_ptr,  # (in, out) weight_t, row stride = stride_w
        bias_ptr,
        y_ptr,  # (out,) output, x's dtype
        acc_ptr,  # (out,) float32 scratch, zeros (used with several row splits)
        count_ptr,  # (column blocks,) int32 scratch, zeros
        n_in,
        N,
        K,
        stride_w,
        rows_per_split,
        SELECT: tl.constexpr,  # True: keep the K largest |x| (selected here); False: rows idx[0:K]
        KEY_BITS: tl.constexpr,
        SEL_BLOCK: tl.constexpr,
        DIGIT: tl.constexpr,  # bits per radix pass of the selection
        RESIDENT: tl.constexpr,  # the selection keeps all of x in registers (SEL_BLOCK >= n_in)
        SEARCH: tl.constexpr,  # resident: a binary search on the key instead of the radix passes
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,  # several row splits (grid dim 1 > 1)
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        start = pid_k * rows_per_split
        if SELECT:
            threshold, last = _threshold(x_ptr, n_in, K, KEY_BITS, SEL_BLOCK, DIGIT, RESIDENT, SEARCH)
            end = tl.minimum(start + rows_per_split, n_in)
        else:
            end = tl.minimum(start + rows_per_split, K)
        for r0 in tl.range(start, end, BLOCK_K, num_stages=NUM_STAGES):
            offs = r0 + tl.arange(0, BLOCK_K)
            in_range = offs < end
            if SELECT:
                rows = offs
                xv = tl.load(x_ptr + rows, mask=in_range, other=0.0)
                keep = _keep(_key(xv, KEY_BITS), rows, in_range, threshold, last)
                xv = tl.where(keep, xv, 0.0)
            else:
                rows = tl.load(idx_ptr + offs, mask=in_range, other=0)
                xv = tl.load(x_ptr + rows, mask=in_range, other=0.0)
                keep = in_range
            w = tl.load(
                w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :],
                mask=keep[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[:, None], axis=0)
        if SPLIT:
            tl.atomic_add(acc_ptr + cols, acc, mask=col_mask, sem="relaxed")
            tl.debug_barrier()  # every thread's partial sums are in before the counter moves (release)
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:  # the last program of this column block
                total = tl.atomic_add(acc_ptr + cols, tl.zeros_like(acc), mask=col_mask, sem="acq_rel")  # (read)
                tl.store(acc_ptr + cols, tl.zeros_like(acc), mask=col_mask)  # zero again for the next call
                tl.store(count_ptr + pid_n, 0)
                _store_output(y_ptr, bias_ptr, cols, col_mask, total, HAS_BIAS)
        else:
            _store_output(y_ptr, bias_ptr, cols, col_mask, acc, HAS_BIAS)

    return _select_kernel, _topk_gemv_kernel


def _device_context(x: Tensor):
    # (a CPU tensor only reaches the kernels under TRITON_INTERPRET=1, Triton's CPU interpreter)
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# Workspace cache, like cuBLAS's per-stream workspaces: (device, stream, out) -> (float32 accumulator, int32
# counters), all zero between calls.  Per stream, so that kernels on different streams never share one.
_SCRATCH: dict = {}


def _scratch(device: torch.device, n_out: int) -> tuple[Tensor, Tensor]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, n_out)
    buf = _SCRATCH.get(key)
    if buf is None:
        zeros = torch.zeros(2 * n_out, dtype=torch.int32, device=device)
        buf = zeros[:n_out].view(torch.float32), zeros[n_out:]
        # one zeroed while a CUDA graph is being captured is zero only in that graph's replays: not shared
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _SCRATCH[key] = buf
    return buf


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Selection tuning (H100, Llama-2-7B widths, eval/results/kernel_bench_cuda.md): bits per radix pass; the most
# entries of x each thread keeps in registers (above that, every radix pass re-reads x in blocks of 8 entries per
# thread); above how many entries per thread the resident keys go through the binary search (one cheap count per
# bit, but one block-wide reduction each) instead of the radix passes (3 or 7 histogram passes, costlier per entry).
_RADIX_BITS = 5
_RESIDENT_PER_THREAD = 32
_SEARCH_ABOVE_PER_THREAD = 8


def _select_blocks(n_in: int, key_bits: int, threads: int) -> dict:
    """Selection constexprs for a program of `threads` threads."""
    block = _pow2(n_in)
    if block > _RESIDENT_PER_THREAD * threads:
        block = 8 * threads
    block = max(threads, block)
    resident = block >= n_in
    return dict(SEL_BLOCK=block, DIGIT=_RADIX_BITS, RESIDENT=resident,
                SEARCH=resident and block > _SEARCH_ABOVE_PER_THREAD * threads)


def _launch(x1: Tensor, idx: Optional[Tensor], weight_t: Tensor, bias: Optional[Tensor], keep_k: int,
            config: GatherConfig) -> Tensor:
    """y (out,) of x1's dtype: the kept rows of weight_t (idx[0:K], or the K largest |x1| if idx is None)
    times x1, plus the bias, in one launch.  0 < keep_k (< in when selecting)."""
    n_in, n_out = weight_t.shape
    y = torch.empty(n_out, dtype=x1.dtype, device=x1.device)
    n_blocks = cdiv(n_out, config.block_n)
    rows = n_in if idx is None else keep_k
    # Enough programs to fill the GPU, splitting the rows if the column blocks alone do not.
    split = max(1, min(cdiv(rows, config.block_k), cdiv(config.programs_per_sm * _num_sms(x1.device), n_blocks)))
    rows_per_split = cdiv(cdiv(rows, split), config.block_k) * config.block_k
    split = cdiv(rows, rows_per_split)
    acc, counts = _scratch(x1.device, n_out) if split > 1 else (y, y)
    threads = 32 * config.num_warps
    with _device_context(x1):
        _kernels()[1][(n_blocks, split)](
            x1, x1 if idx is None else idx, weight_t, y if bias is None else bias, y, acc, counts,
            n_in, n_out, keep_k, weight_t.stride(0), rows_per_split,
            SELECT=idx is None, KEY_BITS=_KEY_BITS[x1.dtype], **_select_blocks(n_in, _KEY_BITS[x1.dtype], threads),
            BLOCK_K=config.block_k, BLOCK_N=config.block_n, NUM_STAGES=config.num_stages,
            HAS_BIAS=bias is not None, SPLIT=split > 1, num_warps=config.num_warps,
        )
    return y


def _bias_only(x: Tensor, bias: Optional[Tensor], n_out: int) -> Tensor:
    """K = 0: y = bias (or zeros)."""
    y = torch.zeros(n_out, dtype=x.dtype, device=x.device) if bias is None else bias.clone()
    return y.reshape(*x.shape[:-1], n_out)


def index_gemv_triton(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor],
                      config: Optional[GatherConfig] = None) -> Tensor:
    """y = x[indices] @ weight_t[indices] (+ bias) on CUDA; shapes as topk_gemv.

    ``indices``: 1-D int64 CUDA tensor of distinct input channels (ascending is
    best for DRAM locality).  Inputs are assumed validated by the caller.
    """
    n_in, n_out = weight_t.shape
    if indices.numel() == 0:
        return _bias_only(x, bias, n_out)
    x1 = x.reshape(n_in).contiguous()
    y = _launch(x1, indices.contiguous(), weight_t, bias, indices.numel(), config or default_config(x.dtype))
    return y.reshape(*x.shape[:-1], n_out)


def select_triton(x1: Tensor, keep_k: int, num_warps: int = 16) -> Tensor:
    """Indices (K,) int64 ascending of the K largest |x1| (ties: lowest indices), one program.
    x1: (in,) contiguous, 0 < keep_k < in."""
    n_in = x1.numel()
    idx = torch.empty(keep_k, dtype=torch.long, device=x1.device)
    threads = 32 * num_warps
    with _device_context(x1):
        _kernels()[0][(1,)](x1, idx, n_in, keep_k, KEY_BITS=_KEY_BITS[x1.dtype],
                            **_select_blocks(n_in, _KEY_BITS[x1.dtype], threads),
                            BLOCK=max(threads, min(_pow2(n_in), 8 * threads)), num_warps=num_warps)
    return idx


def topk_gemv_triton(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int,
                     config: Optional[GatherConfig] = None) -> Tensor:
    """Top-K selection + gather-GEMV for one token on CUDA (one launch, see the module docstring)."""
    n_in, n_out = weight_t.shape
    x1 = x.reshape(n_in).contiguous()
    if keep_k >= n_in:  # dense: cuBLAS reads the (in, out) layout at full bandwidth
        y = x1.unsqueeze(0) @ weight_t
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], n_out)
    if keep_k == 0:
        return _bias_only(x, bias, n_out)
    y = _launch(x1, None, weight_t, bias, keep_k, config or select_config(x.dtype))
    return y.reshape(*x.shape[:-1], n_out)


def topk_indices_triton(x1: Tensor, keep_k: int) -> Optional[Tensor]:
    """The K largest |x1| (ascending indices) through the selection kernel; x1 (in,) contiguous.
    None where no selection is needed (K = 0, K = in)."""
    return select_triton(x1, keep_k) if 0 < keep_k < x1.numel() else None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
