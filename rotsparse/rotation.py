"""Rotations, channel scalings and Top-K error curves: pure float64 tensor functions for the weight surgery.

Conventions: activations are row vectors; a residual stream in basis Q holds x' = x @ Q. Every function
takes and returns float64 tensors; callers cast back to the model dtype once.
"""

from __future__ import annotations

import torch


def pca_rotation(second_moment: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q (d, d) whose columns are eigenvectors of `second_moment` (d, d), largest eigenvalue first.

    Signs are deterministic: the largest-magnitude entry of every column is positive.
    """
    if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"second moment must be square, got shape {tuple(second_moment.shape)}")
    if not torch.isfinite(second_moment).all():
        raise ValueError("second moment contains NaN or Inf")
    symmetric = second_moment.double()
    symmetric = (symmetric + symmetric.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    order = torch.argsort(eigenvalues, descending=True)
    rotation = eigenvectors[:, order]
    pivot = rotation.abs().argmax(dim=0)
    signs = torch.sign(rotation[pivot, torch.arange(rotation.shape[1], device=rotation.device)])
    signs[signs == 0] = 1.0
    return rotation * signs


def sink_preserving_rotation(second_moment: torch.Tensor, sink_rows: torch.Tensor, energy: float = 0.9,
                             max_channels: int | None = None) -> torch.Tensor:
    """Orthogonal Q (d, d) that leaves the channels of the attention-sink rows unrotated and is the PCA of
    `second_moment` (d, d) on the other channels; the plain PCA if the sink rows' energy is not concentrated.

    sink_rows (n, d): normalised rows of sink tokens (the first token of each sequence). Their massive
    activations sit in a few channels; a full PCA spreads them over many directions, where Top-K cuts them.
    The kept channels: the fewest holding `energy` of the sink rows' energy, at most `max_channels`
    (default d // 32); they come first, then the PCA directions of the rest, largest eigenvalue first.
    """
    width = second_moment.shape[0]
    share = sink_rows.double().pow(2).sum(0)
    share = share / share.sum()
    order = torch.argsort(share, descending=True)
    count = int((share[order].cumsum(0) < energy).sum()) + 1
    if count > (max_channels or width // 32):
        return pca_rotation(second_moment)
    device = second_moment.device
    kept, rest = order[:count].sort().values.to(device), order[count:].sort().values.to(device)
    rotation = torch.zeros(width, width, dtype=torch.float64, device=device)
    rotation[kept, torch.arange(count, device=device)] = 1.0
    rotation[rest[:, None], torch.arange(count, width, device=device)[None, :]] = pca_rotation(
        second_moment[rest][:, rest])
    return rotation


def gram_factor(weight: torch.Tensor) -> torch.Tensor:
    """F (in, in) float64 with F^T F = W^T W for a weight W (out, in): for every x, ||x F^T|| = ||x W^T||, so F
    stands for a wide W (out > in) in output errors, column norms and right-multiplied folds."""
    eigenvalues, eigenvectors = torch.linalg.eigh(weight.double().T @ weight.double())
    return eigenvalues.clamp_min(0).sqrt()[:, None] * eigenvectors.T


def head_rotations(head_moments: torch.Tensor) -> torch.Tensor:
    """Per value head, the PCA (`pca_rotation`) of its attention outputs: (kv_heads, head_dim, head_dim) second
    moments -> (kv_heads, head_dim, head_dim) orthogonal matrices."""
    if head_moments.ndim != 3:
        raise ValueError(f"head moments must have shape (kv_heads, head_dim, head_dim), got "
                         f"{tuple(head_moments.shape)}")
    return torch.stack([pca_rotation(moment) for moment in head_moments])


def head_block_rotation(rotations: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Block-diagonal (num_heads * head_dim, num_heads * head_dim) matrix applying every value head's rotation
    (kv_heads, head_dim, head_dim) to the heads that read it: head j takes rotation j // (num_heads / kv_heads)
    (the GQA grouping of Hugging Face's `repeat_kv`). num_heads = kv_heads gives the v_proj output side."""
    kv_heads = rotations.shape[0]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} heads cannot share {kv_heads} value heads")
    return torch.block_diag(*rotations.double().repeat_interleave(num_heads // kv_heads, dim=0))


def fold_input(weight: torch.Tensor, scale: torch.Tensor | None, rotation: torch.Tensor | None) -> torch.Tensor:
    """Weight (out, in) of a linear reading norm output `scale * x_hat` from a stream rotated by `rotation`.

    Returns W diag(scale) Q, so that (x_hat @ Q) @ result.T == (scale * x_hat) @ weight.T.
    """
    folded = weight.double()
    if scale is not None:
        folded = folded * scale.double()[None, :]
    if rotation is not None:
        folded = folded @ rotation.double()
    return folded


def rotate_output(weight: torch.Tensor, bias: torch.Tensor | None, rotation: torch.Tensor):
    """Weight (out, in) and bias (out,) of a linear whose output must land in the basis `rotation` (out, out).

    Returns (Q^T W, Q^T b): y' = y @ Q.
    """
    rotation = rotation.double()
    rotated_bias = None if bias is None else bias.double() @ rotation
    return rotation.T @ weight.double(), rotated_bias


def rotate_embedding(embedding: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Embedding table (vocab, d) whose rows live in the basis `rotation`: E @ Q."""
    return embedding.double() @ rotation.double()


def residual_rotation(rotation_from: torch.Tensor, rotation_to: torch.Tensor) -> torch.Tensor:
    """Matrix (d, d) taking a stream from basis Q_from to Q_to: x_to = x_from @ (Q_from^T Q_to)."""
    return rotation_from.double().T @ rotation_to.double()


def column_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """Input-channel scale c (in,) of the linears (out_i, in) reading one site: the norm of each input
    channel's column over all of them, sqrt(sum_i ||W_i[:, j]||^2), floored at 1e-12 of the largest.

    Top-K on |x * c| is Top-K on |x| weighted by how much each channel can move the outputs (WINA).
    """
    squares = sum(w.detach().double().pow(2).sum(0) for w in weights)
    norms = squares.sqrt()
    return norms.clamp_min(1e-12 * float(norms.max()) if norms.max() > 0 else 1.0)


def scale_input(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W diag(1/c) (out, in): the linear that reads x * c and computes what `weight` computed on x."""
    return weight.double() / scale.double()[None, :]


def scale_output(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor):
    """(diag(c) W, c * b): a linear (out, in) whose outputs come out multiplied by c (out,)."""
    scale = scale.double()
    return weight.double() * scale[:, None], None if bias is None else bias.double() * scale


def grouped_head_scale(channel_scale: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Share a per-o_proj-input-channel scale (num_heads * head_dim,) within GQA groups.

    The query heads of a group read the same value head, so a scale folded into v_proj's rows must be
    one per value channel: the RMS over the group's heads. Returns (num_kv_heads * head_dim,).
    """
    head_dim = channel_scale.shape[0] // num_heads
    groups = channel_scale.double().view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    return groups.pow(2).mean(1).sqrt().reshape(-1)


def expand_head_scale(value_scale: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Per-value-channel scale (num_kv_heads * head_dim,) -> per-o_proj-input-channel (num_heads * head_dim,)."""
    head_dim = value_scale.shape[0] // num_kv_heads
    per_kv = value_scale.double().view(num_kv_heads, 1, head_dim)
    return per_kv.expand(num_kv_heads, num_heads // num_kv_heads, head_dim).reshape(-1)


def topk_error_curve(inputs: torch.Tensor, weight: torch.Tensor, points: int = 32, relative: bool = True,
                     chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Output error of per-token Top-K for every K: (d + 1,), entry K = sum_t ||r_t W^T||^2 with r_t what
    Top-K drops from x_t, divided by sum_t ||x_t W^T||^2 when `relative`, else by n (mean per token).

    inputs: (n, d) rows as the Top-K sees them; weight: (out, d), the linears reading them stacked.
    Exact at `points` + 1 evenly spaced K (entries ranked by |x| are cut into blocks, one matmul per
    block, suffix sums over blocks), linear in between. Cost O(points * n * d * min(d, out)): a wide
    `weight` is first replaced by a (d, d) factor with the same Gram matrix W^T W.
    """
    if weight.shape[0] > weight.shape[1]:
        weight = gram_factor(weight)
    device = inputs.device
    inputs, weight = inputs.float(), weight.to(device=device, dtype=torch.float32)
    width = inputs.shape[1]
    grid = torch.unique(torch.linspace(0, width, points + 1, device=device).round().long())
    ranks = inputs.abs().argsort(dim=-1, descending=True).argsort(dim=-1)
    blocks = torch.bucketize(ranks, grid[1:-1], right=True)
    count = grid.numel() - 1
    errors = torch.zeros(count, dtype=torch.float64, device=device)
    chunk = max(1, chunk_elements // (count * max(width, weight.shape[0])))
    block_ids = torch.arange(count, device=device)[:, None, None]
    for start in range(0, inputs.shape[0], chunk):
        rows, row_blocks = inputs[start : start + chunk], blocks[start : start + chunk]
        parts = (rows[None] * (row_blocks[None] == block_ids)) @ weight.T  # (blocks, n, out)
        dropped = parts.flip(0).cumsum(0).flip(0)  # block b: everything ranked >= grid[b]
        errors += dropped.pow(2).sum((1, 2)).double()
    total = errors[0].clamp_min(torch.finfo(torch.float64).tiny) if relative else max(inputs.shape[0], 1)
    at_grid = torch.cat([errors / total, torch.zeros(1, dtype=torch.float64, device=device)])
    return _interpolate(torch.arange(width + 1, dtype=torch.float64, device=device), grid.double(), at_grid)


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing, x within [xp[0], xp[-1]])."""
    index = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    left, right = xp[index - 1], xp[index]
    weight = (x - left) / (right - left)
    return fp[index - 1] + weight * (fp[index] - fp[index - 1])
