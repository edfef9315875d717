"""What calibration decided (`SparsityPlan`), the sizes it is accounted in, and where a model keeps it.

The plan (with its config) is attached to the model (``model.rotsparse_plan``) and to its config, so that
``save_pretrained`` writes it into config.json under ``"rotsparse"``, with the ``quantization_config`` that makes
``from_pretrained`` rebuild the sparse model (`rotsparse.hf_quantizer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .config import SITES, SparsifyConfig, run_length
from .families import Family

FORMAT_VERSION = 1
PLAN_ATTRIBUTE = "rotsparse_plan"
CONFIG_KEY = "rotsparse"
QUANT_METHOD = "rotsparse"
"""``quant_method`` of the ``quantization_config`` of a saved sparse model (`rotsparse.hf_quantizer`)."""

Sizes = tuple[tuple[int, int], ...]
"""(input width, parameters) per site, or per reader linear of a site."""


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
        compared (`AutoOptions.structure_check`), the chosen one lowest; empty if none were.
    reader_keep_k[l][s][r], reader_params[l][s][r]: K and parameters of every reader linear r of a site (h1: q,
        k, v; h3: gate, up), when each selects its own K (``auto``, `AutoOptions.per_reader`);
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

    def rotation_layers(self) -> tuple[frozenset[int], frozenset[int]] | None:
        """Layers whose forward carries a rotation at run time (`rotsparse.runtime.attach_output_rotation`):
        (residual: decoder layers l whose output is rotated into layer l+1's basis because their residual bases
        differ -- equal names share one basis for "identity", "global" and the layers of one "run<G>", "pca*"
        bases are per layer; post-norm: layers whose post-norms, in families that have them, rotate their output
        because the layer's basis is not the identity). None for a rotated plan saved before `residual_bases`
        existed (any layer may carry one)."""
        if not self.residual_bases:
            return None if self.rotated else (frozenset(), frozenset())
        bases = self.residual_bases
        residual = set()
        for index, (here, following) in enumerate(zip(bases, bases[1:])):
            run = run_length(here)
            shared = here == following and (here in ("identity", "global")
                                            or (run is not None and index // run == (index + 1) // run))
            if not shared:
                residual.add(index)
        return frozenset(residual), frozenset(index for index, base in enumerate(bases) if base != "identity")

    @property
    def effective_sparsity(self) -> float:
        """Fraction of the dense weight bytes not read per token: the weight columns Top-K skips, weighted by the
        parameters each reader linear feeds; with `SparsifyConfig.residual_bits`, less what the copied columns'
        residual rows read (`SparsifyConfig.residual_cost` of a 16-bit weight each)."""
        skipped = total = 0
        cost = self.config.residual_cost
        for index, (layer_k, layer_sizes) in enumerate(zip(self.keep_k, self.site_sizes)):
            for site, (k, (width, params)) in enumerate(zip(layer_k, layer_sizes)):
                readers = self.reader_params[index][site] if self.reader_params else (params,)
                site_k = self.reader_keep_k[index][site] if self.reader_keep_k else (k,)
                skipped += sum((width - reader_k - cost * self.config.copied_inputs(width, reader_k))
                               * (reader_params // width) for reader_k, reader_params in zip(site_k, readers))
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


def reader_sizes_of(layer_linears: dict[str, list[nn.Linear]]) -> tuple[Sizes, ...]:
    """(input width, parameters) of every reader linear of each site, in `SITES` order (h1: q, k, v; h3: gate,
    up: the family's order)."""
    sizes = []
    for site in SITES:
        linears = layer_linears[site]
        widths = {linear.in_features for linear in linears}
        if len(widths) != 1:
            raise ValueError(f"linears at site {site} disagree on input width: {sorted(widths)}")
        sizes.append(tuple((linear.in_features, linear.in_features * linear.out_features) for linear in linears))
    return tuple(sizes)


def site_sizes_from_readers(layer_readers: tuple[Sizes, ...]) -> Sizes:
    """One layer's (input width, parameters fed) per site from its `reader_sizes_of`."""
    return tuple((readers[0][0], sum(params for _, params in readers)) for readers in layer_readers)


def reader_sizes_for(family: Family) -> tuple[tuple[Sizes, ...], ...]:
    """(input width, parameters) of every reader linear of every site of every layer."""
    return tuple(reader_sizes_of(layer.site_modules()) for layer in family.layer_views())


def site_sizes_for(family: Family) -> tuple[Sizes, ...]:
    """(input width, parameters fed) of every site of every layer."""
    return tuple(site_sizes_from_readers(layer) for layer in reader_sizes_for(family))


def quantization_section() -> dict:
    """config.json's ``quantization_config`` of a sparse model: a pointer to the plan section (`CONFIG_KEY`).

    A plain dict (transformers turns it into the registered `rotsparse.hf_quantizer.RotsparseConfig` when it
    loads the folder); it equals ``RotsparseConfig().to_dict()``.
    """
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "plan_key": CONFIG_KEY}


def attach_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """Attach the plan to the model, and to its config so that `save_pretrained` writes it (with the
    ``quantization_config`` that makes ``from_pretrained`` rebuild the sparse model, `quantization_section`)."""
    setattr(model, PLAN_ATTRIBUTE, plan)
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    model.config.quantization_config = quantization_section()


def plan_of(model: nn.Module) -> SparsityPlan:
    """The plan attached by `sparsify` or `load`; a clear error for a plain model."""
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise ValueError("this model was not sparsified by rotsparse (no plan attached)")
    return plan


class CheckpointError(ValueError):
    """A saved folder that does not hold what its plan says (missing, extra or bad tensors, bad plan)."""


def plan_from_section(section, source: str) -> SparsityPlan:
    """A `SparsityPlan` from config.json's ``"rotsparse"`` section; CheckpointError naming `source` if malformed."""
    if not isinstance(section, dict):
        raise CheckpointError(f"{source}: the {CONFIG_KEY!r} section is {type(section).__name__}, not a JSON object")
    try:
        return SparsityPlan.from_dict(section)
    except ValueError as error:  # an unknown format version, or values that do not fit together
        raise CheckpointError(f"{source}: {error}") from error
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{source}: malformed rotsparse plan: {type(error).__name__}: {error}") from error


def read_plan(directory: str | Path) -> SparsityPlan:
    """The plan saved in `directory`'s config.json; FileNotFoundError without one, ValueError for a folder that
    holds no rotsparse model, CheckpointError naming the file for invalid JSON or a bad plan."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: not a saved model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or CONFIG_KEY not in config:
        raise ValueError(f"{directory} holds no rotsparse model (config.json has no {CONFIG_KEY!r} section)")
    return plan_from_section(config[CONFIG_KEY], str(config_path))
