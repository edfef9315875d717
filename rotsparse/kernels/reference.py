"""Reference implementations in plain PyTorch: THE per-token Top-K selection (`topk_select`, used by every
Top-K in rotsparse), the dense-masked Top-K (`topk_mask`), and the kernels' fallbacks (float32 accumulation).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor


def check_keep_k(keep_k, n: int) -> int:
    """`keep_k` as an int in [0, n]; TypeError / ValueError otherwise."""
    if isinstance(keep_k, bool) or not isinstance(keep_k, (int, torch.SymInt)):
        try:
            keep_k = operator.index(keep_k)  # numpy / 0-d integer tensors
        except TypeError:
            raise TypeError(f"keep_k must be an int, got {type(keep_k).__name__}") from None
    if keep_k < 0 or keep_k > n:
        raise ValueError(f"keep_k={keep_k} out of range [0, {n}]")
    return keep_k


def magnitude_keys(x: Tensor) -> Tensor:
    """Integers ordered as |x| (NaN above +inf): the bit patterns of |x|, the order every kernel selects by."""
    magnitude = x.detach().abs()
    if magnitude.dtype in (torch.bfloat16, torch.float16):
        return magnitude.view(torch.int16)
    if magnitude.dtype == torch.float64:
        return magnitude.view(torch.int64)
    return magnitude.float().view(torch.int32)


def topk_keep(x: Tensor, keep_k: int) -> Tensor:
    """Bool mask (..., in) of the `keep_k` largest |x| of every token (last dim), 1 <= keep_k <= in: exactly
    `keep_k` per token, ties at the threshold to the lowest indices, as the C++ and Triton kernels break them (so
    every path keeps the same entries)."""
    keys, n = magnitude_keys(x), x.shape[-1]
    if keys.dtype == torch.int16 and n <= 1 << 16:  # 16-bit floats: distinct keys (|x| bits, then lower index)
        keys = keys.to(torch.int32) * n + torch.arange(n - 1, -1, -1, dtype=torch.int32, device=keys.device)
        return keys >= keys.topk(keep_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    threshold = keys.topk(keep_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = keys > threshold
    ties = keys == threshold
    need = keep_k - above.sum(-1, keepdim=True, dtype=torch.int32)
    return above | (ties & (ties.cumsum(-1, dtype=torch.int32) <= need))


def topk_select(x: Tensor, keep_k: int) -> Tensor:
    """Indices (..., keep_k), ascending, of the entries `topk_keep` keeps. The one Top-K selection of the
    reference paths."""
    if keep_k == 0:
        return torch.empty((*x.shape[:-1], 0), dtype=torch.long, device=x.device)
    keep = topk_keep(x, keep_k)
    return keep.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., :keep_k].sort(dim=-1).values


def topk_mask(x: Tensor, keep_k: int) -> Tensor:
    """Per-token dense-masked Top-K along the last dim.

    x: (..., in), any number of tokens.  Returns a tensor of the same shape and
    dtype that is zero everywhere except, independently for every token, at
    the ``keep_k`` largest ``|x|`` entries (exactly ``keep_k`` per token; ties
    to the lowest indices, as in the kernels).  ``keep_k == 0`` gives zeros; ``keep_k == in``
    returns ``x`` itself (no copy).  Differentiable through the kept entries.
    """
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    n = x.shape[-1]
    keep_k = check_keep_k(keep_k, n)
    if keep_k == n:
        return x
    if keep_k == 0:
        return torch.zeros_like(x)
    return torch.where(topk_keep(x, keep_k), x, torch.zeros((), dtype=x.dtype, device=x.device))


def topk_indices_torch(x1: Tensor, keep_k: int) -> Tensor:
    """Ascending int64 indices (keep_k,) of the keep_k largest |x1| of one token x1 (in,)."""
    n = x1.shape[-1]
    if keep_k == n:
        return torch.arange(n, device=x1.device)
    return topk_select(x1, int(keep_k))


def index_gemv_torch(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x[indices] @ weight_t[indices] (+ bias)`` for one token x, float32 accumulation at least."""
    n_in, n_out = weight_t.shape
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    x1 = x.reshape(n_in)
    xs = x1.index_select(0, indices).to(acc_dtype).unsqueeze(0)
    acc = (xs @ weight_t.index_select(0, indices).to(acc_dtype)).reshape(n_out)
    if bias is not None:
        acc = acc + bias.to(acc_dtype)
    return acc.to(x.dtype).reshape(*x.shape[:-1], n_out)


