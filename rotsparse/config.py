"""The user's request (`SparsifyConfig`) and what calibration decided from it (`SparsityPlan`).

Both are small, frozen and JSON-serializable; the plan (with its config) is saved in the model's config.json
under ``"rotsparse"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

SITES = ("h1", "h2", "h3", "h4")
"""Top-K sites of a decoder layer: h1 = q/k/v input, h2 = o_proj input, h3 = gate/up input, h4 = down_proj input."""

METHODS = ("auto", "larosa", "topk")
"""``auto`` (default): loss-weighted (output Fisher) WINA channel scales folded into the weights, a PCA rotation
of every value head, and K per reader linear (q, k, v, o, gate, up, down) per layer, chosen from calibrated Top-K
errors in units of loss; residual-basis rotations (one PCA basis shared by all layers or by runs of layers, or the
layer's own PCA, with a structure check by the real loss on held-out calibration sequences) are opt-in
(`rotsparse.methods.IN_DOMAIN_ROTATIONS`): they help only on text like the calibration text (docs/quality.md). ``larosa``: layerwise PCA rotations folded into the weights, then
Top-K. ``topk``: Top-K alone (TEAL-style)."""

DEFAULT_SITE_COEFFICIENTS = {
    # LaRoSA's release sparsifies h1/h3 less and h2/h4 more than the target.
    "larosa": (0.8, 1.2, 0.8, 1.2),
    "topk": (1.0, 1.0, 1.0, 1.0),
    # auto allocates K from calibrated errors; these only serve as the reference for choosing rotations.
    "auto": (1.0, 1.0, 1.0, 1.0),
}

MLP_ACTIVATIONS = (None, "relu2")
"""``mlp_activation`` choices: None keeps the model's own; ``relu2`` is squared ReLU (Q-Sparse, from scratch)."""

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SparsifyConfig:
    """Settings of one `rotsparse.sparsify` call.

    sparsity: requested parameter-weighted effective sparsity in [0, 1).
    method: one of `METHODS`.
    site_coefficients: relative sparsity of (h1, h2, h3, h4); rescaled so the weighted mean hits `sparsity`.
        None picks the method's default (`DEFAULT_SITE_COEFFICIENTS`); for ``auto``, None allocates K per
        site per layer from calibrated errors and explicit coefficients override that.
    num_sequences, sequence_length: calibration size (tokens = product).
    check_sequences: further calibration sequences of the same length, held out from every statistic, on
        which ``auto`` compares the real loss of its candidate residual-basis structures
        (`rotsparse.methods.AutoOptions.structure_check`); 0 leaves the choice to the error proxy.
    seed: seeds anything random in calibration.
    error_tokens: calibration tokens sampled per layer to measure Top-K output errors (``auto``).
    l2_rescale: after Top-K, rescale each token's kept vector to the L2 norm of the full vector (Q-Sparse).
    block_size: M > 0 selects block (N:M) Top-K: keep N = round(K * M / width) of every M consecutive
        entries (Block Q-Sparse, for batch kernels); 0 keeps the K largest of the whole token.
    mlp_activation: None keeps the model's MLP activation; "relu2" swaps in squared ReLU,
        ReLU(x W_gate)^2 * (x W_up) (Q-Sparse, for models trained from scratch).
    These three change the forward pass and are applied by `rotsparse.topk.apply_topk_options`.
    """

    sparsity: float = 0.4
    method: str = "auto"
    site_coefficients: tuple[float, float, float, float] | None = None
    num_sequences: int = 16
    sequence_length: int = 2048
    check_sequences: int = 2
    seed: int = 0
    error_tokens: int = 512
    l2_rescale: bool = False
    block_size: int = 0
    mlp_activation: str | None = None

    def __post_init__(self):
        if not isinstance(self.sparsity, (int, float)) or not math.isfinite(self.sparsity):
            raise ValueError(f"sparsity must be a finite number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.site_coefficients is not None:
            coefficients = tuple(float(c) for c in self.site_coefficients)
            if len(coefficients) != len(SITES) or any(c < 0 or not math.isfinite(c) for c in coefficients):
                raise ValueError(f"site_coefficients must be 4 finite numbers >= 0 for {SITES}, got {self.site_coefficients!r}")
            if sum(coefficients) == 0:
                raise ValueError("site_coefficients must not all be zero")
            object.__setattr__(self, "site_coefficients", coefficients)
        if self.num_sequences < 1 or self.sequence_length < 1:
            raise ValueError("num_sequences and sequence_length must be >= 1")
        check = self.check_sequences
        if isinstance(check, bool) or not isinstance(check, int) or check < 0:
            raise ValueError(f"check_sequences must be an integer >= 0, got {self.check_sequences!r}")
        if isinstance(self.error_tokens, bool) or not isinstance(self.error_tokens, int) or self.error_tokens < 1:
            raise ValueError(f"error_tokens must be an integer >= 1, got {self.error_tokens!r}")
        if not isinstance(self.l2_rescale, bool):
            raise ValueError(f"l2_rescale must be True or False, got {self.l2_rescale!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"block_size must be an integer >= 0 (0: unstructured Top-K), got {self.block_size!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}; choose one of {MLP_ACTIVATIONS}")

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        """The per-site coefficients in effect (explicit or the method's default)."""
        return self.site_coefficients or DEFAULT_SITE_COEFFICIENTS[self.method]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SparsifyConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SparsifyConfig fields {sorted(unknown)}")
        data = dict(data)
        if data.get("site_coefficients") is not None:
            data["site_coefficients"] = tuple(data["site_coefficients"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class SparsityPlan:
    """What calibration decided: K per site (and per reader linear) per layer, and whether the residual stream
    is rotated.

    keep_k[l][s]: entries kept per token at site `SITES[s]` of layer l (with `reader_keep_k`: its readers'
        parameter-weighted mean, rounded).
    site_sizes[l][s]: (input width, parameters fed) of that site, for effective-sparsity accounting.
    rotated: True when layerwise rotations were folded into the weights.
    calibration_tokens: tokens the statistics were computed on (0 when none were needed).
    residual_bases[l]: the residual-basis candidate layer l took ("identity", "global", "run5", ...); empty
        for methods without calibration.
    value_rotated[l]: whether layer l's value heads were rotated; empty without calibration.
    check_losses: (structure label, next-token loss on the held-out check sequences) per candidate structure
        compared (`rotsparse.methods.AutoOptions.structure_check`), the chosen one lowest; empty if none were.
    reader_keep_k[l][s][r], reader_params[l][s][r]: K and parameters of every reader linear r of a site (h1: q,
        k, v; h3: gate, up), when each selects its own K (``auto``, `rotsparse.methods.AutoOptions.per_reader`);
        empty: every reader of a site keeps `keep_k`. Build such a plan with `from_readers`.
    """

    keep_k: tuple[tuple[int, ...], ...]
    site_sizes: tuple[tuple[tuple[int, int], ...], ...]
    rotated: bool
    config: SparsifyConfig = field(default_factory=SparsifyConfig)
    calibration_tokens: int = 0
    residual_bases: tuple[str, ...] = ()
    value_rotated: tuple[bool, ...] = ()
    check_losses: tuple[tuple[str, float], ...] = ()
    reader_keep_k: tuple[tuple[tuple[int, ...], ...], ...] = ()
    reader_params: tuple[tuple[tuple[int, ...], ...], ...] = ()

    def __post_init__(self):
        shape = [len(layer) for layer in self.keep_k]
        if shape != [len(layer) for layer in self.site_sizes]:
            raise ValueError(f"keep_k has {shape} sites per layer, site_sizes {[len(l) for l in self.site_sizes]}")
        if not self.reader_keep_k and not self.reader_params:
            return
        reader_shape = [[len(site) for site in layer] for layer in self.reader_keep_k]
        if reader_shape != [[len(site) for site in layer] for layer in self.reader_params]:
            raise ValueError("reader_keep_k and reader_params differ in shape")
        for index, (layer_k, layer_params, layer_sizes) in enumerate(
                zip(self.reader_keep_k, self.reader_params, self.site_sizes, strict=True)):
            for site_k, site_params, (width, params) in zip(layer_k, layer_params, layer_sizes, strict=True):
                if sum(site_params) != params or not all(0 <= k <= width for k in site_k):
                    raise ValueError(f"layer {index}: reader K {site_k} / parameters {site_params} do not fit the "
                                     f"site (width {width}, {params} parameters)")

    @classmethod
    def from_readers(cls, reader_keep_k, reader_sizes, **fields) -> "SparsityPlan":
        """A plan from K per reader linear (`reader_keep_k[l][s][r]`) and the readers' (width, parameters)
        (`reader_sizes[l][s][r]`); `keep_k` and `site_sizes` are derived."""
        reader_params = tuple(tuple(tuple(params for _, params in site) for site in layer) for layer in reader_sizes)
        site_sizes = tuple(tuple((site[0][0], sum(params)) for site, params in zip(layer, layer_params))
                           for layer, layer_params in zip(reader_sizes, reader_params))
        keep_k = tuple(tuple(int(round(sum(k * p for k, p in zip(site_k, params)) / sum(params)))
                             for site_k, params in zip(layer_k, layer_params))
                       for layer_k, layer_params in zip(reader_keep_k, reader_params))
        reader_keep_k = tuple(tuple(tuple(int(k) for k in site) for site in layer) for layer in reader_keep_k)
        return cls(keep_k=keep_k, site_sizes=site_sizes, reader_keep_k=reader_keep_k, reader_params=reader_params,
                   **fields)

    def site_reader_keep_k(self, layer: int, site: int, readers: int) -> tuple[int, ...]:
        """K of each of the `readers` reader linears of site `site` of layer `layer`."""
        if not self.reader_keep_k:
            return (self.keep_k[layer][site],) * readers
        site_k = self.reader_keep_k[layer][site]
        if len(site_k) != readers:
            raise ValueError(f"layer {layer} site {SITES[site]}: the plan has K for {len(site_k)} reader linears, "
                             f"the model has {readers}")
        return site_k

    @property
    def effective_sparsity(self) -> float:
        """Fraction of weight columns skipped per token, weighted by the parameters each reader linear feeds."""
        skipped = total = 0
        for index, (layer_k, layer_sizes) in enumerate(zip(self.keep_k, self.site_sizes)):
            for site, (k, (width, params)) in enumerate(zip(layer_k, layer_sizes)):
                readers = self.reader_params[index][site] if self.reader_params else (params,)
                site_k = self.reader_keep_k[index][site] if self.reader_keep_k else (k,)
                skipped += sum((width - reader_k) * (reader_params // width)
                               for reader_k, reader_params in zip(site_k, readers))
                total += params
        return skipped / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "rotated": self.rotated,
            "calibration_tokens": self.calibration_tokens,
            "keep_k": [list(k) for k in self.keep_k],
            "site_sizes": [[list(s) for s in layer] for layer in self.site_sizes],
            "effective_sparsity": self.effective_sparsity,
            "residual_bases": list(self.residual_bases),
            "value_rotated": list(self.value_rotated),
            "check_losses": [[label, loss] for label, loss in self.check_losses],
            "reader_keep_k": [[list(site) for site in layer] for layer in self.reader_keep_k],
            "reader_params": [[list(site) for site in layer] for layer in self.reader_params],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SparsityPlan":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"rotsparse format version {version!r} is not supported by this rotsparse "
                f"(it reads version {FORMAT_VERSION}); upgrade rotsparse or re-sparsify the model"
            )
        return cls(
            keep_k=tuple(tuple(int(k) for k in layer) for layer in data["keep_k"]),
            site_sizes=tuple(tuple((int(w), int(p)) for w, p in layer) for layer in data["site_sizes"]),
            rotated=bool(data["rotated"]),
            config=SparsifyConfig.from_dict(data["config"]),
            calibration_tokens=int(data.get("calibration_tokens", 0)),
            residual_bases=tuple(str(name) for name in data.get("residual_bases", ())),
            value_rotated=tuple(bool(flag) for flag in data.get("value_rotated", ())),
            check_losses=tuple((str(label), float(loss)) for label, loss in data.get("check_losses", ())),
            reader_keep_k=tuple(tuple(tuple(int(k) for k in site) for site in layer)
                                for layer in data.get("reader_keep_k", ())),
            reader_params=tuple(tuple(tuple(int(p) for p in site) for site in layer)
                                for layer in data.get("reader_params", ())),
        )
