"""Rotations from second moments, and the weight surgery that folds them in (pure tensor functions).

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
    signs = torch.sign(rotation[pivot, torch.arange(rotation.shape[1])])
    signs[signs == 0] = 1.0
    return rotation * signs


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


def residual_adapter(rotation_from: torch.Tensor, rotation_to: torch.Tensor) -> torch.Tensor:
    """Matrix (d, d) taking a stream from basis Q_from to Q_to: x_to = x_from @ (Q_from^T Q_to)."""
    return rotation_from.double().T @ rotation_to.double()
