"""Choosing, for one sparsity: per layer the residual basis (a shortest path over the chain of layers) and the
value-head rotation, and K per reader linear (the budget of `rotsparse.budget`), from a `Calibration`.
"""

from __future__ import annotations

import statistics

import torch

from .budget import allocate_by_error, allocate_keep_k, weights_kept
from .config import AutoOptions, SparsifyConfig
from .measure import Calibration, LayerCalibration
from .plan import site_sizes_from_readers


ReaderKeepK = tuple[tuple[tuple[int, ...], ...], ...]
"""K per reader linear per site per layer, keep_k[l][s][r] (`SparsityPlan.reader_keep_k`)."""


def choose(calibration: Calibration, reader_sizes, sparsity: float, coefficients,
           rounds: int = 3) -> tuple[list[int], ReaderKeepK]:
    """Per layer, the candidate rotation index; and K per reader linear per site per layer.

    reader_sizes[l][s][r]: (input width, parameters) of reader linear r of site s (`plan.reader_sizes_of`).
    First each layer takes the rotation with the smallest h1 + h3 error at uniform K. With error allocation,
    K is then allocated for the chosen rotations at a price per kept weight -- one K per reader linear with
    `AutoOptions.per_reader`, else one per site -- and the rotations are re-chosen for the whole chain of
    layers (`_choose_rotations`) at that price; the two steps repeat (at most `rounds` times) until stable.
    """
    keep_k = _expand(allocate_keep_k([site_sizes_from_readers(layer) for layer in reader_sizes], sparsity,
                                     coefficients), reader_sizes)
    layers = calibration.layers
    options = calibration.options
    choice, price = [0] * len(layers), None
    for round_index in range(rounds):
        previous = choice
        choice = _choose_rotations(layers, keep_k, reader_sizes, price, options)
        if options.allocation == "uniform" or (round_index > 0 and choice == previous):
            break
        curves = [[layer.curves["h1"][index], _value_curve(layer), layer.curves["h3"][index], layer.curves["h4"][0]]
                  for layer, index in zip(layers, choice)]
        allocate = _allocate_per_layer if options.allocation == "layer" else _allocate
        keep_k, price = allocate(curves, reader_sizes, sparsity, options.per_reader)
    return choice, keep_k


def _expand(site_keep_k, reader_sizes) -> ReaderKeepK:
    """K per site per layer as K per reader linear: every reader of a site keeps the site's K."""
    return tuple(tuple((int(k),) * len(readers) for k, readers in zip(layer_k, layer))
                 for layer_k, layer in zip(site_keep_k, reader_sizes))


def _units(curves: torch.Tensor, sizes, per_reader: bool) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """One site's allocation units, (error curve (width + 1,), (width, parameters)): each reader linear
    (`curves` (readers, width + 1), `sizes` per reader), or the whole site (summed) unless `per_reader`."""
    if per_reader:
        return list(zip(curves, sizes))
    return [(curves.sum(0), (sizes[0][0], sum(params for _, params in sizes)))]


def _allocate(curves, reader_sizes, sparsity: float, per_reader: bool) -> tuple[ReaderKeepK, float]:
    """`allocate_by_error` over the units (`_units`) of every site (`curves[l][s]`: (readers, width + 1)), as K
    per reader linear; and the price per kept weight."""
    units = [[unit for site_curves, sizes in zip(layer_curves, layer_sizes)
              for unit in _units(site_curves, sizes, per_reader)]
             for layer_curves, layer_sizes in zip(curves, reader_sizes)]
    unit_k, price = allocate_by_error([[curve for curve, _ in layer] for layer in units],
                                      [[size for _, size in layer] for layer in units], sparsity)
    keep_k = []
    for layer_k, layer_sizes in zip(unit_k, reader_sizes):
        remaining = iter(layer_k)
        keep_k.append(tuple(tuple(next(remaining) for _ in sizes) if per_reader else (next(remaining),) * len(sizes)
                            for sizes in layer_sizes))
    return tuple(keep_k), price


