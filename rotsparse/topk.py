"""The Top-K site function: per-token Top-K of an activation (or block N:M Top-K), optional L2 rescaling and a
straight-through backward (Q-Sparse). Tensor functions only; the modules that apply them are in `runtime`.
The selection itself is `rotsparse.kernels.reference.topk_select`, shared with the kernels' reference paths.
"""

from __future__ import annotations

import torch

from .kernels.reference import topk_mask, topk_select


def keep_topk(x: torch.Tensor, keep_k: int, straight_through: bool = False) -> torch.Tensor:
    """Zero all but the `keep_k` largest |x| of every token (last dim). Shape unchanged.

    With `straight_through`, the backward pass is the identity (Q-Sparse's STE): x + (topk(x) - x).detach().
    """
    width = x.shape[-1]
    if not 0 <= keep_k <= width:
        raise ValueError(f"keep_k must be in [0, {width}], got {keep_k}")
    sparse = topk_mask(x, keep_k)
    if straight_through and sparse is not x:
        return x + (sparse - x).detach()
    return sparse


def block_keep(keep_k: int, width: int, block_size: int) -> int:
    """N of block (N:M) Top-K for a site that keeps `keep_k` of `width` entries: round(K * M / width)."""
    if block_size < 1 or width % block_size:
        raise ValueError(f"block_size {block_size} must divide the input width {width}")
    return min(block_size, max(0, int(round(keep_k * block_size / width))))


def keep_topk_blocks(x: torch.Tensor, keep_n: int, block_size: int, straight_through: bool = False) -> torch.Tensor:
    """Block (N:M) Top-K: in every run of `block_size` consecutive entries of the last dim keep the `keep_n`
    largest |x|, per token (Block Q-Sparse). Shape unchanged; `straight_through` as in `keep_topk`."""
    width = x.shape[-1]
    if block_size < 1 or width % block_size:
        raise ValueError(f"block_size {block_size} must divide the last dimension {width}")
    if not 0 <= keep_n <= block_size:
        raise ValueError(f"keep_n must be in [0, {block_size}], got {keep_n}")
    if keep_n == block_size:
        return x
    sparse = topk_mask(x.unflatten(-1, (width // block_size, block_size)), keep_n).flatten(-2)
    if straight_through:
        return x + (sparse - x).detach()
    return sparse


def block_indices(x: torch.Tensor, keep_n: int, block_size: int) -> torch.Tensor:
    """Ascending indices of the entries block (N:M) Top-K keeps in one token x (width,)."""
    offsets = torch.arange(0, x.numel(), block_size, device=x.device).unsqueeze(-1)
    return (topk_select(x.view(-1, block_size), keep_n) + offsets).flatten().sort().values


def l2_rescale_factor(x: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Per-token ||x|| / ||sparse|| (shape (..., 1), float32; 1 where nothing was kept)."""
    full = x.float().norm(dim=-1, keepdim=True)
    kept = sparse.float().norm(dim=-1, keepdim=True)
    return torch.where(kept > 0, full / kept.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(kept))


def sparsify_activation(x: torch.Tensor, keep_k: int, *, block_size: int = 0, l2_rescale: bool = False,
                        straight_through: bool = False) -> torch.Tensor:
    """The Top-K site function: per-token Top-K (or block N:M Top-K when `block_size` > 0, with
    N = `block_keep(keep_k, width, block_size)`), optionally rescaled per token to the L2 norm of `x`
    (Q-Sparse). With `straight_through` the whole function has an identity backward (STE)."""
    if block_size:
        sparse = keep_topk_blocks(x, block_keep(keep_k, x.shape[-1], block_size), block_size)
    else:
        sparse = keep_topk(x, keep_k)
    if sparse is x:
        return x
    if l2_rescale:
        sparse = sparse * l2_rescale_factor(x, sparse).to(sparse.dtype)
    if straight_through:
        return x + (sparse - x).detach()
    return sparse
