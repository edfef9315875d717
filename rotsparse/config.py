"""What the user asks for: `SparsifyConfig`, the methods it names (`METHODS`) and the ``auto`` pipeline's
switches (`AutoOptions`).

All are small, frozen and JSON-serializable; the config (with its resolved options) is saved with the plan in
the model's config.json under ``"rotsparse"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

from .kernels.reference import RESIDUAL_GROUP

SITES = ("h1", "h2", "h3", "h4")
"""Top-K sites of a decoder layer: h1 = q/k/v input, h2 = o_proj input, h3 = gate/up input, h4 = down_proj input."""

ROTATION_CANDIDATES = ("identity", "global", "pca", "pca_sink", "pca_scaled", "run<G>")
"""Residual-basis candidates (`AutoOptions.rotations`); "run<G>" stands for any run length G >= 2, e.g. "run5"."""
IN_DOMAIN_ROTATIONS = ("identity", "global", "pca_sink", "pca_scaled", "run5", "run10")
"""Every residual-basis candidate, for text like the calibration text (``AutoOptions(rotations=IN_DOMAIN_ROTATIONS)``):
PCA bases fitted to the calibration text lower the Top-K gap on held-out text of that kind but raise it on other
text, often above plain Top-K's (docs/quality.md), so ``auto`` offers the identity only by default."""

WEIGHT_BITS = (8, 4)
"""``weight_bits`` choices besides None (float weights): weight-only int8 and int4 (`rotsparse.quantize`)."""

RESIDUAL_BITS = (0, 1, 2)
"""``residual_bits`` choices: 0 skips the inputs Top-K drops; 1 or 2 carries them through a low-bit weight copy."""

MLP_ACTIVATIONS = (None, "relu2")
"""``mlp_activation`` choices: None keeps the model's own; ``relu2`` is squared ReLU (Q-Sparse, from scratch)."""


def run_length(name: str) -> int | None:
    """G of a "run<G>" candidate name (one basis per run of G consecutive layers), else None."""
    match = re.fullmatch(r"run(\d+)", name)
    return int(match.group(1)) if match else None


