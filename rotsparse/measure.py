"""Measurement: what one calibration pass of a calibrated method finds (`Calibration`), for any sparsity.

`calibrate_model` runs the model layer by layer once and keeps only sparsity-independent results (candidate
residual bases, WINA scales, Top-K error curves); `rotsparse.choose` picks bases and K from them for a
requested sparsity and `rotsparse.fold` writes them into the weights, so one calibration serves every sparsity.

``auto`` (the default):
  0. Loss sensitivity (`moments.loss_sensitivity`, 4 calibration sequences): per site linear output,
     the mean squared gradient of the next-token loss (diagonal empirical Fisher), and per token the
     squared gradient norm. An error e_t of token t at a linear's output costs about
     a_t * sum_i (fisher_i / sum(fisher)) * e_ti^2 in loss (a_t that token's gradient energy): tokens whose
     loss barely reacts (e.g. the large-norm rows behind Gemma-3's post-norms) do not dominate the errors.
     Every error below is in these units, comparable across sites and layers (unweighted relative errors
     were not: ``auto-unweighted`` only matched plain Top-K; averaging over tokens before multiplying,
     the previous version, made ``auto`` worse than Top-K on Gemma-3).
  1. Weight-aware selection at zero run-time cost (WINA): every site's input is multiplied by the
     (sqrt(fisher)-weighted) column norms c of the linears reading it, and those linears by diag(1/c);
     Top-K on |x * c| then keeps the channels that move the loss most. The scale lives in the pre-norm
     weight (h1, h3), in v_proj's rows (h2, shared within GQA groups) and in up_proj's rows (h4).
  2. Per-layer residual basis: identity, one model-level basis shared by all layers (``global``: PCA of
     the normalised attention inputs averaged over layers), PCA of the layer's normalised attention
     input with the attention sinks' massive-activation channels left unrotated (``pca_sink``: a full
     PCA spreads them, and Top-K then cuts the sink token that every other token attends to), PCA of
     its norm's output (scale included), or one ``pca_sink`` basis per run of 5 or 10 consecutive layers
     (``run5``, ``run10``: residual rotations only between runs). First the smallest h1 + h3 error at uniform K
     wins; after each allocation, the chain of bases with the smallest error plus price x weights over
     all layers (dynamic programming): a residual rotation (d x d) is paid only where two neighbouring
     layers' bases differ, so identity or global runs of layers cost nothing; output rotations after
     post-norms are paid by every rotated layer.
  3. K per reader linear (q, k, v, o; gate, up, down) per layer minimising the sum of calibrated errors under
     the parameter-weighted budget (Lagrangian on exact error curves; its multiplier is the price per weight
     in 2), unless `site_coefficients` is given; 2 and 3 alternate until the rotation choice is stable. Every
     linear selects its own Top-K of its input anyway, so separate K cost nothing at run time.
  4. Per layer, a rotation of every value head (PCA of the attention outputs that read it), folded into
     v_proj's rows and o_proj's columns: free at run time (attention mixes each head's values linearly),
     so h2's curve in 3 is the smaller of the two at every K, and each layer takes the one better at its K.
  5. Structure check (at `sparsify`, per sparsity): the error proxy misranks residual-basis structures (it
     misses damage to the attention-sink token, rarely among its sampled rows), so 2-4 are run for each
     structure -- all candidates chosen per layer, or one run<G> basis with the identity -- and the
     sparsified model with the lowest real next-token loss on held-out calibration sequences wins.
``larosa``: PCA rotation of the normalised attention input in every layer, fixed site coefficients.
``topk``: magnitude Top-K on the unchanged model, no calibration.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .config import SITES, AutoOptions, SparsifyConfig, run_length
from .families import Family, Layer
from .moments import LossSensitivity, ResidualMoments, SecondMoment, loss_sensitivity, normalized_rows, residual_moments
from .offload import execution_device
from .rotation import (column_scale, expand_head_scale, fold_input, gram_factor, grouped_head_scale,
                       head_block_rotation, head_rotations, pca_rotation, scale_input, sink_preserving_rotation,
                       topk_error_curve)
from .runner import layerwise


@dataclass
class LayerCalibration:
    """Sparsity-independent results for one decoder layer.

    rotations: candidate bases (d, d) float64, None = identity, in `AutoOptions.rotations` order; the same
        tensor object in two layers is one shared basis (no residual rotation between them).
    curves[site]: Top-K output error for K = 0..width of each reader linear (h1: q, k, v; h3: gate, up),
        (readers, width + 1) float64, summing to the site's error; for h1 and h3 one per candidate rotation,
        for h2 one per candidate value rotation, for h4 one.
    scales[site]: WINA scales to fold (`fold_scales`), one per candidate like the curves: h1/h3 (d,), h2 one
        per value channel, h4 one per down_proj input; empty without scaling.
    residual_rotation_weights: weights of a residual rotation (d x d) into this layer's basis from a different one.
    output_rotation_weights: weights a rotated basis adds inside the layer (one d x d output rotation per
        post-norm; 0 without post-norms).
    value_rotations: candidate value-head rotations (kv_heads, head_dim, head_dim) float64, None = identity
        (`head_rotations`; folded by `fold_value_rotation`, free at run time).
    """

    rotations: list[torch.Tensor | None]
    curves: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    residual_rotation_weights: int = 0
    output_rotation_weights: int = 0
    value_rotations: list[torch.Tensor | None] = field(default_factory=lambda: [None])


@dataclass
class Calibration:
    """What one calibration pass of `method` found; reusable for any sparsity on the same dense model."""

    method: str
    options: AutoOptions
    layers: list[LayerCalibration]
    tokens: int
    seconds: float
    error_seconds: float
    """Part of `seconds` spent on rotations and error curves (the rest is running the layers)."""
    check_input_ids: torch.Tensor | None = None
    """(n, seq) calibration sequences held out from all statistics, for `AutoOptions.structure_check`."""

    def structures(self) -> dict[str, AutoOptions]:
        """The residual-basis structures `AutoOptions.structure_check` compares, by label: ``chooser`` (all
        candidates, chosen per layer by the error proxy) and, per "run<G>" candidate, ``run<G>`` (that basis
        or the identity per layer). One entry when there is nothing to compare."""
        runs = [name for name in self.options.rotations if run_length(name)]
        if not runs or not self.options.structure_check or len(self.options.rotations) == 1:
            return {"chooser": self.options}
        identity = ("identity",) if "identity" in self.options.rotations else ()
        return {"chooser": self.options,
                **{name: replace(self.options, rotations=identity + (name,)) for name in runs}}

    def restricted(self, options: AutoOptions) -> Calibration:
        """The same measurements seen with fewer rotation candidates or another allocation (ablations)."""
        if (options.scaling != self.options.scaling or options.loss_weighted != self.options.loss_weighted
                or not set(options.rotations) <= set(self.options.rotations)
                or options.value_rotation > self.options.value_rotation):
            raise ValueError(f"{options} is not a restriction of {self.options}")
        keep = [self.options.rotations.index(name) for name in options.rotations]

        def pick(per_site: dict) -> dict:
            return {site: [values[i] for i in keep] if site in ("h1", "h3") else
                    values if site != "h2" or options.value_rotation else values[:1]
                    for site, values in per_site.items()}

        layers = [LayerCalibration([layer.rotations[i] for i in keep], pick(layer.curves), pick(layer.scales),
                                   layer.residual_rotation_weights, layer.output_rotation_weights,
                                   layer.value_rotations if options.value_rotation else layer.value_rotations[:1])
                  for layer in self.layers]
        return Calibration(self.method, options, layers, self.tokens, self.seconds, self.error_seconds,
                           self.check_input_ids)


@contextlib.contextmanager
def _site_samples(layer: Layer, moments: dict, samples: dict, positions: list):
    """Hooks: second moments of the normalised attention input and, per value head, of the attention outputs
    (o_proj's input; `moments["h2"]`: one `SecondMoment` per value head, all query heads reading it pooled), on
    all real tokens (`positions[1]`); the normalised attention input's row at each sequence's first real token
    (the attention sink, `samples["sink"]`); and, at `positions[0]` (a (1, seq) bool mask of sampled tokens),
    rows of the normalised inputs and of the h2/h4 inputs."""

    def norm_hook(key):
        norm = layer.pre_norm(key)  # None: the site reads the raw residual stream (hooked at its first reader)
        eps = None if norm is None else layer.norm_eps(norm)

        def rows_of(x):
            return x.double() if eps is None else normalized_rows(x, eps)

        def hook(module, args):
            x = args[0]
            if key in moments:
                moments[key].add(rows_of(x[positions[1]]))
                first = positions[1].int().argmax(dim=1)  # each sequence's first real token: its sink
                samples["sink"].append(rows_of(x[torch.arange(x.shape[0], device=x.device), first]))
            samples[key].append(rows_of(x[positions[0]]))

        return hook

    def input_hook(key):
        def hook(module, args):
            if key in moments:
                heads = moments[key]
                rows = args[0][positions[1]]
                grouped = rows.reshape(rows.shape[0], len(heads), -1, heads[0].sum.shape[0])
                for index, moment in enumerate(heads):
                    moment.add(grouped[:, index].reshape(-1, grouped.shape[-1]))
            samples[key].append(args[0][positions[0]].double())

        return hook

    handles = [
        layer.site_input("h1").register_forward_pre_hook(norm_hook("h1")),
        layer.site_input("h3").register_forward_pre_hook(norm_hook("h3")),
        layer.o_proj.register_forward_pre_hook(input_hook("h2")),
        layer.down_proj.register_forward_pre_hook(input_hook("h4")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sample_positions(token_mask: list[torch.Tensor], count: int, seed: int) -> list[torch.Tensor]:
    """(1, seq) bool masks choosing `count` real tokens in all, spread evenly over the sequences. The random
    order comes from a host generator (the same tokens on every device); the masks stay on the masks' device."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.cat([mask.reshape(-1) for mask in token_mask])
    chosen = torch.zeros_like(real)
    indices = real.nonzero().squeeze(1)
    order = torch.randperm(indices.numel(), generator=generator)[:count].to(indices.device)
    chosen[indices[order]] = True
    masks, start = [], 0
    for mask in token_mask:
        masks.append(chosen[start : start + mask.numel()].view_as(mask))
        start += mask.numel()
    return masks


def calibrate_model(model: nn.Module, family: Family, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, config: SparsifyConfig, progress: bool = True,
                    check_input_ids: torch.Tensor | None = None) -> Calibration:
    """One layer-by-layer pass over the calibration tokens (n, seq) with `config.resolved_options`;
    `check_input_ids` (m, seq'), held out from every statistic, are kept for `AutoOptions.structure_check`."""
    options = config.resolved_options
    if options is None:
        raise ValueError(f"method {config.method!r} needs no calibration")
    if not family.spec.calibrated:
        raise NotImplementedError(
            f"model_type={family.model.config.model_type!r}: the calibrated methods (rotations and scales folded "
            f"into the weights) do not support this family (batched mixture-of-experts weights); use "
            f"method='topk'")
    start = time.perf_counter()
    layers, tokens, error_seconds = [], 0, 0.0
    sensitivity = None
    if options.loss_weighted:
        sensitivity = loss_sensitivity(model, family, input_ids, attention_mask, progress)
        for index, per_site in enumerate(sensitivity.fisher):
            for site, values in per_site.items():
                for reader, value in enumerate(values):
                    if not torch.isfinite(torch.as_tensor(value)).all():
                        raise FloatingPointError(f"non-finite values (NaN/Inf) in the loss sensitivity (Fisher) of "
                                                 f"site {site} reader {reader} of decoder layer {index}")
    shared_bases = [{} for _ in family.layers]
    if "global" in options.rotations or any(run_length(name) for name in options.rotations):
        shared_bases = _shared_bases(options.rotations,
                                     residual_moments(model, family, input_ids, attention_mask,
                                                      progress=progress))
    positions = None
    for step in layerwise(model, family, input_ids, attention_mask, progress, stage="statistics and error curves"):
        if positions is None:  # error rows come from sequences whose loss sensitivity was measured
            measured = len(step.token_mask) if sensitivity is None else sensitivity.sequences
            candidates = [mask if row < measured else torch.zeros_like(mask)
                          for row, mask in enumerate(step.token_mask)]
            positions = _sample_positions(candidates, config.error_tokens, config.seed)
        layer = family.layer(step.layer)
        device = execution_device(step.layer)
        moments = {"h1": SecondMoment(family.hidden_size, device)}
        if options.value_rotation:
            heads, kv_heads = layer.attention_heads()
            head_dim = layer.o_proj.in_features // heads
            moments["h2"] = [SecondMoment(head_dim, device) for _ in range(kv_heads)]
        samples = {site: [] for site in (*SITES, "sink")}
        current: list = [None, None]  # (sampled positions, token mask) of the sequence running

        def select(row: int, mask: torch.Tensor) -> None:
            current[:] = [positions[row], mask]

        try:
            with _site_samples(layer, moments, samples, current):
                step.outputs = step.run(before_each=select)
        except FloatingPointError as error:
            raise FloatingPointError(f"decoder layer {step.index}: {error} (second moments)") from error
        tokens = moments["h1"].tokens
        rows = {site: torch.cat(parts).to(device) for site, parts in samples.items()}
        error_start = time.perf_counter()
        value_moments = torch.stack([moment.mean for moment in moments["h2"]]) if "h2" in moments else None
        layers.append(_calibrate_layer(layer, moments["h1"].mean, rows, options,
                                       _layer_sensitivity(sensitivity, step.index, positions),
                                       shared_bases[step.index], value_moments))
        error_seconds += time.perf_counter() - error_start
    return Calibration(config.method, options, layers, tokens, time.perf_counter() - start, error_seconds,
                       check_input_ids)


def _shared_bases(names: tuple[str, ...], statistics: ResidualMoments) -> list[dict[str, torch.Tensor]]:
    """Per layer, the bases shared with other layers, by candidate name: ``global`` (PCA of the mean moment
    over all layers) and each ``run<G>`` (`sink_preserving_rotation` of the summed moments and sink rows of
    the layer's run of G consecutive layers); one tensor object per shared basis."""
    moments, sinks = statistics.moments, statistics.sink_rows
    per_layer = [{} for _ in moments]
    for name in names:
        if name == "global":
            basis = pca_rotation(sum(moments) / len(moments))
            for bases in per_layer:
                bases[name] = basis
        elif run_length(name):
            size = run_length(name)
            for start in range(0, len(moments), size):
                run = range(start, min(start + size, len(moments)))
                basis = sink_preserving_rotation(sum(moments[l] for l in run), torch.cat([sinks[l] for l in run]))
                for layer in run:
                    per_layer[layer][name] = basis
    return per_layer


def _candidate(name: str, attn_moment: torch.Tensor, norm_scale: torch.Tensor,
               shared_bases: dict[str, torch.Tensor], sink_rows: torch.Tensor | None) -> torch.Tensor | None:
    if name == "identity":
        return None
    if name in shared_bases:
        return shared_bases[name]
    if name == "pca_sink":
        return sink_preserving_rotation(attn_moment, sink_rows)
    if name == "pca":
        return pca_rotation(attn_moment)
    if name == "pca_scaled":
        return pca_rotation(norm_scale[:, None] * attn_moment * norm_scale[None, :])
    raise ValueError(f"no basis was computed for rotation candidate {name!r}")


def _layer_sensitivity(sensitivity: LossSensitivity | None, index: int, positions: list[torch.Tensor]):
    """(fisher, token weights) of layer `index`: fisher[site][reader] (out,), and token_weights[site][reader]
    (rows,) the squared gradient norm of every sampled row (`positions`, in sampling order); None unweighted."""
    if sensitivity is None:
        return None
    energy = sensitivity.token_energy[index]
    chosen = [mask[0] for mask in positions[: sensitivity.sequences]]
    token_weights = {site: [torch.cat([per_token[row][mask.to(per_token.device)] for row, mask in enumerate(chosen)])
                            for per_token in readers] for site, readers in energy.items()}
    return sensitivity.fisher[index], token_weights


def _reader_matrix(linear: nn.Module, fisher: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A reader linear's weight (out, in) in float64 on `device`. With `fisher` (out,): rows scaled by
    sqrt(fisher) (output errors in units of loss), and a wide weight (out > in, e.g. gate/up) replaced by its
    (in, in) `gram_factor`, which has the same Top-K errors, column norms and folds from the right in less
    memory. (Without it the rows stay: unweighted scaling scales the producer's rows.)"""
    weight = linear.weight.detach().to(device=device, dtype=torch.float64, copy=True)
    if fisher is None:
        return weight
    weight.mul_(fisher.to(device).sqrt()[:, None])  # in place: one float64 copy of the weight at a time
    return gram_factor(weight) if weight.shape[0] > weight.shape[1] else weight


@torch.no_grad()
def _calibrate_layer(layer: Layer, attn_moment: torch.Tensor, rows: dict[str, torch.Tensor],
                     options: AutoOptions, sensitivity: tuple[dict, dict] | None,
                     shared_bases: dict[str, torch.Tensor] | None = None,
                     value_moments: torch.Tensor | None = None) -> LayerCalibration:
    """Candidate rotations, and per site the error curves (and WINA scales) of Top-K on the sampled `rows`.

    rows: sampled rows (n, width) per site, and under "sink" each calibration sequence's first-token row of the
        normalised attention input (for ``pca_sink``).
    shared_bases: candidates shared with other layers by name (``global``, ``run<G>``; `_shared_bases`).
    value_moments: (kv_heads, head_dim, head_dim) second moments of the attention outputs per value head, for
        the value-rotation candidate (`AutoOptions.value_rotation`).

    With `sensitivity` (`_layer_sensitivity`: loss-weighted), every reader's output rows are weighted by
    sqrt(fisher) for the WINA column norms; errors are absolute, in units of loss, each row's error at
    reader r weighted per token (its gradient energy) and per output (fisher_r / sum(fisher_r)).
    Otherwise errors are relative.
    """
    device = attn_moment.device

    def input_scale(site: str) -> torch.Tensor:  # the pre-norm's scale (ones without a pre-norm)
        norm = layer.pre_norm(site)
        if norm is None:
            return torch.ones(attn_moment.shape[0], dtype=torch.float64, device=device)
        return layer.norm_scale(norm).to(device=device, dtype=torch.float64)

    attn_scale = input_scale("h1")
    rotations = [_candidate(name, attn_moment, attn_scale, shared_bases or {}, rows.get("sink"))
                 for name in options.rotations]
    post_norms = sum(norm is not None for norm in (layer.attn_output_norm, layer.mlp_output_norm))
    rotation_cost = {"residual_rotation_weights": attn_moment.shape[0] ** 2,
                     "output_rotation_weights": attn_moment.shape[0] ** 2 * post_norms}
    heads, kv_heads = layer.attention_heads()
    value_rotations = [None] if value_moments is None else [None, head_rotations(value_moments)]
    if options.allocation != "error" and len(rotations) == 1 and not options.scaling and value_moments is None:
        return LayerCalibration(rotations, **rotation_cost, value_rotations=value_rotations)
    fisher, token_weights = (None, None) if sensitivity is None else sensitivity
    weights = {site: [_reader_matrix(linear, None if fisher is None else fisher[site][i], device)
                      for i, linear in enumerate(linears)]
               for site, linears in layer.site_modules().items()}

    def curve(site: str, inputs: torch.Tensor, readers: list[torch.Tensor]) -> torch.Tensor:
        """(readers, width + 1): each reader's error; their sum is the site's error."""
        tiny = torch.finfo(torch.float64).tiny
        if sensitivity is None:  # relative to the site's whole output: the readers' errors still add up
            errors = torch.stack([topk_error_curve(inputs, reader, relative=False) for reader in readers])
            return errors / errors[:, 0].sum().clamp_min(tiny)
        return torch.stack([topk_error_curve(inputs * (token_weights[site][i] / fisher[site][i].sum().clamp_min(tiny))
                                             .sqrt()[:, None], reader, relative=False)
                            for i, reader in enumerate(readers)])

    curves = {site: [] for site in SITES}
    scales = {site: [] for site in SITES} if options.scaling else {}
    site_candidates = (("h2", "h1", value_rotations), ("h4", "h3", [None]))
    for site, producer_site, candidates in site_candidates:
        for rotation in candidates:
            weight, inputs = weights[site][0], rows[site]
            if rotation is not None:
                block = head_block_rotation(rotation, heads)
                weight, inputs = fold_input(weight, None, block), inputs @ block
            if options.scaling:
                scale = column_scale([weight])
                if site == "h2":
                    scales[site].append(grouped_head_scale(scale, heads, kv_heads))
                    scale = expand_head_scale(scales[site][-1], heads, kv_heads)
                else:
                    scales[site].append(scale)
                weight, inputs = scale_input(weight, scale), inputs * scale
                if sensitivity is None:  # the readers of h1/h3 as `fold_scales` leaves them: producer rows scaled
                    readers = weights[producer_site]  # (only one candidate here: `AutoOptions` checks)
                    index, produced = layer.producer(site)
                    readers[index] = readers[index].clone()
                    readers[index][produced] *= scales[site][0][:, None]
            curves[site].append(curve(site, inputs, [weight]))
    for site in ("h1", "h3"):
        norm_scale = input_scale(site)
        for rotation in rotations:
            readers = [fold_input(weight, norm_scale, rotation) for weight in weights[site]]
            inputs = rows[site] if rotation is None else rows[site] @ rotation
            if options.scaling:  # without a pre-norm there is nowhere to fold a scale (`fold_scales`): ones
                scale = column_scale(readers) if layer.pre_norm(site) is not None else torch.ones_like(norm_scale)
                scales[site].append(scale)
                inputs, readers = inputs * scale, [scale_input(w, scale) for w in readers]
            curves[site].append(curve(site, inputs, readers))
    return LayerCalibration(rotations, curves, scales, **rotation_cost, value_rotations=value_rotations)
