"""Serve a saved rotsparse folder with vLLM: the ``rotsparse`` quantization method for vLLM.

vLLM (optional: ``pip install "rotsparse[vllm]"`` in an environment of its own, see docs/integration.md) finds
`register` through the ``vllm.general_plugins`` entry point in every process it starts, so
``vllm.LLM(model=DIR)`` and ``vllm serve DIR`` read a folder written by `rotsparse.save` as the sparse model:

* `RotsparseVllmConfig` is built from config.json's ``quantization_config`` (``quant_method: "rotsparse"``); it
  reads the plan (the ``"rotsparse"`` section, `rotsparse.plan`) and refuses, with the reason, what vLLM cannot
  run as saved (`check_servable`): plans with run-time rotations, squared-ReLU MLPs, mixtures of experts.
* Every linear of a decoder layer gets `RotsparseLinearMethod`, which keeps the Top-K of each token's input with
  the plan's K. vLLM fuses q/k/v into one linear and gate/up into another; the plan's K per reader linear
  becomes one K per output slice (`slice_groups`: adjacent slices with equal K share one selection and one
  product). One token (batch-1 decode) goes through rotsparse's fused Top-K GEMV (`rotsparse.kernels`);
  several tokens (prefill, batches) through the masked dense product. The lm_head and embeddings stay dense.
* Tensor parallelism: the column-parallel linears (q/k/v, gate/up) read the whole input on every rank, so
  their Top-K is exact at any TP size; the row-parallel ones (o_proj, down_proj) see a shard of their input,
  and the Top-K of the whole row would need it gathered, so a TP size > 1 is refused.

vLLM is imported inside functions only: the vLLM classes are built on first use (`vllm_classes`) and are
module attributes by name (so that vLLM can pickle the config into its engine process).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from . import kernels
from .config import SITES
from .families import FAMILIES, FamilySpec
from .plan import CONFIG_KEY, FORMAT_VERSION, QUANT_METHOD, SparsityPlan, plan_from_section, read_plan
from .topk import sparsify_activation

__all__ = ["QUANT_METHOD", "LinearSparsity", "check_servable", "linear_sparsity", "register", "slice_groups",
           "vllm_classes"]


def check_servable(plan: SparsityPlan, model_type: str) -> FamilySpec:
    """The family spec of `model_type` if vLLM can serve `plan` with this plugin; ValueError naming the reason
    otherwise (vLLM's models have no hooks for run-time rotations or a swapped MLP activation, and their
    mixtures of experts are fused kernels)."""
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise ValueError(f"rotsparse does not support model_type {model_type!r} (it supports {sorted(FAMILIES)})")
    if spec.experts is not None:
        raise ValueError(f"rotsparse cannot serve {model_type!r} with vLLM: its mixture-of-experts inputs (sites h3, "
                         f"h4) run inside vLLM's fused-MoE kernels, which have no Top-K; use transformers "
                         f"(rotsparse.load)")
    rotated = plan.rotation_layers()
    post_norms = spec.attn_output_norm is not None or spec.mlp_output_norm is not None
    if rotated is None or rotated[0] or (rotated[1] and post_norms):
        where = ("a rotated plan saved before residual bases were recorded" if rotated is None else
                 f"residual bases {list(plan.residual_bases)}")
        raise ValueError(f"rotsparse cannot serve this model with vLLM: its plan ({where}) rotates layer outputs at "
                         f"run time (rotsparse_output_rotation tensors: residual rotations between layers whose "
                         f"bases differ, or post-norm rotations), which vLLM's model code has no hook for. "
                         f"Sparsify with identity residual bases (the default of method 'auto', or 'topk') to serve "
                         f"it with vLLM, or use transformers (rotsparse.load)")
    if plan.config.mlp_activation is not None:
        raise ValueError(f"rotsparse cannot serve this model with vLLM: it was trained with mlp_activation="
                         f"{plan.config.mlp_activation!r}, and vLLM's model code runs the architecture's own MLP "
                         f"activation; use transformers (rotsparse.load)")
    weight_bits = plan.config.weight_bits  # quantized Top-K linears (qweight / qscale tensors)
    if weight_bits:
        raise ValueError(f"rotsparse cannot serve this model with vLLM: its Top-K linears hold {weight_bits}-bit "
                         f"quantized weights (qweight / qscale tensors), which this plugin does not load; use "
                         f"transformers (rotsparse.load), or sparsify without weight_bits")
    if plan.config.residual_bits:
        raise ValueError(f"rotsparse cannot serve this model with vLLM: its Top-K linears carry the dropped inputs "
                         f"through a {plan.config.residual_bits}-bit residual weight copy, which this plugin does not "
                         f"compute; use transformers (rotsparse.load), or sparsify without residual_bits")
    return spec


def slice_groups(keep_k: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """(first output row, end row, K) of each run of adjacent output slices (sizes[i] rows each) that keep the
    same K: one Top-K and one product per run."""
    if len(keep_k) != len(sizes):
        raise ValueError(f"{len(keep_k)} K values for {len(sizes)} output slices")
    groups, start = [], 0
    for k, size in zip(keep_k, sizes):
        if groups and groups[-1][2] == k:
            groups[-1][1] = start + size
        else:
            groups.append([start, start + size, k])
        start += size
    return tuple(tuple(group) for group in groups)


@dataclass(frozen=True)
class LinearSparsity:
    """What one (possibly fused) vLLM linear keeps: its input width and the K of each of its readers in the
    plan, in output order (q, k, v / gate, up; one K for an unfused or checkpoint-fused linear), and the
    plan's Q-Sparse switches (block N:M Top-K, L2 rescaling)."""

    width: int
    keep_k: tuple[int, ...]
    block_size: int = 0
    l2_rescale: bool = False