def _allocate_per_layer(curves, reader_sizes, sparsity: float, per_reader: bool) -> tuple[ReaderKeepK, float]:
    """`_allocate` within each layer, every layer at `sparsity` (TEAL's budget: the same sparsity in every layer,
    spread over a layer's linears by their errors); the price is the median of the layers' prices."""
    parts = [_allocate([layer_curves], [layer_sizes], sparsity, per_reader)
             for layer_curves, layer_sizes in zip(curves, reader_sizes)]
    return tuple(layer_k for keep_k, _ in parts for layer_k in keep_k), statistics.median(p for _, p in parts)


def _value_curve(layer: LayerCalibration) -> torch.Tensor:
    """The h2 error (1, width + 1) at every K with the better value rotation there: they are free, so each K
    takes its best."""
    return torch.stack(layer.curves["h2"]).min(0).values


def choose_value_rotations(layers: list[LayerCalibration], keep_k: ReaderKeepK) -> list[int]:
    """Per layer, the value-rotation candidate with the smallest h2 error at the layer's o_proj K
    (`keep_k[l][1][0]`)."""
    return [min(range(len(layer.curves["h2"])), key=lambda c: float(layer.curves["h2"][c][0][layer_k[1][0]]))
            if layer.curves else 0 for layer, layer_k in zip(layers, keep_k)]


def _choose_rotations(layers: list[LayerCalibration], keep_k: ReaderKeepK, reader_sizes, price: float | None,
                      options: AutoOptions) -> list[int]:
    """Candidate rotation index per layer minimising the summed h1 + h3 errors (plus weights x price).

    Without a price: each layer's smallest error at `keep_k`. With a price: each candidate's error with every
    allocation unit (`_units`: reader linear or site) at its own best K for that price per kept weight; with
    `options.charge_rotations` also the weights rotations add at run time: a layer's output rotations if
    rotated, and a residual rotation between neighbouring layers whose bases differ (different tensor objects;
    None = identity). A shortest path over the chain of layers.
    """
    charge = options.charge_rotations

    def error(layer: LayerCalibration, index: int, layer_k, sizes) -> float:
        if price is None:
            return sum(float(curve[k]) for site, position in (("h1", 0), ("h3", 2))
                       for curve, k in zip(layer.curves[site][index], layer_k[position]))
        total = sum(float((curve + price * weights_kept(*size)).min())
                    for site, position in (("h1", 0), ("h3", 2))
                    for curve, size in _units(layer.curves[site][index], sizes[position], options.per_reader))
        if charge and layer.rotations[index] is not None:
            total += price * layer.output_rotation_weights
        return total

    costs = [[error(layer, index, layer_k, sizes) if len(layer.rotations) > 1 else 0.0
              for index in range(len(layer.rotations))]
             for layer, layer_k, sizes in zip(layers, keep_k, reader_sizes)]
    if price is None or not charge:
        return [min(range(len(layer_costs)), key=layer_costs.__getitem__) for layer_costs in costs]
    best, back = list(costs[0]), []  # best[c]: cheapest chain ending in candidate c of the current layer
    for previous_layer, layer, layer_costs in zip(layers, layers[1:], costs[1:]):
        switch = price * layer.residual_rotation_weights
        steps = [min(((best[p] + (0.0 if previous_layer.rotations[p] is layer.rotations[c] else switch), p)
                      for p in range(len(best))), key=lambda pair: pair[0]) for c in range(len(layer_costs))]
        back.append([p for _, p in steps])
        best = [total + cost for (total, _), cost in zip(steps, layer_costs)]
    choice = [min(range(len(best)), key=best.__getitem__)]
    for pointers in reversed(back):
        choice.append(pointers[choice[-1]])
    return choice[::-1]




def planned(calibration: Calibration, config: SparsifyConfig, reader_sizes) -> tuple[list[int], ReaderKeepK]:
    """What `apply` will fold for `config.sparsity` (K for `config.topk_sparsity`): per layer the candidate
    rotation index, and K per reader linear per site per layer (explicit `config.site_coefficients` override the
    error allocation: one K per site)."""
    choice, keep_k = choose(calibration, reader_sizes, config.topk_sparsity, config.coefficients)
    if config.site_coefficients is not None and calibration.options.allocation == "error":
        site_sizes = [site_sizes_from_readers(layer) for layer in reader_sizes]
        keep_k = _expand(allocate_keep_k(site_sizes, config.topk_sparsity, config.coefficients), reader_sizes)
    return choice, keep_k