def _field(default, help: str, **metadata):
    """A dataclass field whose `help` (and CLI hints: ``cli`` flag name or None, ``choices``, ``nargs``,
    ``metavar``) `rotsparse.cli` turns into a flag."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class AutoOptions:
    """Switches of the calibrated pipeline (the defaults are ``auto``; the others exist for ablations).

    rotations: candidate residual bases per layer, from `ROTATION_CANDIDATES` (default: the identity only, the one
        choice that does not depend on the calibration text; `IN_DOMAIN_ROTATIONS` offers all): "identity", "global" (one basis
        for every layer: PCA of the normalised attention inputs averaged over layers), "pca" (the layer's
        normalised attention input), "pca_sink" (the same, leaving the few channels that hold the attention
        sinks' massive activations unrotated: `sink_preserving_rotation`), "pca_scaled" (the attention norm's
        output), "run<G>" (one basis per run of G consecutive layers: `pca_sink` of the run's summed moments,
        so residual rotations sit only between runs). scaling: fold WINA column-norm scales.
    allocation: "error" (per-layer per-site from error curves, one budget for the whole model), "layer" (the
        same within each layer, every layer at the requested sparsity: TEAL's budget) or "uniform" (the config's
        coefficients).
    charge_rotations: with error allocation, rotations pay for the weights they add at run time (residual
        rotations where neighbouring bases differ, output rotations) at the allocation's price per kept weight.
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
    """

    rotations: tuple[str, ...] = _field(("identity",), "candidate residual bases per layer (all of them: "
                                        + " ".join(IN_DOMAIN_ROTATIONS) + ")", metavar="NAME")
    scaling: bool = _field(True, "fold WINA column-norm scales")
    allocation: str = _field("error", "K from calibrated error curves (over the model, or per layer), or uniform "
                             "by site coefficients", choices=lambda: ("error", "layer", "uniform"))
    loss_weighted: bool = _field(True, "weigh every linear output by its loss sensitivity")
    charge_rotations: bool = _field(True, "rotations pay for the weights they add at run time")
    value_rotation: bool = _field(True, "offer a PCA rotation of every value head per layer")
    per_reader: bool = _field(True, "one K per reader linear (else one per site)")
    structure_check: bool = _field(True, "choose the residual-basis structure by the loss on held-out sequences")

    def __post_init__(self):
        object.__setattr__(self, "rotations", tuple(self.rotations))
        unknown = [name for name in self.rotations
                   if name not in ROTATION_CANDIDATES[:-1] and (run_length(name) or 0) < 2]
        if unknown or not self.rotations or len(set(self.rotations)) != len(self.rotations):
            raise ValueError(f"rotation candidates must be distinct names from {ROTATION_CANDIDATES} (G >= 2), got "
                             f"{self.rotations}")
        if self.allocation not in ("error", "layer", "uniform"):
            raise ValueError(f"allocation must be 'error', 'layer' or 'uniform', got {self.allocation!r}")
        if self.value_rotation and self.scaling and not self.loss_weighted:
            raise ValueError("value_rotation with scaling needs loss_weighted=True (or pass value_rotation=False)")


@dataclass(frozen=True)
class Method:
    """One sparsification method: a `METHODS` entry.

    site_coefficients: default relative sparsity of (h1, h2, h3, h4) (`SparsifyConfig.site_coefficients`).
    options: the calibrated pipeline's switches; None: no calibration (plain Top-K on the unchanged model).
    tunable: `SparsifyConfig.options` may replace `options` (else they are fixed).
    check_held_out: text calibration reads `SparsifyConfig.check_sequences` extra sequences, held out from
        every statistic, for `AutoOptions.structure_check`.
    """

    name: str
    site_coefficients: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    options: AutoOptions | None = None
    tunable: bool = False
    check_held_out: bool = False
    description: str = ""

    @property
    def calibrated(self) -> bool:
        return self.options is not None


METHODS: dict[str, Method] = {}
"""Method name -> `Method`; ``SparsifyConfig(method=name)`` selects one. Add entries with `register_method`."""


def register_method(method: Method) -> Method:
    """Make `method` selectable by its name (replacing an entry of the same name); returns it."""
    METHODS[method.name] = method
    return method


register_method(Method(
    "auto", options=AutoOptions(), tunable=True, check_held_out=True,
    description="loss-weighted WINA channel scales, value-head rotations and K per reader linear from calibrated "
                "Top-K errors in units of loss; residual-basis rotations (with a structure check by the real loss "
                "on held-out calibration sequences) only if asked for (`IN_DOMAIN_ROTATIONS`): they do not carry "
                "to text unlike the calibration text (`rotsparse.measure`, `rotsparse.choose`)"))
register_method(Method(
    "larosa", site_coefficients=(0.8, 1.2, 0.8, 1.2),  # LaRoSA's release: h1/h3 less sparse, h2/h4 more
    options=AutoOptions(rotations=("pca",), scaling=False, allocation="uniform", loss_weighted=False,
                        value_rotation=False),
    description="layerwise PCA rotations folded into the weights, then Top-K at fixed site coefficients"))
register_method(Method("topk", description="magnitude Top-K alone on the unchanged model (TEAL-style)"))


@dataclass(frozen=True)
class SparsifyConfig:
    """Settings of one `rotsparse.sparsify` call (each field's meaning: its ``help`` metadata).

    `l2_rescale`, `block_size` and `mlp_activation` change the forward pass and are applied by
    `rotsparse.runtime.apply_topk_options`. `options` None means the method's own (`Method.options`).
    """

    sparsity: float = _field(0.4, "requested parameter-weighted effective sparsity in [0, 1)")
    method: str = _field("auto", "sparsification method", choices=lambda: sorted(METHODS))
    site_coefficients: tuple[float, float, float, float] | None = _field(
        None, "relative sparsity of (h1, h2, h3, h4), rescaled so the weighted mean hits the sparsity; None: the "
              "method's default (auto: K per site per layer from calibrated errors)", nargs=4, type=float,
        metavar=("H1", "H2", "H3", "H4"))
    num_sequences: int = _field(16, "calibration sequences")
    sequence_length: int = _field(2048, "calibration sequence length in tokens", cli="--calibration-seqlen")
    check_sequences: int = _field(2, "further calibration sequences held out to choose auto's residual-basis "
                                     "structure by their real loss (0: the error proxy chooses)")
    seed: int = _field(0, "seed of anything random in calibration")
    error_tokens: int = _field(512, "calibration tokens sampled per layer to measure Top-K output errors (auto)")
    l2_rescale: bool = _field(False, "after Top-K, rescale each token's kept vector to the full vector's L2 norm "
                                     "(Q-Sparse)")
    block_size: int = _field(0, "M > 0: block (N:M) Top-K, N = round(K * M / width) of every M consecutive "
                                "entries; 0: the K largest of the whole token")
    mlp_activation: str | None = _field(None, "None keeps the model's MLP activation; relu2: squared ReLU "
                                              "(Q-Sparse)", choices=lambda: MLP_ACTIVATIONS)
    weight_bits: int | None = _field(None, "quantize every Top-K linear's weight after folding: 8 (int8, a scale per "
                                           "output) or 4 (int4, a scale per group of input channels and output); "
                                           "None keeps float weights", choices=lambda: WEIGHT_BITS, type=int)
    group_size: int = _field(32, "int4: input channels per scale group (must divide every Top-K linear's input "
                                 "width)")
    residual_bits: int = _field(0, "1 or 2: the inputs Top-K drops go through a 1- or 2-bit copy of the weight (a "
                                   "float16 scale per 64 outputs), paid for from the same budget (K is lowered so "
                                   "that the weight bytes read per token stay 1 - sparsity of the dense 16-bit "
                                   "weight); 0: they are skipped", choices=lambda: RESIDUAL_BITS, type=int)
    residual_band: float | None = _field(None, "with residual_bits: only the largest dropped inputs go through "
                                               "the copy, this fraction of each Top-K linear's input width (the "
                                               "rest are skipped; K is lowered by what the band reads); None: "
                                               "every dropped input", type=float)
    options: AutoOptions | None = _field(None, "switches of the calibrated pipeline; None: the method's own",
                                         cli=None)

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not math.isfinite(self.sparsity):
            raise ValueError(f"sparsity must be a finite number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {tuple(METHODS)}")
        if self.site_coefficients is not None:
            coefficients = tuple(float(c) for c in self.site_coefficients)
            if len(coefficients) != len(SITES) or any(c < 0 or not math.isfinite(c) for c in coefficients):
                raise ValueError(f"site_coefficients must be 4 finite numbers >= 0 for {SITES}, got {self.site_coefficients!r}")
            if sum(coefficients) == 0:
                raise ValueError("site_coefficients must not all be zero")
            object.__setattr__(self, "site_coefficients", coefficients)
        for name, low in (("num_sequences", 1), ("sequence_length", 1), ("check_sequences", 0), ("error_tokens", 1),
                          ("block_size", 0), ("seed", 0), ("group_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.l2_rescale, bool):
            raise ValueError(f"l2_rescale must be True or False, got {self.l2_rescale!r}")
        if self.weight_bits is not None and (isinstance(self.weight_bits, bool) or self.weight_bits not in WEIGHT_BITS):
            raise ValueError(f"weight_bits must be None or one of {WEIGHT_BITS}, got {self.weight_bits!r}")
        if isinstance(self.residual_bits, bool) or self.residual_bits not in RESIDUAL_BITS:
            raise ValueError(f"residual_bits must be one of {RESIDUAL_BITS}, got {self.residual_bits!r}")
        if self.residual_bits:
            if self.weight_bits is not None:
                raise ValueError("residual_bits applies to float weights; it cannot be combined with weight_bits")
            if self.l2_rescale:
                raise ValueError("residual_bits carries the dropped inputs; it cannot be combined with l2_rescale")
        if self.residual_band is not None:
            band = self.residual_band
            if isinstance(band, bool) or not isinstance(band, (int, float)) or not 0.0 < band <= 1.0:
                raise ValueError(f"residual_band must be None or a fraction in (0, 1], got {band!r}")
            if not self.residual_bits:
                raise ValueError("residual_band is the share of the inputs that go through the residual copy; set "
                                 "residual_bits (1 or 2) too")
            if self.block_size:
                raise ValueError("residual_band copies the largest dropped inputs of each token; it cannot be "
                                 "combined with block_size")
            object.__setattr__(self, "residual_band", float(band))
        if self.residual_bits and self.topk_sparsity >= 1.0:
            raise ValueError(f"sparsity {self.sparsity} cannot be reached with residual_bits={self.residual_bits}"
                             + (f", residual_band={self.residual_band}" if self.residual_band is not None else "")
                             + f": the residual copy reads {self.residual_cost:.4f} of a 16-bit weight's bytes per "
                             f"copied input, which leaves nothing to keep")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}; choose one of {MLP_ACTIVATIONS}")
        self._normalize_options()

    def _normalize_options(self) -> None:
        """`options` as an `AutoOptions` (from a dict too), None when they are the method's own."""
        options, method = self.options, METHODS[self.method]
        if isinstance(options, dict):
            options = AutoOptions(**options)
        if options is not None and not isinstance(options, AutoOptions):
            raise ValueError(f"options must be AutoOptions, a dict of its fields or None, got {options!r}")
        if options == method.options:
            options = None
        if options is not None and not method.tunable:
            raise ValueError(f"method {self.method!r} has fixed options; {options} would change it")
        object.__setattr__(self, "options", options)

    @property
    def spec(self) -> Method:
        """The `METHODS` entry of `method`."""
        return METHODS[self.method]

    @property
    def resolved_options(self) -> AutoOptions | None:
        """The calibrated pipeline's switches in effect (None: the method does not calibrate)."""
        return self.options or self.spec.options

    @property
    def residual_cost(self) -> float:
        """Bytes of one residual weight (code and its share of a float16 scale) over those of a 16-bit weight."""
        if not self.residual_bits:
            return 0.0
        return (self.residual_bits + 16 / RESIDUAL_GROUP) / 16

    @property
    def topk_sparsity(self) -> float:
        """The parameter-weighted fraction of input columns Top-K drops: `sparsity`, or with `residual_bits` the
        larger fraction at which the kept columns' 16-bit weights plus the copied columns' residual rows read
        (1 - sparsity) of the dense bytes: s / (1 - residual_cost) when every dropped column is copied,
        s + residual_cost * residual_band when a band is (whichever is smaller: a band wider than the dropped
        columns copies them all)."""
        full = self.sparsity / (1.0 - self.residual_cost)
        return full if self.residual_band is None else min(full, self.sparsity + self.residual_cost * self.residual_band)

    def copied_inputs(self, width: int, keep_k: int) -> int:
        """Inputs of a Top-K linear (`width` inputs, `keep_k` kept) that go through the residual copy."""
        if not self.residual_bits:
            return 0
        if self.residual_band is None:
            return width - keep_k
        return min(width - keep_k, int(round(self.residual_band * width)))

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        """The per-site coefficients in effect (explicit or the method's default)."""
        return self.site_coefficients or self.spec.site_coefficients

    def to_dict(self) -> dict:
        """All fields; `options` resolved (the method's own when None), so a saved plan records them."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        options = self.resolved_options
        data["options"] = None if options is None else dataclasses.asdict(options)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SparsifyConfig":
        """Inverse of `to_dict`; dicts without ``options`` (older plans) take the method's own."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SparsifyConfig fields {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
