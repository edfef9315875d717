"""Per-family knowledge: where the norms, projections, embeddings and head of a model live.

An adapter is chosen by ``model.config.model_type`` (never by model name). Each decoder layer is seen
through a `LayerAdapter`; the rest of the library only talks to adapters, so a new family is a new
small subclass here.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerAdapter:
    """One decoder layer: pre-norms (folded), optional post-norms (kept), and the linear projections.

    Subclasses set the attribute names; `norm_scale` / `set_unit_norm` know how the family's RMSNorm
    applies its weight.
    """

    attn_input_norm_name = "input_layernorm"
    mlp_input_norm_name = "post_attention_layernorm"
    attn_output_norm_name: str | None = None
    mlp_output_norm_name: str | None = None

    def __init__(self, layer: nn.Module):
        self.layer = layer

    # modules -------------------------------------------------------------------------------
    @property
    def attn_input_norm(self) -> nn.Module:
        return getattr(self.layer, self.attn_input_norm_name)

    @property
    def mlp_input_norm(self) -> nn.Module:
        return getattr(self.layer, self.mlp_input_norm_name)

    @property
    def attn_output_norm(self) -> nn.Module | None:
        return getattr(self.layer, self.attn_output_norm_name) if self.attn_output_norm_name else None

    @property
    def mlp_output_norm(self) -> nn.Module | None:
        return getattr(self.layer, self.mlp_output_norm_name) if self.mlp_output_norm_name else None

    @property
    def qkv(self) -> list[nn.Linear]:
        attn = self.layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    @property
    def o_proj(self) -> nn.Linear:
        return self.layer.self_attn.o_proj

    @property
    def gate_up(self) -> list[nn.Linear]:
        mlp = self.layer.mlp
        return [mlp.gate_proj, mlp.up_proj]

    @property
    def down_proj(self) -> nn.Linear:
        return self.layer.mlp.down_proj

    def site_linears(self) -> dict[str, list[tuple[nn.Module, str]]]:
        """Site name -> [(parent module, attribute name)] of the linears reading that site's input."""
        attn, mlp = self.layer.self_attn, self.layer.mlp
        return {
            "h1": [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj")],
            "h2": [(attn, "o_proj")],
            "h3": [(mlp, "gate_proj"), (mlp, "up_proj")],
            "h4": [(mlp, "down_proj")],
        }

    def site_modules(self) -> dict[str, list[nn.Module]]:
        """Site name -> the linears reading that site's input, in `site_linears` order."""
        return {site: [getattr(parent, name) for parent, name in pairs] for site, pairs in self.site_linears().items()}

    # RMSNorm conventions -------------------------------------------------------------------
    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        for name in ("variance_epsilon", "eps"):
            if hasattr(norm, name):
                return float(getattr(norm, name))
        raise TypeError(f"cannot find the epsilon of norm module {type(norm).__name__}")

    @staticmethod
    def norm_scale(norm: nn.Module) -> torch.Tensor:
        """The elementwise multiplier the norm applies after normalising, shape (d,)."""
        return norm.weight.detach()

    @staticmethod
    def set_unit_norm(norm: nn.Module) -> None:
        """Make the norm a pure normalisation (its scale has been folded into the next linears)."""
        with torch.no_grad():
            norm.weight.fill_(1.0)


class GemmaLayerAdapter(LayerAdapter):
    """Gemma-3: RMSNorm multiplies by (1 + weight); sandwich norms around attention and MLP."""

    mlp_input_norm_name = "pre_feedforward_layernorm"
    attn_output_norm_name = "post_attention_layernorm"
    mlp_output_norm_name = "post_feedforward_layernorm"

    @staticmethod
    def norm_scale(norm: nn.Module) -> torch.Tensor:
        return 1.0 + norm.weight.detach().double()

    @staticmethod
    def set_unit_norm(norm: nn.Module) -> None:
        with torch.no_grad():
            norm.weight.zero_()


class ModelAdapter:
    """A causal LM: embeddings, decoder layers, final norm and head."""

    model_types: tuple[str, ...] = ()
    layer_adapter_class = LayerAdapter

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def base(self) -> nn.Module:
        return self.model.model

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.base.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.base.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab) from the last decoder layer's output (..., d), as the model computes them."""
        logits = self.lm_head(self.final_norm(hidden))
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    def layer_adapters(self) -> list[LayerAdapter]:
        return [self.layer_adapter_class(layer) for layer in self.layers]

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


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2")


class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3_text",)
    layer_adapter_class = GemmaLayerAdapter


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, Gemma3Adapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model.config.model_type``; a clear error for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter_class in ADAPTERS:
        if model_type in adapter_class.model_types:
            if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "layers"):
                raise TypeError(
                    f"rotsparse needs a *ForCausalLM model with .model.layers and .lm_head; got {type(model).__name__}"
                )
            return adapter_class(model)
    hint = ""
    if model_type == "gemma3":
        hint = " (for Gemma-3 load the text-only model, Gemma3ForCausalLM, whose model_type is 'gemma3_text')"
    raise NotImplementedError(
        f"unsupported architecture: model_type={model_type!r} ({type(model).__name__}); "
        f"rotsparse supports {supported_model_types()}{hint}"
    )