def topk_gemv_torch(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Top-K + sparse GEMV of the tokens x (..., in) with weight_t (in, out), in plain PyTorch (one token: only
    its kept rows; several: the masked product)."""
    if x.numel() == weight_t.shape[0]:
        return index_gemv_torch(x, topk_indices_torch(x.reshape(weight_t.shape[0]), keep_k), weight_t, bias)
    output = topk_mask(x, keep_k) @ weight_t
    return output if bias is None else output + bias


def to_input_major(weight: Tensor) -> Tensor:
    """(..., out, in) weight(s) as the transpose view of a contiguous (..., in, out) tensor (the kernels' layout;
    batched expert weights keep their leading expert dimension)."""
    return weight.detach().transpose(-2, -1).contiguous().transpose(-2, -1)


# Weight-only quantized formats (the C++ kernels' layouts, rotsparse/kernels/topk_gemv.cpp) ----------------------

INT4_BLOCK = 32
"""int4 rows are packed in blocks of this many output columns (a shorter last block of even width w): byte b of a
block holds column b in its low nibble and column b + w/2 in its high nibble."""


def int4_positions(out: int, device: torch.device | str = "cpu") -> Tensor:
    """(out,) int64: where column j sits in a packed row read as a stream of nibbles (low nibble of byte b at 2b,
    high nibble at 2b + 1)."""
    if out % 2:
        raise ValueError(f"int4 packing needs an even number of output columns, got {out}")
    column = torch.arange(out, device=device)
    start = column // INT4_BLOCK * INT4_BLOCK
    half = (out - start).clamp(max=INT4_BLOCK) // 2
    offset = column - start
    return start + 2 * (offset % half) + (offset >= half).long()


def pack_int4(nibbles: Tensor) -> Tensor:
    """(in, out) uint8 values in [0, 15] -> (in, out / 2) uint8 packed rows (`INT4_BLOCK` layout)."""
    rows, out = nibbles.shape
    stream = torch.empty_like(nibbles)
    stream[:, int4_positions(out, nibbles.device)] = nibbles
    return stream[:, 0::2] | (stream[:, 1::2] << 4)


def unpack_int4(packed: Tensor, out: int) -> Tensor:
    """Inverse of `pack_int4`: (rows, out / 2) uint8 -> (rows, out) uint8 values in [0, 15]. Each block's low
    nibbles are its first half of columns and its high nibbles the second, so no gather is needed."""
    rows, full = packed.shape[0], out // INT4_BLOCK * INT4_BLOCK
    blocks = packed[:, :full // 2].reshape(rows, full // INT4_BLOCK, INT4_BLOCK // 2)
    unpacked = torch.cat((blocks & 15, blocks >> 4), -1).reshape(rows, full)
    if out == full:
        return unpacked
    tail = packed[:, full // 2:]  # the last, shorter block
    return torch.cat((unpacked, tail & 15, tail >> 4), -1)


def int4_weight(packed_t: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The (in, out) weight a packed int4 weight (in, out / 2) with group scales (in / group, out) float16 stands
    for, ``scales[i // group, j] * (n[i, j] - 8)``, in `dtype` (computed in float32: exact)."""
    n_in = packed_t.shape[0]
    groups, n_out = scales.shape
    values = unpack_int4(packed_t, n_out).view(groups, n_in // groups, n_out).float() - 8
    return (values * scales.float().unsqueeze(1)).reshape(n_in, n_out).to(dtype)


def topk_gemv_int8_torch(x: Tensor, qweight_t: Tensor, scale: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Top-K GEMV of the tokens x (..., in) through an int8 weight qweight_t (in, out) with per-output scale
    (out,) float32: ``scale * (x[kept] @ qweight_t[kept]) (+ bias)``, float32 accumulation."""
    n_in, n_out = qweight_t.shape
    if x.numel() != n_in:
        acc = (topk_mask(x, keep_k).float() @ qweight_t.float()) * scale.float()
        return (acc if bias is None else acc + bias.float()).to(x.dtype)
    x1 = x.reshape(n_in)
    indices = topk_indices_torch(x1, keep_k)
    acc = (x1.index_select(0, indices).float() @ qweight_t.index_select(0, indices).float()) * scale.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], n_out)


def group_int8_activations(x: Tensor, group_size: int) -> Tensor:
    """x (..., in) rounded as the int4 kernels use their (sparse) activations: int8 with one scale per group of
    group_size consecutive channels, d = max |x| / 127 over the group, q = round(x * (127 / max |x|)) (as
    llama.cpp's Q8_0 activations); returns q * d in float32, shape of x. Zeros (dropped channels) stay zero."""
    groups = x.float().unflatten(-1, (-1, group_size))
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))  # not 127 / t
    return ((groups * inverse).round().clamp(-127, 127) * (amax / 127.0)).flatten(-2)


def topk_gemv_int4_torch(x: Tensor, packed_t: Tensor, scales: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Top-K GEMV of the tokens x (..., in) through a packed int4 weight packed_t (in, out / 2) with group scales
    (in / group, out) float16: ``xq[kept] @ (scales[kept // group] * (nibbles[kept] - 8)) (+ bias)``, xq the kept
    activations rounded to int8 per group (`group_int8_activations`); float32 accumulation."""
    n_in = packed_t.shape[0]
    groups, n_out = scales.shape
    if x.numel() != n_in:
        acc = group_int8_activations(topk_mask(x, keep_k), n_in // groups) @ int4_weight(packed_t, scales, torch.float32)
        return (acc if bias is None else acc + bias.float()).to(x.dtype)
    x1 = x.reshape(n_in)
    indices = topk_indices_torch(x1, keep_k)
    rows = unpack_int4(packed_t.index_select(0, indices), n_out).float() - 8
    rows = rows * scales.index_select(0, indices // (n_in // groups)).float()
    acc = group_int8_activations(topk_mask(x1, keep_k), n_in // groups).index_select(0, indices) @ rows
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], n_out)


RESIDUAL_GROUP = 64
"""Output columns per float16 scale of a residual copy (`rotsparse.quantize.quantize_residual`); rows are padded to
whole groups."""


def residual_weight_torch(codes: Tensor, scales: Tensor, bits: int, out: int, dtype: torch.dtype) -> Tensor:
    """The (in, out) weight a residual copy stands for: ``scales[i, j // 64] * (code[i, j] - (2**bits - 1) / 2)``;
    codes (in, groups * 64 * bits / 8) uint8, 8 / bits per byte along the output, the first in the low bits;
    scales (in, groups) float16."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    unpacked = (codes.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    n_in, groups = scales.shape
    levels = unpacked.reshape(n_in, groups, -1).float() - (2 ** bits - 1) / 2
    return (levels * scales.float().unsqueeze(-1)).reshape(n_in, -1)[:, :out].to(dtype)


def topk_residual_gemv_torch(x: Tensor, weight_t: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor],
                             keep_k: int, bits: int, copy_k: int) -> Tensor:
    """One token x (in,): ``topk(x, K) @ weight_t + (topk(x, K + C) - topk(x, K)) @ residual (+ bias)``, K =
    keep_k, C = copy_k, float32 accumulation, the residual copy as in `residual_weight_torch`."""
    n_in, n_out = weight_t.shape
    x1 = x.reshape(n_in).float()
    kept = topk_mask(x1, keep_k)
    copied = topk_mask(x1, keep_k + copy_k) - kept
    acc = kept @ weight_t.float() + copied @ residual_weight_torch(codes, scales, bits, n_out, torch.float32)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], n_out)
