"""Per-architecture knowledge as data: where a family's norms, projections, embeddings and head live.

A `FamilySpec` maps roles to module paths; `register_family` adds one, chosen by ``model.config.model_type``
(never by model name). The rest of the library reaches a model's modules only through `Family` (the model)
and `Layer` (one decoder layer), so a new Llama-like family is one `FamilySpec`, and a family whose modules
are arranged differently (e.g. fused q/k/v) is one `Layer` subclass named by its spec's `layer_class`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilySpec:
    """Role -> module path (dotted, from the causal LM for the model-level roles, from a decoder layer for the
    layer roles) of one architecture family.

    norm_convention: "plain" (RMSNorm multiplies by its weight) or "plus_one" (by 1 + weight, Gemma).
    attn_input_norm / mlp_input_norm: pre-norms before attention / MLP, or None where the projections read the
        raw residual stream (OLMo-2): no WINA scale at h1 / h3 then (nothing to fold it into).
    attn_output_norm / mlp_output_norm: post-norms after attention / MLP (Gemma-3's sandwich norms, OLMo-2's
        only norms), or None.
    q, k, v / gate, up: the projections; k, v and up may be None where `layer_class` reads fused ones (Phi-3's
        qkv_proj at `q`, gate_up_proj at `gate`).
    mlp_activation: the gated MLP's activation attribute (swapped for squared ReLU by ``relu2``).
    experts / router: a mixture-of-experts MLP's batched experts module (parameters gate_up_proj (E, 2I, d) and
        down_proj (E, d, I), act_fn) and its router (top_k), or None; a layer without them (Qwen3-MoE's dense
        layers) uses gate/up/down. Read by `ExpertsLayer`. expert_activation: the experts' activation attribute.
    layer_class: the `Layer` class that reads a decoder layer (None: `Layer`).
    calibrated: whether the calibrated methods (rotations, scales: ``auto``, ``larosa``) support the family;
        False: ``topk`` only.
    """

    model_types: tuple[str, ...]
    decoder: str = "model"
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn: str = "self_attn"
    attn_input_norm: str | None = "input_layernorm"
    q: str = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_input_norm: str | None = "post_attention_layernorm"
    mlp: str = "mlp"
    gate: str = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    down: str = "mlp.down_proj"
    mlp_activation: str = "mlp.act_fn"
    attn_output_norm: str | None = None
    mlp_output_norm: str | None = None
    norm_convention: str = "plain"
    experts: str | None = None
    router: str | None = None
    expert_activation: str = "act_fn"
    layer_class: type | None = None
    calibrated: bool = True

    def __post_init__(self):
        if self.norm_convention not in ("plain", "plus_one"):
            raise ValueError(f"norm_convention must be 'plain' or 'plus_one', got {self.norm_convention!r}")

    def reader_paths(self) -> dict[str, tuple[str, int]]:
        """Path (from a decoder layer) of every site linear -> (site, index among the site's readers), in
        `Layer.site_linears` order: what a plan's per-reader K refers to. A mixture of experts' batched experts
        (h3/h4) are no linears and not listed."""
        roles = {"h1": (self.q, self.k, self.v), "h2": (self.o,), "h3": (self.gate, self.up), "h4": (self.down,)}
        return {path: (site, index) for site, paths in roles.items()
                for index, path in enumerate(path for path in paths if path is not None)}


FAMILIES: dict[str, FamilySpec] = {}
"""model_type -> `FamilySpec`."""


def register_family(spec: FamilySpec) -> FamilySpec:
    """Support every model_type of `spec` (replacing earlier entries for them); returns `spec`."""
    for model_type in spec.model_types:
        FAMILIES[model_type] = spec
    return spec


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class _View:
    """A module seen through a `FamilySpec`: attribute ``name`` in `ROLES` is the module at the spec's path for
    role ``ROLES[name]`` below `root` (None where the spec has no such module)."""

    ROLES: dict[str, str] = {}

    def __init__(self, root: nn.Module, spec: FamilySpec):
        self.root = root
        self.spec = spec

    def __getattr__(self, name: str):
        role = type(self).ROLES.get(name)
        if role is None:
            raise AttributeError(f"{type(self).__name__} has no attribute or role {name!r}")
        path = getattr(self.spec, role)
        return None if path is None else _module(self.root, path)


def _slot(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of a dotted path below `root`."""
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def norm_scale(spec: FamilySpec, norm: nn.Module) -> torch.Tensor:
    """The elementwise multiplier an RMSNorm of family `spec` applies after normalising, shape (d,)."""
    if spec.norm_convention == "plus_one":
        return 1.0 + norm.weight.detach().double()
    return norm.weight.detach()


def set_unit_norm(spec: FamilySpec, norm: nn.Module) -> None:
    """Make the norm a pure normalisation (its scale has been folded into the next linears)."""
    with torch.no_grad():
        norm.weight.fill_(0.0 if spec.norm_convention == "plus_one" else 1.0)


class Layer(_View):
    """One decoder layer seen through its family's spec: pre-norms (folded: attn_input_norm, mlp_input_norm),
    optional post-norms (kept: attn_output_norm, mlp_output_norm), the linear projections (v_proj, o_proj,
    up_proj, down_proj; all readers of a site: `site_modules`), the MLP and its activation, and the family's
    RMSNorm convention."""

    ROLES = {"attn_input_norm": "attn_input_norm", "mlp_input_norm": "mlp_input_norm",
             "attn_output_norm": "attn_output_norm", "mlp_output_norm": "mlp_output_norm", "v_proj": "v",
             "o_proj": "o", "up_proj": "up", "down_proj": "down", "mlp": "mlp", "mlp_activation": "mlp_activation"}

    def __init__(self, layer: nn.Module, spec: FamilySpec):
        super().__init__(layer, spec)
        self.layer = layer

    @property
    def qkv(self) -> list[nn.Linear]:
        return self.site_modules()["h1"]

    @property
    def gate_up(self) -> list[nn.Linear]:
        return self.site_modules()["h3"]

    def site_linears(self) -> dict[str, list[tuple[nn.Module, str]]]:
        """Site name -> [(parent module, attribute name)] of the linears reading that site's input (one fused
        linear is one reader)."""
        linears = {site: [] for site in ("h1", "h2", "h3", "h4")}
        for path, (site, _) in self.spec.reader_paths().items():
            linears[site].append(_slot(self.layer, path))
        return linears

    def _linear_roles(self) -> tuple[str, ...]:
        """The spec roles naming this layer's site linears."""
        return ("q", "k", "v", "o", "gate", "up", "down")

    def missing(self) -> list[str]:
        """What this layer lacks of its spec: "role 'path' (why)" for every site linear that does not exist or is
        not a linear layer and every named norm or module that does not exist (empty: it can be sparsified)."""
        spec, missing = self.spec, []
        for role in self._linear_roles():
            path = getattr(spec, role)
            if path is None:
                continue
            try:
                module = _module(self.layer, path)
            except AttributeError:
                missing.append(f"{role} linear {path!r} (no such module)")
                continue
            if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
                missing.append(f"{role} linear {path!r} (a {type(module).__name__}, not a linear layer)")
        for role in ("attn", "mlp", "attn_input_norm", "mlp_input_norm", "attn_output_norm", "mlp_output_norm"):
            path = getattr(spec, role)
            if path is not None:
                try:
                    _module(self.layer, path)
                except AttributeError:
                    missing.append(f"{role} {path!r} (no such module)")
        return missing

    def pre_norm(self, site: str) -> nn.Module | None:
        """The pre-norm whose output is the input of site "h1" or "h3" (None: the site reads the raw residual)."""
        return {"h1": self.attn_input_norm, "h3": self.mlp_input_norm}[site]

    def site_input(self, site: str) -> nn.Module:
        """A module whose forward input is site "h1"'s or "h3"'s input before its pre-norm (the pre-norm, or
        without one the site's first reader): what calibration hooks."""
        return self.pre_norm(site) or self.site_modules()[site][0]

    def producer(self, site: str) -> tuple[int, slice]:
        """(index among the readers of "h1" / "h3", output rows) of the linear producing site "h2"'s / "h4"'s
        input in proportion to it: v_proj for h2, up_proj for h4 (where WINA scales and value rotations go)."""
        producer, readers = (self.v_proj, self.qkv) if site == "h2" else (self.up_proj, self.gate_up)
        return next(i for i, reader in enumerate(readers) if reader is producer), slice(None)

    def site_modules(self) -> dict[str, list[nn.Module]]:
        """Site name -> the linears reading that site's input, in `site_linears` order."""
        return {site: [getattr(parent, name) for parent, name in pairs] for site, pairs in self.site_linears().items()}

    def attention_heads(self) -> tuple[int, int]:
        """(query heads, value heads) of the attention."""
        head_dim = _module(self.layer, self.spec.attn).head_dim
        return _module(self.layer, self.spec.q).out_features // head_dim, self.v_proj.out_features // head_dim

    def set_mlp_activation(self, activation: nn.Module) -> None:
        parent, name = _slot(self.layer, self.spec.mlp_activation)
        setattr(parent, name, activation)

    # RMSNorm conventions -------------------------------------------------------------------
    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        for name in ("variance_epsilon", "eps"):
            if hasattr(norm, name):
                return float(getattr(norm, name))
        raise TypeError(f"cannot find the epsilon of norm module {type(norm).__name__}")

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        return norm_scale(self.spec, norm)

    def set_unit_norm(self, norm: nn.Module) -> None:
        set_unit_norm(self.spec, norm)


class RowSlice:
    """Output rows `rows` of a fused linear seen as a linear of their own (Phi-3's v rows of qkv_proj, up rows of
    gate_up_proj): ``weight`` / ``bias`` are views, so ``weight.copy_`` writes into the fused parameter."""

    def __init__(self, linear: nn.Linear, rows: slice):
        self.linear, self.rows = linear, rows

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[self.rows]

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return len(range(self.linear.out_features)[self.rows])


class FusedLayer(Layer):
    """A decoder layer with fused projections: the spec's `q` is qkv_proj (rows: q heads, k heads, v heads) and
    `gate` is gate_up_proj (rows: gate, then up), with `k`, `v`, `up` None (Phi-3).

    Each fused linear is one reader of its site: residual rotations and h1/h3 scales fold into all its input
    columns. `v_proj` and `up_proj` are `RowSlice` views of the v rows and the up half, so value rotations and
    h2/h4 scales touch only those rows (and o_proj's / down_proj's columns).
    """

    def attention_heads(self) -> tuple[int, int]:
        attention = _module(self.layer, self.spec.attn)
        head_dim = attention.head_dim
        kv_heads = attention.num_key_value_heads
        return (_module(self.layer, self.spec.q).out_features - 2 * kv_heads * head_dim) // head_dim, kv_heads

    def _rows(self, site: str) -> slice:
        if site == "h2":
            heads, kv_heads = self.attention_heads()
            head_dim = _module(self.layer, self.spec.attn).head_dim
            return slice((heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim)
        return slice(_module(self.layer, self.spec.gate).out_features // 2, None)

    @property
    def v_proj(self) -> RowSlice:
        return RowSlice(_module(self.layer, self.spec.q), self._rows("h2"))

    @property
    def up_proj(self) -> RowSlice:
        return RowSlice(_module(self.layer, self.spec.gate), self._rows("h4"))

    def producer(self, site: str) -> tuple[int, slice]:
        return 0, self._rows(site)


class ExpertsReader:
    """The batched experts of a mixture-of-experts MLP seen as the reader of one site, for sizes: input width
    `in_features`, and `out_features` outputs per token over the experts a token is routed to (top_k x 2I for
    h3, top_k x d for h4), so its parameters count what one token reads."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features


class ExpertsLayer(Layer):
    """A decoder layer whose MLP may be a mixture of experts with batched expert weights (`FamilySpec.experts`,
    Qwen3-MoE, Mixtral). Sites h1/h2 are the attention's linears; h3 is the experts' shared input (the router
    reads it dense) and h4 every expert's down_proj input, each one Top-K site (`ExpertsReader` for their sizes;
    `rotsparse.runtime.TopKExperts` runs them). Layers without experts are read like `Layer`."""

    @property
    def experts(self) -> nn.Module | None:
        """The batched experts module, or None in a dense layer."""
        try:
            return _module(self.layer, self.spec.experts)
        except AttributeError:
            return None

    def site_linears(self) -> dict[str, list[tuple[nn.Module, str]]]:
        linears = super().site_linears()
        if self.experts is not None:  # h3/h4 read batched weights, not linears
            linears["h3"], linears["h4"] = [], []
        return linears

    @property
    def mlp_activation(self) -> nn.Module:
        experts = self.experts
        if experts is None:
            return _module(self.layer, self.spec.mlp_activation)
        return getattr(experts, self.spec.expert_activation)

    def set_mlp_activation(self, activation: nn.Module) -> None:
        experts = self.experts
        if experts is None:
            super().set_mlp_activation(activation)
        else:
            setattr(experts, self.spec.expert_activation, activation)

    def expert_parts(self) -> tuple[nn.Parameter, nn.Parameter, nn.Module, str]:
        """(gate_up_proj (E, 2I, d), down_proj (E, d, I), activation, activation attribute) of the experts."""
        experts = self.experts
        activation = self.spec.expert_activation
        return experts.gate_up_proj, experts.down_proj, getattr(experts, activation), activation

    def site_modules(self) -> dict[str, list]:
        modules = super().site_modules()
        experts = self.experts
        if experts is not None:
            active = _module(self.layer, self.spec.router).top_k
            _, double_intermediate, hidden = experts.gate_up_proj.shape
            modules["h3"] = [ExpertsReader(hidden, active * double_intermediate)]
            modules["h4"] = [ExpertsReader(double_intermediate // 2, active * hidden)]
        return modules

    def experts_slot(self) -> tuple[nn.Module, str]:
        """(parent, attribute) of the experts module, for replacing it."""
        return _slot(self.layer, self.spec.experts)

    def _linear_roles(self) -> tuple[str, ...]:
        return super()._linear_roles() if self.experts is None else ("q", "k", "v", "o")

    def missing(self) -> list[str]:
        missing, experts = super().missing(), self.experts
        if experts is None:
            return missing
        for name in ("gate_up_proj", "down_proj", self.spec.expert_activation):
            if not hasattr(experts, name):
                missing.append(f"experts {self.spec.experts!r} without {name}")
        if not hasattr(_module(self.layer, self.spec.router), "top_k"):
            missing.append(f"router {self.spec.router!r} without top_k")
        return missing


class Family(_View):
    """A causal LM seen through its family's spec: the decoder stack without the head (decoder), embed_tokens,
    the decoder layers (layers, a ModuleList; `layer_views`), final_norm, lm_head and rotary_embedding."""

    ROLES = {"decoder": "decoder", "embed_tokens": "embed", "final_norm": "final_norm", "lm_head": "lm_head",
             "layers": "layers", "rotary_embedding": "rotary"}

    def __init__(self, model: nn.Module, spec: FamilySpec):
        super().__init__(model, spec)
        self.model = model

    def layer(self, module: nn.Module) -> Layer:
        """The `Layer` view of one decoder layer module."""
        return (self.spec.layer_class or Layer)(module, self.spec)

    def layer_views(self) -> list[Layer]:
        return [self.layer(module) for module in self.layers]

    def head_slot(self) -> tuple[nn.Module, str]:
        """(parent, attribute) of lm_head, for replacing it."""
        return _slot(self.model, self.spec.lm_head)

    def keep_layers(self, count: int) -> None:
        """Drop every decoder layer after the first `count` (benchmarks on a shallower copy)."""
        del self.layers[count:]
        self.model.config.num_hidden_layers = count

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab) from the last decoder layer's output (..., d), as the model computes them."""
        logits = self.lm_head(self.final_norm(hidden))
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def untie_embeddings(self) -> None:
        """Give lm_head its own weight so embeddings and head can be rotated differently."""
        head, embed = self.lm_head, self.embed_tokens
        if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
            head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        self.model.config.tie_word_embeddings = False
        text_config = getattr(self.model.config, "get_text_config", lambda: None)()
        if text_config is not None:
            text_config.tie_word_embeddings = False


# Qwen3's q_norm/k_norm (per head, after q/k_proj) and SmolLM3's layers without RoPE act on the projections'
# outputs: input-column folds, v rows and o columns are unaffected, so both are Llama-like.
register_family(FamilySpec(model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3")))
register_family(FamilySpec(model_types=("gemma3_text",), mlp_input_norm="pre_feedforward_layernorm",
                           attn_output_norm="post_attention_layernorm",
                           mlp_output_norm="post_feedforward_layernorm", norm_convention="plus_one"))
# OLMo-2: no pre-norms (q/k/v and gate/up read the raw residual stream), post-norms after attention and MLP.
register_family(FamilySpec(model_types=("olmo2",), attn_input_norm=None, mlp_input_norm=None,
                           attn_output_norm="post_attention_layernorm",
                           mlp_output_norm="post_feedforward_layernorm"))
register_family(FamilySpec(model_types=("phi3",), q="self_attn.qkv_proj", k=None, v=None,
                           gate="mlp.gate_up_proj", up=None, mlp_activation="mlp.activation_fn",
                           layer_class=FusedLayer))

# Mixture of experts with batched expert weights: Top-K at the attention's inputs and at every expert's inputs
# (``topk`` only: rotations and scales are not folded into batched experts).
register_family(FamilySpec(model_types=("qwen3_moe", "mixtral"), experts="mlp.experts", router="mlp.gate",
                           layer_class=ExpertsLayer, calibrated=False))


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(model: nn.Module) -> Family:
    """The `Family` for ``model.config.model_type``; a clear error for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = FAMILIES.get(model_type)
    if spec is None:
        hint = ""
        if model_type == "gemma3":
            hint = " (for Gemma-3 load the text-only model, Gemma3ForCausalLM, whose model_type is 'gemma3_text')"
        raise NotImplementedError(
            f"unsupported architecture: model_type={model_type!r} ({type(model).__name__}); "
            f"rotsparse supports {supported_model_types()}{hint}")
    family = Family(model, spec)
    try:
        family.layers, family.lm_head
    except AttributeError:
        raise TypeError(f"rotsparse needs a *ForCausalLM model with {spec.layers} and {spec.lm_head}; "
                        f"got {type(model).__name__}") from None
    missing = family.layer(family.layers[0]).missing() if len(family.layers) else []
    if missing:
        raise NotImplementedError(
            f"rotsparse cannot sparsify {type(model).__name__} (model_type={model_type!r}): its decoder layers lack "
            f"what the family mapping names: {'; '.join(missing)}")
    return family
