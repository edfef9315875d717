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
    attn_output_norm / mlp_output_norm: post-norms after attention / MLP (Gemma-3's sandwich norms), or None.
    mlp_activation: the gated MLP's activation attribute (swapped for squared ReLU by ``relu2``).
    layer_class: the `Layer` class that reads a decoder layer (None: `Layer`).
    """

    model_types: tuple[str, ...]
    decoder: str = "model"
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn: str = "self_attn"
    attn_input_norm: str = "input_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_input_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    mlp_activation: str = "mlp.act_fn"
    attn_output_norm: str | None = None
    mlp_output_norm: str | None = None
    norm_convention: str = "plain"
    layer_class: type | None = None

    def __post_init__(self):
        if self.norm_convention not in ("plain", "plus_one"):
            raise ValueError(f"norm_convention must be 'plain' or 'plus_one', got {self.norm_convention!r}")


FAMILIES: dict[str, FamilySpec] = {}
"""model_type -> `FamilySpec`."""


def register_family(spec: FamilySpec) -> FamilySpec:
    """Support every model_type of `spec` (replacing earlier entries for them); returns `spec`."""
    for model_type in spec.model_types:
        FAMILIES[model_type] = spec
    return spec


register_family(FamilySpec(model_types=("llama", "mistral", "qwen2")))
register_family(FamilySpec(model_types=("gemma3_text",), mlp_input_norm="pre_feedforward_layernorm",
                           attn_output_norm="post_attention_layernorm",
                           mlp_output_norm="post_feedforward_layernorm", norm_convention="plus_one"))


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
        """Site name -> [(parent module, attribute name)] of the linears reading that site's input."""
        spec = self.spec
        roles = {"h1": (spec.q, spec.k, spec.v), "h2": (spec.o,), "h3": (spec.gate, spec.up), "h4": (spec.down,)}
        return {site: [_slot(self.layer, path) for path in paths] for site, paths in roles.items()}

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
    return family
