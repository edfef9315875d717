"""The K budget: how many entries every site (or reader linear) keeps so that the parameter-weighted sparsity
hits the request. `allocate_keep_k` spreads it by fixed site coefficients; `allocate_by_error` by
calibrated error curves (Lagrangian), also returning the price per kept weight.

Sizes are (input width, parameters fed) per unit; a unit keeping K of width columns keeps K * params / width
weights.
"""

from __future__ import annotations

import torch


def full_keep_k(unit_sizes) -> tuple[tuple[int, ...], ...]:
    """K = width for every unit of every layer (sparsity 0)."""
    return tuple(tuple(width for width, _ in layer) for layer in unit_sizes)


def allocate_keep_k(site_sizes: list[tuple[tuple[int, int], ...]], sparsity: float,
                    coefficients: tuple[float, ...]) -> tuple[tuple[int, ...], ...]:
    """K per site per layer so that the parameter-weighted sparsity equals `sparsity`.

    site_sizes[l][s] = (input width, parameters fed). Site s gets sparsity min(alpha * c_s * sparsity, 1)
    with one alpha for the whole model, found by bisection; K is then rounded (within one column).
    """
    if sparsity == 0:
        return full_keep_k(site_sizes)
    total = sum(params for layer in site_sizes for _, params in layer)

    def weighted_sparsity(alpha: float) -> float:
        return sum(params * min(alpha * c * sparsity, 1.0)
                   for layer in site_sizes for c, (_, params) in zip(coefficients, layer)) / total

    low, high = 0.0, 1.0
    while weighted_sparsity(high) < sparsity:
        high *= 2
        if high > 1e6:
            raise ValueError(f"cannot reach sparsity {sparsity} with site coefficients {coefficients}")
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if weighted_sparsity(middle) < sparsity else (low, middle)
    alpha = (low + high) / 2
    return tuple(
        tuple(int(round(width * (1.0 - min(alpha * c * sparsity, 1.0)))) for c, (width, _) in zip(coefficients, layer))
        for layer in site_sizes
    )


def weights_kept(width: int, params: int) -> torch.Tensor:
    """Weights a site keeps at K = 0..width: K * params / width, (width + 1,) float64."""
    return (params / width) * torch.arange(width + 1, dtype=torch.float64)


def allocate_by_error(curves: list[list[torch.Tensor]], unit_sizes,
                      sparsity: float) -> tuple[tuple[tuple[int, ...], ...], float]:
    """K per unit per layer minimising sum of curves[l][s][K] with parameter-weighted sparsity >= `sparsity`,
    and the price per kept weight at that budget. A unit (a site, or one reader linear of a site) has
    unit_sizes[l][s] = (input width, parameters fed) and curves[l][s] (width + 1,).

    Lagrangian: for a price lam per kept parameter, each site independently takes argmin_K e(K) + lam * K *
    params/width; lam is bisected to the budget, then columns are given back greedily while they fit.
    """
    if sparsity == 0:
        return full_keep_k(unit_sizes), 0.0
    flat = [(curve, width, params / width, weights_kept(width, params))
            for layer_curves, layer in zip(curves, unit_sizes) for curve, (width, params) in zip(layer_curves, layer)]
    total = sum(params for layer in unit_sizes for _, params in layer)
    budget = (1.0 - sparsity) * total

    def pick(lam: float) -> list[int]:
        return [int(torch.argmin(curve + lam * kept_weights)) for curve, _, _, kept_weights in flat]

    def kept(keep: list[int]) -> float:
        return sum(k * per_column for k, (_, _, per_column, _) in zip(keep, flat))

    low, high = 0.0, 1.0
    while kept(pick(high)) > budget:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(pick(middle)) > budget else (low, middle)
    keep = pick(high)
    used = kept(keep)
    while True:
        gains = [(float(curve[k] - curve[k + 1]) / per_column, index)
                 for index, (k, (curve, width, per_column, _)) in enumerate(zip(keep, flat))
                 if k < width and used + per_column <= budget]
        if not gains:
            break
        _, index = max(gains)
        keep[index] += 1
        used += flat[index][2]
    iterator = iter(keep)
    return tuple(tuple(next(iterator) for _ in layer) for layer in unit_sizes), high