def linear_sparsity(plan: SparsityPlan, spec: FamilySpec, prefix: str,
                    packed_modules: dict[str, list[str]]) -> LinearSparsity | None:
    """The `LinearSparsity` of the vLLM linear named `prefix` (e.g. ``model.layers.3.self_attn.qkv_proj``;
    `packed_modules` is the vLLM model's ``packed_modules_mapping``, fused name -> checkpoint names), or None
    for a linear outside the decoder layers (it stays dense). ValueError for a decoder-layer linear the plan
    has no K for (a naming vLLM and the family spec do not share: serving it dense would be a different model)."""
    match = re.search(rf"(?:^|\.){re.escape(spec.layers)}\.(\d+)\.(.+)$", prefix)
    if match is None:
        return None
    index, path = int(match.group(1)), match.group(2)
    parent, _, name = path.rpartition(".")
    paths = [f"{parent}.{part}" if parent else part for part in packed_modules.get(name, [name])]
    readers = spec.reader_paths()
    found = [readers.get(part) for part in paths]
    if None in found or len({site for site, _ in found}) != 1:
        raise ValueError(f"rotsparse: vLLM linear {prefix} (checkpoint modules {paths}) is not one site's reader "
                         f"linears in the plan of family {spec.model_types[0]!r} (readers {sorted(readers)})")
    if index >= len(plan.keep_k):
        raise ValueError(f"rotsparse: vLLM linear {prefix} is in layer {index}, the plan has {len(plan.keep_k)} layers")
    site = SITES.index(found[0][0])
    count = sum(1 for reader_site, _ in readers.values() if reader_site == found[0][0])
    site_k = plan.site_reader_keep_k(index, site, count)
    return LinearSparsity(width=plan.site_sizes[index][site][0], keep_k=tuple(site_k[reader] for _, reader in found),
                          block_size=plan.config.block_size, l2_rescale=plan.config.l2_rescale)


def sparse_linear(x: torch.Tensor, weights_t: list[torch.Tensor], biases: list[torch.Tensor | None],
                  groups: tuple[tuple[int, int, int], ...], sparsity: LinearSparsity) -> torch.Tensor:
    """y (tokens, out) of x (tokens, in) through output groups (`slice_groups`) of input-major weights
    weights_t[g] (in, rows of g), each reading the Top-K of x with its K. One token with plain Top-K: the
    fused Top-K GEMV kernel, and so up to `kernels.KERNEL_MAX_TOKENS` tokens on the CPU (passes over the union
    of their kept rows); otherwise the masked dense product."""
    plain = not sparsity.block_size and not sparsity.l2_rescale and not torch.is_grad_enabled()
    one_token = x.numel() == sparsity.width
    cpu_kernel = (one_token and x.device.type == "cpu") or kernels.several_tokens_on_cpu(x, sparsity.width)
    outputs = []
    for weight_t, bias, (_, _, keep_k) in zip(weights_t, biases, groups):
        if plain and (cpu_kernel or (one_token and keep_k < sparsity.width)):  # (K = in on CPU: the dense kernel)
            outputs.append(kernels.decode_topk_gemv(x, weight_t, bias, keep_k))
        elif keep_k >= sparsity.width:
            outputs.append(torch.nn.functional.linear(x, weight_t.t(), bias))
        else:
            sparse = sparsify_activation(x, keep_k, block_size=sparsity.block_size, l2_rescale=sparsity.l2_rescale)
            outputs.append(torch.nn.functional.linear(sparse, weight_t.t(), bias))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _plan_of(hf_config, model_name: str, plan_key: str) -> SparsityPlan:
    section = getattr(hf_config, plan_key, None) if hf_config is not None else None
    if section is None:
        return read_plan(model_name)
    return plan_from_section(section, f"{model_name}/config.json")


