"""Methods: what one calibration pass measures, and how a plan is built from it for any sparsity.

``calibrate`` runs the model layer by layer once and keeps only sparsity-independent results (candidate
rotations, Top-K error curves); ``apply`` turns them into folded weights and a `SparsityPlan` for a
requested sparsity, so one calibration serves every sparsity.

``auto`` (the default):
  0. Loss sensitivity (`calibration.loss_sensitivity`, 4 calibration sequences): per site linear output,
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
  2. Per-layer residual basis (opt-in, `IN_DOMAIN_ROTATIONS`; the default keeps the identity, because PCA
     bases fitted to the calibration text raise the Top-K gap on other text): identity, one model-level
     basis shared by all layers (``global``: PCA of the normalised attention inputs averaged over
     layers), PCA of the layer's normalised attention
     input with the attention sinks' massive-activation channels left unrotated (``pca_sink``: a full
     PCA spreads them, and Top-K then cuts the sink token that every other token attends to), PCA of
     its norm's output (scale included), or one ``pca_sink`` basis per run of 5 or 10 consecutive layers
     (``run5``, ``run10``: adapters only between runs). First the smallest h1 + h3 error at uniform K
     wins; after each allocation, the chain of bases with the smallest error plus price x weights over
     all layers (dynamic programming): a residual adapter (d x d) is paid only where two neighbouring
     layers' bases differ, so identity or global runs of layers cost nothing; output rotations after
     post-norms are paid by every rotated layer.
  3. K per reader linear (q, k, v, o; gate, up, down) per layer minimising the sum of calibrated errors under
     the parameter-weighted budget (Lagrangian on exact error curves; its multiplier is the price per weight
     in 2), unless `site_coefficients` is given; 2 and 3 alternate until the rotation choice is stable. Every
     linear selects its own Top-K of its input anyway, so separate K cost nothing at run time.
  4. Per layer, a rotation of every value head (PCA of the attention outputs that read it), folded into
     v_proj's rows and o_proj's columns: free at run time (attention mixes each head's values linearly),
     so h2's curve in 3 is the smaller of the two at every K, and each layer takes the one better at its K.
  5. Structure check (at `sparsify`, per sparsity; only with "run<G>" candidates): the error proxy
     misranks residual-basis structures (it misses damage to the attention-sink token, rarely among its
     sampled rows), so 2-4 are run for each
     structure -- all candidates chosen per layer, or one run<G> basis with the identity -- and the
     sparsified model with the lowest real next-token loss on held-out calibration sequences wins.
``larosa``: PCA rotation of the normalised attention input in every layer, fixed site coefficients.
``topk``: magnitude Top-K on the unchanged model, no calibration.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .adapters import LayerAdapter, ModelAdapter
from .calibration import (LossSensitivity, ResidualMoments, SecondMoment, layerwise, loss_sensitivity,
                          normalized_rows, residual_moments)
from .config import SITES, SparsifyConfig
from .offload import materialized
from .rotation import (
    column_scale,
    expand_head_scale,
    fold_input,
    grouped_head_scale,
    head_block_rotation,
    head_rotations,
    pca_rotation,
    residual_adapter,
    rotate_embedding,
    rotate_output,
    scale_input,
    scale_output,
    sink_preserving_rotation,
    topk_error_curve,
)
from .topk import allocate_keep_k, attach_output_rotation, site_sizes_from_readers

CALIBRATED_METHODS = ("auto", "larosa")
ROTATION_CANDIDATES = ("identity", "global", "pca", "pca_sink", "pca_scaled", "run<G>")
"""Residual-basis candidates (`AutoOptions.rotations`); "run<G>" stands for any run length G >= 2, e.g. "run5"."""
IN_DOMAIN_ROTATIONS = ("identity", "global", "pca_sink", "pca_scaled", "run5", "run10")
"""Residual-basis candidates for text like the calibration text (``AutoOptions(rotations=IN_DOMAIN_ROTATIONS)``,
the default before): they lower the Top-K gap on held-out text of the calibration domain but raise it on other
text, often above plain Top-K's (PCA bases fitted to one kind of text; docs/quality.md). The default offers the
identity only."""


def run_length(name: str) -> int | None:
    """G of a "run<G>" candidate name (one basis per run of G consecutive layers), else None."""
    match = re.fullmatch(r"run(\d+)", name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class AutoOptions:
    """Switches of the ``auto`` pipeline (the defaults are ``auto``; the others exist for ablations).

    rotations: candidate residual bases per layer, from `ROTATION_CANDIDATES` (default: the identity only,
        the one choice that does not depend on the calibration text; `IN_DOMAIN_ROTATIONS` offers them all):
        "identity", "global" (one basis for every layer: PCA of the normalised attention inputs averaged over
        layers), "pca" (the layer's
        normalised attention input), "pca_sink" (the same, leaving the few channels that hold the attention
        sinks' massive activations unrotated: `sink_preserving_rotation`), "pca_scaled" (the attention norm's
        output), "run<G>" (one basis per run of G consecutive layers: `pca_sink` of the run's summed moments,
        so residual adapters sit only between runs). scaling: fold WINA column-norm scales.
    allocation: "error" (per-layer per-site from error curves) or "uniform" (the config's coefficients).
    charge_rotations: with error allocation, rotations pay for the weights they add at run time (residual
        adapters where neighbouring bases differ, output rotations) at the allocation's price per kept weight.
    loss_weighted: weigh every linear output by its loss sensitivity (`loss_sensitivity`), in the WINA scales
        and in the errors, which are then absolute (comparable across sites and layers); else relative.
    value_rotation: offer, per layer, a rotation of every value head (PCA of its attention outputs) folded into
        v_proj's rows and o_proj's columns: free at run time; taken where its h2 error at the allocated K is
        lower. Needs loss-weighted errors when scaling (relative h1 errors would depend on that choice).
    per_reader: with error allocation, one K per reader linear (q, k, v; gate, up: each selects its own Top-K
        of the shared input, free at run time) instead of one per site.
    structure_check: with "run<G>" candidates, choose the residual-basis structure -- per layer among all
        candidates by the error proxy, or each run<G> basis with the identity alone -- by the real next-token
        loss of each sparsified candidate model on calibration sequences held out from calibration
        (`Calibration.structures`; `SparsifyConfig.check_sequences`). The proxy alone misranks them: it
        misses damage to the attention-sink token.
    allocation_shrinkage: with error allocation, s in [0, 1]: every reader's K becomes (1 - s) x its
        error-allocated K + s x the uniform K of its site (`SparsifyConfig.coefficients`), rounded; both meet
        the parameter budget, so the blend does too (up to rounding). Shrinks per-layer choices that follow
        the calibration text's statistics toward a choice that does not depend on it (an ablation: it lost in
        domain and gained nothing out of domain, docs/quality.md).
    """

    rotations: tuple[str, ...] = ("identity",)
    scaling: bool = True
    allocation: str = "error"
    loss_weighted: bool = True
    charge_rotations: bool = True
    value_rotation: bool = True
    per_reader: bool = True
    structure_check: bool = True
    allocation_shrinkage: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.allocation_shrinkage <= 1.0:
            raise ValueError(f"allocation_shrinkage must be in [0, 1], got {self.allocation_shrinkage}")
        unknown = [name for name in self.rotations
                   if name not in ROTATION_CANDIDATES[:-1] and (run_length(name) or 0) < 2]
        if unknown or not self.rotations or len(set(self.rotations)) != len(self.rotations):
            raise ValueError(f"rotation candidates must be distinct names from {ROTATION_CANDIDATES} (G >= 2), got "
                             f"{self.rotations}")
        if self.value_rotation and self.scaling and not self.loss_weighted:
            raise ValueError("value_rotation with scaling needs loss_weighted=True (or pass value_rotation=False)")


@dataclass
class LayerCalibration:
    """Sparsity-independent results for one decoder layer.

    rotations: candidate bases (d, d) float64, None = identity, in `AutoOptions.rotations` order; the same
        tensor object in two layers is one shared basis (no residual adapter between them).
    curves[site]: Top-K output error for K = 0..width of each reader linear (h1: q, k, v; h3: gate, up),
        (readers, width + 1) float64, summing to the site's error; for h1 and h3 one per candidate rotation,
        for h2 one per candidate value rotation, for h4 one.
    scales[site]: WINA scales to fold (`fold_scales`), one per candidate like the curves: h1/h3 (d,), h2 one
        per value channel, h4 one per down_proj input; empty without scaling.
    adapter_weights: weights of a residual adapter (d x d) into this layer's basis from a different one.
    output_rotation_weights: weights a rotated basis adds inside the layer (one d x d output rotation per
        post-norm; 0 without post-norms).
    value_rotations: candidate value-head rotations (kv_heads, head_dim, head_dim) float64, None = identity
        (`head_rotations`; folded by `fold_value_rotation`, free at run time).
    """

    rotations: list[torch.Tensor | None]
    curves: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    adapter_weights: int = 0
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
                                   layer.adapter_weights, layer.output_rotation_weights,
                                   layer.value_rotations if options.value_rotation else layer.value_rotations[:1])
                  for layer in self.layers]
        return Calibration(self.method, options, layers, self.tokens, self.seconds, self.error_seconds,
                           self.check_input_ids)


# calibration ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _site_samples(layer_adapter: LayerAdapter, moments: dict, samples: dict, positions: list):
    """Hooks: second moments of the normalised attention input and, per value head, of the attention outputs
    (o_proj's input; `moments["h2"]`: one `SecondMoment` per value head, all query heads reading it pooled), on
    all real tokens (`positions[1]`); the normalised attention input's row at each sequence's first real token
    (the attention sink, `samples["sink"]`); and, at `positions[0]` (a (1, seq) bool mask of sampled tokens),
    rows of the normalised inputs and of the h2/h4 inputs."""

    def norm_hook(key, norm):
        eps = layer_adapter.norm_eps(norm)

        def hook(module, args):
            x = args[0]
            if key in moments:
                moments[key].add(normalized_rows(x[positions[1]], eps))
                first = positions[1].int().argmax(dim=1)  # each sequence's first real token: its sink
                samples["sink"].append(normalized_rows(x[torch.arange(x.shape[0], device=x.device), first], eps))
            samples[key].append(normalized_rows(x[positions[0]], eps))

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
        layer_adapter.attn_input_norm.register_forward_pre_hook(norm_hook("h1", layer_adapter.attn_input_norm)),
        layer_adapter.mlp_input_norm.register_forward_pre_hook(norm_hook("h3", layer_adapter.mlp_input_norm)),
        layer_adapter.o_proj.register_forward_pre_hook(input_hook("h2")),
        layer_adapter.down_proj.register_forward_pre_hook(input_hook("h4")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sample_positions(token_mask: list[torch.Tensor], count: int, seed: int) -> list[torch.Tensor]:
    """(1, seq) bool masks choosing `count` real tokens in all, spread evenly over the sequences."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.cat([mask.reshape(-1).cpu() for mask in token_mask])
    chosen = torch.zeros_like(real)
    indices = real.nonzero().squeeze(1)
    chosen[indices[torch.randperm(indices.numel(), generator=generator)[:count]]] = True
    masks, start = [], 0
    for mask in token_mask:
        masks.append(chosen[start : start + mask.numel()].view_as(mask).to(mask.device))
        start += mask.numel()
    return masks


def calibrate(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None, config: SparsifyConfig,
              options: AutoOptions | None = None, progress: bool = True,
              check_input_ids: torch.Tensor | None = None) -> Calibration:
    """One layer-by-layer pass over the calibration tokens (n, seq) for `config.method`; `check_input_ids`
    (m, seq'), held out from every statistic, are kept for `AutoOptions.structure_check`."""
    if config.method not in CALIBRATED_METHODS:
        raise ValueError(f"method {config.method!r} needs no calibration")
    options = options or AutoOptions()
    if config.method == "larosa":
        options = AutoOptions(rotations=("pca",), scaling=False, allocation="uniform", loss_weighted=False,
                              value_rotation=False)
    start = time.perf_counter()
    layers, tokens, error_seconds = [], 0, 0.0
    sensitivity = None
    if options.loss_weighted:
        sensitivity = loss_sensitivity(model, adapter, input_ids, attention_mask, progress)
    shared_bases = [{} for _ in adapter.layers]
    if "global" in options.rotations or any(run_length(name) for name in options.rotations):
        shared_bases = _shared_bases(options.rotations,
                                     residual_moments(model, adapter, input_ids, attention_mask))
    positions = None
    for step in layerwise(model, adapter, input_ids, attention_mask, progress):
        if positions is None:  # error rows come from sequences whose loss sensitivity was measured
            measured = len(step.token_mask) if sensitivity is None else sensitivity.sequences
            candidates = [mask if row < measured else torch.zeros_like(mask)
                          for row, mask in enumerate(step.token_mask)]
            positions = _sample_positions(candidates, config.error_tokens, config.seed)
        layer_adapter = adapter.layer_adapter_class(step.layer)
        width = layer_adapter.attn_input_norm.weight.shape[-1]
        moments = {"h1": SecondMoment(width)}
        if options.value_rotation:
            heads, kv_heads = _attention_heads(layer_adapter)
            head_dim = layer_adapter.o_proj.in_features // heads
            moments["h2"] = [SecondMoment(head_dim) for _ in range(kv_heads)]
        samples = {site: [] for site in (*SITES, "sink")}
        outputs = []
        current: list = [None, None]
        with _site_samples(layer_adapter, moments, samples, current), torch.no_grad():
            for hidden, kwargs, mask, sampled in zip(step.hidden, step.kwargs, step.token_mask, positions):
                current[:] = [sampled, mask]
                output = step.layer(hidden, **kwargs)
                outputs.append(output[0] if isinstance(output, tuple) else output)
        step.outputs = outputs
        tokens = moments["h1"].tokens
        rows = {site: torch.cat(parts).cpu() for site, parts in samples.items()}
        error_start = time.perf_counter()
        value_moments = torch.stack([moment.mean for moment in moments["h2"]]) if "h2" in moments else None
        layers.append(_calibrate_layer(layer_adapter, moments["h1"].mean, rows, options,
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
    chosen = [mask[0].cpu() for mask in positions[: sensitivity.sequences]]
    token_weights = {site: [torch.cat([per_token[row][mask] for row, mask in enumerate(chosen)])
                            for per_token in readers] for site, readers in energy.items()}
    return sensitivity.fisher[index], token_weights


@torch.no_grad()
def _calibrate_layer(layer_adapter: LayerAdapter, attn_moment: torch.Tensor, rows: dict[str, torch.Tensor],
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
    attn_scale = layer_adapter.norm_scale(layer_adapter.attn_input_norm).double().cpu()
    rotations = [_candidate(name, attn_moment, attn_scale, shared_bases or {}, rows.get("sink"))
                 for name in options.rotations]
    post_norms = sum(norm is not None for norm in (layer_adapter.attn_output_norm, layer_adapter.mlp_output_norm))
    rotation_cost = {"adapter_weights": attn_moment.shape[0] ** 2,
                     "output_rotation_weights": attn_moment.shape[0] ** 2 * post_norms}
    heads, kv_heads = _attention_heads(layer_adapter)
    value_rotations = [None] if value_moments is None else [None, head_rotations(value_moments)]
    if options.allocation != "error" and len(rotations) == 1 and not options.scaling and value_moments is None:
        return LayerCalibration(rotations, **rotation_cost, value_rotations=value_rotations)
    weights = {site: [linear.weight.detach().double().cpu() for linear in linears]
               for site, linears in layer_adapter.site_modules().items()}
    if sensitivity is not None:  # rows scaled by sqrt(fisher): output errors in units of loss
        fisher, token_weights = sensitivity
        weights = {site: [fisher[site][i].sqrt()[:, None] * weight for i, weight in enumerate(site_weights)]
                   for site, site_weights in weights.items()}

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
    site_candidates = (("h2", "h1", 2, value_rotations), ("h4", "h3", 1, [None]))
    for site, producer_site, producer_index, candidates in site_candidates:
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
                    readers[producer_index] = readers[producer_index] * scales[site][0][:, None]
            curves[site].append(curve(site, inputs, [weight]))
    for site, norm in (("h1", layer_adapter.attn_input_norm), ("h3", layer_adapter.mlp_input_norm)):
        norm_scale = layer_adapter.norm_scale(norm).double().cpu()
        for rotation in rotations:
            readers = [fold_input(weight, norm_scale, rotation) for weight in weights[site]]
            inputs = rows[site] if rotation is None else rows[site] @ rotation
            if options.scaling:
                scale = column_scale(readers)
                scales[site].append(scale)
                inputs, readers = inputs * scale, [scale_input(w, scale) for w in readers]
            curves[site].append(curve(site, inputs, readers))
    return LayerCalibration(rotations, curves, scales, **rotation_cost, value_rotations=value_rotations)


def _attention_heads(layer_adapter: LayerAdapter) -> tuple[int, int]:
    attn = layer_adapter.layer.self_attn
    head_dim = attn.head_dim
    return attn.q_proj.out_features // head_dim, attn.v_proj.out_features // head_dim


# plan --------------------------------------------------------------------------------------------

ReaderKeepK = tuple[tuple[tuple[int, ...], ...], ...]
"""K per reader linear per site per layer, keep_k[l][s][r] (`SparsityPlan.reader_keep_k`)."""


def choose(calibration: Calibration, reader_sizes, sparsity: float, coefficients,
           rounds: int = 3) -> tuple[list[int], ReaderKeepK]:
    """Per layer, the candidate rotation index; and K per reader linear per site per layer.

    reader_sizes[l][s][r]: (input width, parameters) of reader linear r of site s (`topk.reader_sizes_of`).
    First each layer takes the rotation with the smallest h1 + h3 error at uniform K. With error allocation,
    K is then allocated for the chosen rotations at a price per kept weight -- one K per reader linear with
    `AutoOptions.per_reader`, else one per site -- and the rotations are re-chosen for the whole chain of
    layers (`_choose_rotations`) at that price; the two steps repeat (at most `rounds` times) until stable.
    """
    uniform = keep_k = _expand(allocate_keep_k([site_sizes_from_readers(layer) for layer in reader_sizes], sparsity,
                                               coefficients), reader_sizes)
    layers = calibration.layers
    options = calibration.options
    choice, price = [0] * len(layers), None
    for round_index in range(rounds):
        previous = choice
        choice = _choose_rotations(layers, keep_k, reader_sizes, price, options)
        if options.allocation != "error" or (round_index > 0 and choice == previous):
            break
        curves = [[layer.curves["h1"][index], _value_curve(layer), layer.curves["h3"][index], layer.curves["h4"][0]]
                  for layer, index in zip(layers, choice)]
        keep_k, price = _allocate(curves, reader_sizes, sparsity, options.per_reader)
        keep_k = _shrink(keep_k, uniform, options.allocation_shrinkage)
    return choice, keep_k


def _shrink(keep_k: ReaderKeepK, uniform: ReaderKeepK, shrinkage: float) -> ReaderKeepK:
    """K per reader blended toward the uniform K: round((1 - shrinkage) * K + shrinkage * K_uniform)."""
    if shrinkage == 0:
        return keep_k
    return tuple(tuple(tuple(int(round((1 - shrinkage) * k + shrinkage * u)) for k, u in zip(site_k, site_u))
                       for site_k, site_u in zip(layer_k, layer_u)) for layer_k, layer_u in zip(keep_k, uniform))


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
    rotated, and a residual adapter between neighbouring layers whose bases differ (different tensor objects;
    None = identity). A shortest path over the chain of layers.
    """
    charge = options.charge_rotations

    def error(layer: LayerCalibration, index: int, layer_k, sizes) -> float:
        if price is None:
            return sum(float(curve[k]) for site, position in (("h1", 0), ("h3", 2))
                       for curve, k in zip(layer.curves[site][index], layer_k[position]))
        total = sum(float((curve + price * _weights_kept(*size)).min())
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
        adapter = price * layer.adapter_weights
        steps = [min(((best[p] + (0.0 if previous_layer.rotations[p] is layer.rotations[c] else adapter), p)
                      for p in range(len(best))), key=lambda pair: pair[0]) for c in range(len(layer_costs))]
        back.append([p for _, p in steps])
        best = [total + cost for (total, _), cost in zip(steps, layer_costs)]
    choice = [min(range(len(best)), key=best.__getitem__)]
    for pointers in reversed(back):
        choice.append(pointers[choice[-1]])
    return choice[::-1]


def _weights_kept(width: int, params: int) -> torch.Tensor:
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
        return tuple(tuple(width for width, _ in layer) for layer in unit_sizes), 0.0
    flat = [(curve, width, params / width, _weights_kept(width, params))
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


# weight surgery ----------------------------------------------------------------------------------

@torch.no_grad()
def fold_rotations(adapter: ModelAdapter, rotations: list[torch.Tensor | None]) -> None:
    """Fold per-layer rotations Q_l (d, d; None = identity) and the pre-norm scales into the weights.

    Embeddings -> E Q_0; q/k/v and gate/up -> W diag(g) Q_l; o_proj/down_proj outputs -> Q_l^T W (or, after
    a post-norm, an output rotation on that norm); adapters Q_l^T Q_{l+1} between layers whose bases
    differ (the same tensor object, or None twice, is one basis: no adapter); lm_head -> W Q_last
    (diag(g_final) folded only when rotated). Exact; float64, cast back once.
    """
    layer_adapters = adapter.layer_adapters()
    if len(rotations) != len(layer_adapters):
        raise ValueError(f"{len(rotations)} rotations for {len(layer_adapters)} layers")
    with materialized(adapter.embed_tokens, adapter.lm_head):  # offloaded (accelerate) modules: one at a time
        if rotations[0] is not None or rotations[-1] is not None:
            adapter.untie_embeddings()
        embed = adapter.embed_tokens
        if rotations[0] is not None:
            embed.weight.copy_(rotate_embedding(embed.weight, rotations[0].to(embed.weight.device)))
    identity = torch.eye(adapter.hidden_size, dtype=torch.float64)
    for index, (layer_adapter, rotation) in enumerate(zip(layer_adapters, rotations)):
        with materialized(layer_adapter.layer):
            _fold_layer(layer_adapter, rotation)
            following = rotations[index + 1] if index + 1 < len(rotations) else None
            if index + 1 < len(rotations) and rotation is not following:
                weight = layer_adapter.attn_input_norm.weight
                matrix = residual_adapter(identity if rotation is None else rotation,
                                          identity if following is None else following)
                attach_output_rotation(layer_adapter.layer, matrix.to(device=weight.device, dtype=weight.dtype))
    if rotations[-1] is not None:
        head, final_norm = adapter.lm_head, adapter.final_norm
        with materialized(head, final_norm):
            scale = adapter.layer_adapter_class.norm_scale(final_norm)
            head.weight.copy_(fold_input(head.weight, scale, rotations[-1].to(head.weight.device)))
            adapter.layer_adapter_class.set_unit_norm(final_norm)


def _fold_layer(layer_adapter: LayerAdapter, rotation: torch.Tensor | None) -> None:
    for norm, linears in ((layer_adapter.attn_input_norm, layer_adapter.qkv),
                          (layer_adapter.mlp_input_norm, layer_adapter.gate_up)):
        scale = layer_adapter.norm_scale(norm)
        for linear in linears:
            linear.weight.copy_(fold_input(linear.weight, scale.to(linear.weight.device),
                                           None if rotation is None else rotation.to(linear.weight.device)))
        layer_adapter.set_unit_norm(norm)
    if rotation is None:
        return
    for output_norm, linear in ((layer_adapter.attn_output_norm, layer_adapter.o_proj),
                                (layer_adapter.mlp_output_norm, layer_adapter.down_proj)):
        if output_norm is None:
            weight, bias = rotate_output(linear.weight, linear.bias, rotation.to(linear.weight.device))
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        else:
            weight = output_norm.weight
            attach_output_rotation(output_norm, rotation.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def fold_value_rotation(layer_adapter: LayerAdapter, rotations: torch.Tensor) -> None:
    """Rotate every value head (kv_heads, head_dim, head_dim): v_proj rows (and bias) -> R^T W_v per value head,
    o_proj columns -> W_o R per query head (its group's R). Exact: attention mixes each head's values linearly."""
    heads, kv_heads = _attention_heads(layer_adapter)
    if rotations.shape[0] != kv_heads:
        raise ValueError(f"{rotations.shape[0]} value-head rotations for {kv_heads} value heads")
    v_proj, o_proj = layer_adapter.layer.self_attn.v_proj, layer_adapter.o_proj
    value_block = head_block_rotation(rotations, kv_heads).to(v_proj.weight.device)
    weight, bias = rotate_output(v_proj.weight, v_proj.bias, value_block)
    v_proj.weight.copy_(weight)
    if bias is not None:
        v_proj.bias.copy_(bias)
    query_block = head_block_rotation(rotations, heads).to(o_proj.weight.device)
    o_proj.weight.copy_(fold_input(o_proj.weight, None, query_block))


@torch.no_grad()
def fold_scales(layer_adapter: LayerAdapter, scales: dict[str, torch.Tensor] | None = None) -> None:
    """Fold WINA scales into one layer whose pre-norms are unit (after `fold_rotations`); exact for any scales.

    scales: h1/h3 (d,), h2 (num_kv_heads * head_dim,), h4 (intermediate,), as `_calibrate_layer` measured
    them; None measures plain column norms here. First h2/h4: v_proj rows (and bias) *= c, o_proj columns
    /= c (c shared within GQA groups); up_proj rows *= c, down_proj columns /= c. Then h1/h3: pre-norm
    scale := c, q/k/v and gate/up W := W diag(1/c).
    """
    heads, kv_heads = _attention_heads(layer_adapter)
    if scales is None:
        scales = {"h2": grouped_head_scale(column_scale([layer_adapter.o_proj.weight]), heads, kv_heads),
                  "h4": column_scale([layer_adapter.down_proj.weight])}
    for producer, consumer, output_scale, input_scale in (
            (layer_adapter.layer.self_attn.v_proj, layer_adapter.o_proj, scales["h2"],
             expand_head_scale(scales["h2"], heads, kv_heads)),
            (layer_adapter.layer.mlp.up_proj, layer_adapter.down_proj, scales["h4"], scales["h4"])):
        device = producer.weight.device
        weight, bias = scale_output(producer.weight, producer.bias, output_scale.to(device))
        producer.weight.copy_(weight)
        if bias is not None:
            producer.bias.copy_(bias)
        consumer.weight.copy_(scale_input(consumer.weight, input_scale.to(consumer.weight.device)))
    for site, norm, linears in (("h1", layer_adapter.attn_input_norm, layer_adapter.qkv),
                                ("h3", layer_adapter.mlp_input_norm, layer_adapter.gate_up)):
        scale = scales.get(site)
        if scale is None:
            scale = column_scale([linear.weight for linear in linears])
        for linear in linears:
            linear.weight.copy_(scale_input(linear.weight, scale.to(linear.weight.device)))
        unit = layer_adapter.norm_scale(norm).double()  # unit norm: 1 in the family's convention
        norm.weight.copy_(norm.weight.double() + scale.to(norm.weight.device) - unit)


@dataclass(frozen=True)
class Applied:
    """What `apply` folded: K per reader linear per site per layer, and per layer the residual basis (candidate
    name) and whether its value heads were rotated."""

    reader_keep_k: ReaderKeepK
    residual_bases: tuple[str, ...]
    value_rotated: tuple[bool, ...]

    @property
    def rotated(self) -> bool:
        return any(name != "identity" for name in self.residual_bases)


def planned(calibration: Calibration, config: SparsifyConfig, reader_sizes) -> tuple[list[int], ReaderKeepK]:
    """What `apply` will fold for `config.sparsity`: per layer the candidate rotation index, and K per reader
    linear per site per layer (explicit `config.site_coefficients` override the error allocation: one K per
    site)."""
    choice, keep_k = choose(calibration, reader_sizes, config.sparsity, config.coefficients)
    if config.site_coefficients is not None and calibration.options.allocation == "error":
        site_sizes = [site_sizes_from_readers(layer) for layer in reader_sizes]
        keep_k = _expand(allocate_keep_k(site_sizes, config.sparsity, config.coefficients), reader_sizes)
    return choice, keep_k


def apply(adapter: ModelAdapter, calibration: Calibration, config: SparsifyConfig, reader_sizes) -> Applied:
    """Fold the calibrated choices for `config.sparsity` into the weights."""
    choice, keep_k = planned(calibration, config, reader_sizes)
    rotations = [layer.rotations[index] for layer, index in zip(calibration.layers, choice)]
    fold_rotations(adapter, rotations)
    value_choice = choose_value_rotations(calibration.layers, keep_k)
    for layer_adapter, layer, index, value_index in zip(adapter.layer_adapters(), calibration.layers, choice,
                                                        value_choice):
        with materialized(layer_adapter.layer):
            if layer.value_rotations[value_index] is not None:
                fold_value_rotation(layer_adapter, layer.value_rotations[value_index])
            if calibration.options.scaling:
                chosen = {"h1": index, "h2": value_index, "h3": index, "h4": 0}
                fold_scales(layer_adapter, {site: values[chosen[site]] for site, values in layer.scales.items()})
    names = tuple(calibration.options.rotations[index] for index in choice)
    return Applied(keep_k, names, tuple(layer.value_rotations[index] is not None
                                        for layer, index in zip(calibration.layers, value_choice)))
