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


def topk_select(x: Tensor, keep_k: int) -> Tensor:
    """Indices (..., keep_k), unordered, of the `keep_k` largest |x| of every token (last dim); ties as
    ``torch.topk`` breaks them. The one Top-K selection of the reference paths."""
    return x.detach().abs().topk(keep_k, dim=-1, sorted=False).indices


def topk_mask(x: Tensor, keep_k: int) -> Tensor:
    """Per-token dense-masked Top-K along the last dim.

    x: (..., in), any number of tokens.  Returns a tensor of the same shape and
    dtype that is zero everywhere except, independently for every token, at
    the ``keep_k`` largest ``|x|`` entries (exactly ``keep_k`` per token; ties
    broken by ``torch.topk``).  ``keep_k == 0`` gives zeros; ``keep_k == in``
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
    idx = topk_select(x, keep_k)
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def topk_indices_torch(x1: Tensor, keep_k: int) -> Tensor:
    """Ascending int64 indices (keep_k,) of the keep_k largest |x1| of one token x1 (in,)."""
    n = x1.shape[-1]
    if keep_k == n:
        return torch.arange(n, device=x1.device)
    return topk_select(x1, int(keep_k)).sort().values


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
    """Top-K + sparse GEMV of one token x (in,) with weight_t (in, out), in plain PyTorch."""
    return index_gemv_torch(x, topk_indices_torch(x.reshape(weight_t.shape[0]), keep_k), weight_t, bias)


def to_input_major(weight: Tensor) -> Tensor:
    """(out, in) weight as the transpose view of a contiguous (in, out) tensor (the kernels' layout)."""
    return weight.detach().t().contiguous().t()