@functools.cache
def vllm_classes() -> dict[str, type]:
    """The vLLM classes of the method (built once, on first use: they subclass vLLM's)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.parameter import ModelWeightParameter
    from vllm.model_executor.utils import set_weight_attrs

    class RotsparseLinearMethod(LinearMethodBase):
        """Top-K of every token's input with the plan's K per output slice (see the module docstring)."""

        def __init__(self, sparsity: LinearSparsity, prefix: str):
            self.sparsity, self.prefix = sparsity, prefix

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra_weight_attrs):
            if input_size_per_partition != input_size:
                raise ValueError(f"rotsparse: {self.prefix} reads a shard ({input_size_per_partition} of "
                                 f"{input_size}) of its input (a row-parallel linear with tensor parallelism > 1); "
                                 f"the per-token Top-K needs the whole input: serve with tensor_parallel_size=1")
            if input_size != self.sparsity.width:
                raise ValueError(f"rotsparse: {self.prefix} has input width {input_size}, the plan "
                                 f"{self.sparsity.width}")
            keep_k = self.sparsity.keep_k
            if len(keep_k) == 1:
                keep_k = keep_k * len(output_partition_sizes)  # a checkpoint-fused linear is one reader
            layer.rotsparse_groups = slice_groups(keep_k, tuple(output_partition_sizes))
            weight_loader = extra_weight_attrs.pop("weight_loader")
            weight = ModelWeightParameter(data=torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                                           dtype=params_dtype),
                                          input_dim=1, output_dim=0, weight_loader=weight_loader)
            layer.register_parameter("weight", weight)
            set_weight_attrs(weight, extra_weight_attrs)

        def process_weights_after_loading(self, layer) -> None:
            """Re-lay the loaded (out, in) weight out as one contiguous input-major (in, rows) tensor per group."""
            weight = layer.weight.data
            for index, (start, end, _) in enumerate(layer.rotsparse_groups):
                layer.register_parameter(f"rotsparse_weight_t{index}", torch.nn.Parameter(
                    weight[start:end].t().contiguous(), requires_grad=False))
            layer.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)

        def apply(self, layer, x, bias=None):
            groups = layer.rotsparse_groups
            weights_t = [getattr(layer, f"rotsparse_weight_t{index}") for index in range(len(groups))]
            biases = [None if bias is None else bias[start:end] for start, end, _ in groups]
            return sparse_linear(x, weights_t, biases, groups, self.sparsity)

    class RotsparseVllmConfig(QuantizationConfig):
        """vLLM's view of a saved rotsparse folder: the plan, read from config.json (see the module docstring)."""

        def __init__(self, plan_key: str = CONFIG_KEY):
            super().__init__()
            self.plan_key = plan_key
            self.plan: SparsityPlan | None = None
            self.spec: FamilySpec | None = None

        def get_name(self) -> str:
            return QUANT_METHOD

        def get_supported_act_dtypes(self) -> list[torch.dtype]:
            return [torch.float32, torch.bfloat16, torch.float16]

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []

        @classmethod
        def from_config(cls, config: dict) -> "RotsparseVllmConfig":
            version = config.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise ValueError(f"rotsparse format version {version!r} is not supported by this rotsparse (it "
                                 f"reads version {FORMAT_VERSION}); upgrade rotsparse or re-sparsify the model")
            return cls(config.get("plan_key") or CONFIG_KEY)

        def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
            """Read the plan from the model's config and check that vLLM can serve it (`check_servable`)."""
            plan = _plan_of(hf_config, model_name, self.plan_key)
            model_type = getattr(hf_config, "model_type", None)
            if model_type is None:
                raise ValueError(f"rotsparse: {model_name}: no model_type in the config")
            self.spec = check_servable(plan, model_type)
            self.plan = plan

        def get_quant_method(self, layer, prefix: str):
            if isinstance(layer, RoutedExperts):
                raise ValueError(f"rotsparse: {prefix} is a mixture of experts, which cannot be served sparse")
            if not isinstance(layer, LinearBase):
                return None  # embeddings and the lm_head: dense
            if self.plan is None:
                raise RuntimeError("rotsparse: the plan was not read (vLLM did not call maybe_update_config)")
            sparsity = linear_sparsity(self.plan, self.spec, prefix, self.packed_modules_mapping)
            if sparsity is None:
                return UnquantizedLinearMethod()
            return RotsparseLinearMethod(sparsity, prefix)

    for cls in (RotsparseLinearMethod, RotsparseVllmConfig):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable by name (module `__getattr__`)
    return {cls.__name__: cls for cls in (RotsparseLinearMethod, RotsparseVllmConfig)}


def __getattr__(name: str):
    """The vLLM classes as module attributes (`vllm_classes`), built when first asked for."""
    if name in ("RotsparseLinearMethod", "RotsparseVllmConfig"):
        return vllm_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the ``rotsparse`` quantization method with vLLM (the ``vllm.general_plugins`` entry point; vLLM
    calls it in each of its processes). Idempotent."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    register_quantization_config(QUANT_METHOD)(vllm_classes()["RotsparseVllmConfig"])
