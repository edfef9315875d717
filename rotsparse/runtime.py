"""Run-time modules of a sparsified model: `TopKLinear` at every site linear, `KernelLinear` for the head, the
output-rotation hooks (residual rotations between layers, output rotations after post-norms), the Q-Sparse
switches, and `install_topk`, which puts them into a model from its plan.

`TopKLinear` is an `nn.Linear` (same parameter names, so checkpoints keep Hugging Face keys) whose weight is
stored input-channel-major: ``weight`` is a transpose view of a contiguous (in, out) tensor, so the decode
kernel reads the surviving input channels as contiguous rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import SITES, SparsifyConfig
from .families import Family, get_family
from .kernels.build import NATIVE_DTYPES
from .kernels.reference import RESIDUAL_GROUP, group_int8_activations, residual_weight_torch, to_input_major
from .offload import adopt_hooks
from .plan import SparsityPlan
from .quantize import dequantize, quantize, quantize_residual, quantized_shapes, scale_bits, scale_values
from .topk import block_indices, block_keep, l2_rescale_factor, sparsify_activation

ROTATION_BUFFER = "rotsparse_output_rotation"


class TopKLinear(nn.Linear):
    """Linear that keeps only the `keep_k` largest-magnitude inputs of each token.

    Single-token inference (batch-1 decode) goes through the sparse kernel when `use_kernel` is set, and so do up
    to `kernels.KERNEL_MAX_TOKENS` tokens on the CPU (batched decode, short prompts: passes over the union of
    their kept rows); everything else (longer prefills, training) runs the dense-masked path, which computes
    the same function.
    With a residual copy (`attach_residual`) the `residual_copy_k` largest dropped inputs add
    ``residual_weight @ (topk(x, K + C) - topk(x, K))`` (every dropped input: ``x - topk(x)``), in the masked path
    and in the decode kernel (`kernels.topk_residual_gemv`; block mode: the masked path) alike.
    The choice depends on the input's shape and the modes only, never on values, so under `torch.compile` each
    graph takes one path without a graph break (`rotsparse.compiled`).
    """

    input_major_parameters = ("weight",)
    """Parameters laid out input-channel-major (`rotsparse.offload` keeps them so when it reloads them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, keep_k: int, site: str,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}")
        if not 0 <= keep_k <= in_features:
            raise ValueError(f"keep_k must be in [0, {in_features}], got {keep_k}")
        self.keep_k = int(keep_k)
        self.site = site
        self.use_kernel = True
        self.straight_through = True
        self.l2_rescale = False  # Q-Sparse options, set from the plan by `apply_topk_options`
        self.block_size = 0
        self.residual_bits = 0
        self.residual_copy_k = 0
        self.weight = nn.Parameter(to_input_major(self.weight), requires_grad=self.weight.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_k: int, site: str) -> "TopKLinear":
        """A TopKLinear holding (a re-laid-out copy of) `linear`'s parameters, in `linear`'s train/eval mode."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, keep_k, site, device="meta")
        module.weight = nn.Parameter(to_input_major(linear.weight), requires_grad=linear.weight.requires_grad)
        module.bias = linear.bias
        return module.train(linear.training)

    def _is_decode_step(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and not torch.is_grad_enabled() and x.numel() == self.in_features
                and not self.training and not (self.residual_bits and self.block_size))

    def _is_batched_step(self, x: torch.Tensor, max_tokens: int = kernels.KERNEL_MAX_TOKENS) -> bool:
        """A few tokens (2 to `max_tokens`: a batched decode step, a short prompt) in inference, per-token Top-K:
        the kernel reads the union of their kept rows instead of the masked product's every row (with a residual
        copy: the one-token residual kernel per token, instead of a float copy of the whole residual weight)."""
        return (self.use_kernel and not torch.is_grad_enabled() and not self.training
                and kernels.several_tokens_on_cpu(x, self.in_features, max_tokens)
                and not (self.block_size or self.l2_rescale))

    def attach_residual(self, bits: int, copy_k: int | None = None) -> None:
        """Keep a `bits`-bit copy of the weight for the `copy_k` largest inputs Top-K drops (None: all of them;
        `rotsparse.quantize.quantize_residual`, computed from the current weight): non-persistent buffers
        ``residual_codes`` (in, out * bits / 8 rounded up to whole groups) uint8 and ``residual_scales`` (in,
        groups), float16 stored as int16 bits, so that casting the model leaves them alone. Checkpoints hold the
        weight only; loading recomputes the copy."""
        dropped = self.in_features - self.keep_k
        copy_k = dropped if copy_k is None else int(copy_k)
        if not 0 <= copy_k <= dropped:
            raise ValueError(f"copy_k must be in [0, {dropped}] (the inputs Top-K drops), got {copy_k}")
        codes, scales = quantize_residual(self.weight.detach().t(), bits, RESIDUAL_GROUP)
        self.register_buffer("residual_codes", codes, persistent=False)
        self.register_buffer("residual_scales", scale_bits(scales), persistent=False)
        self.residual_bits, self.residual_copy_k = int(bits), copy_k

    def residual_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) float weight the residual copy stands for."""
        return residual_weight_torch(self.residual_codes, self.residual_scales.view(torch.float16), self.residual_bits,
                                     self.out_features, dtype).t()

    @property
    def kept_per_token(self) -> int:
        """Entries kept per token: K, or N * (width / M) in block (N:M) mode."""
        if self.block_size:
            return block_keep(self.keep_k, self.in_features, self.block_size) * (self.in_features // self.block_size)
        return self.keep_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_decode_step(x):
            return self._decode(x)
        if self._is_batched_step(x):
            if self.residual_bits:  # token by token
                tokens = x.reshape(-1, self.in_features)
                return torch.stack([self._decode(t) for t in tokens]).reshape(*x.shape[:-1], self.out_features)
            return kernels.decode_topk_gemv(x, self.weight.t(), self.bias, self.keep_k)
        if self.kept_per_token >= self.in_features:
            return F.linear(x, self.weight, self.bias)
        sparse = sparsify_activation(x, self.keep_k, block_size=self.block_size, l2_rescale=self.l2_rescale,
                                     straight_through=self.training and self.straight_through)
        output = F.linear(sparse, self.weight, self.bias)
        if self.residual_bits:
            copied = x if self.kept_per_token + self.residual_copy_k >= self.in_features else sparsify_activation(
                x, self.keep_k + self.residual_copy_k)
            output = output + F.linear(copied - sparse, self.residual_weight(x.dtype))
        return output

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token (in,) through the sparse kernel; block mode and L2 rescaling select the channels here and
        apply the per-token scale ||x|| / ||kept|| to the kernel's output before the bias."""
        weight_t = self.weight.t()
        if self.residual_bits:
            scales = self.residual_scales.view(torch.float16)
            return kernels.topk_residual_gemv(x, weight_t, self.residual_codes, scales, self.bias, self.keep_k,
                                              self.residual_bits, self.residual_copy_k)
        if not self.block_size and not self.l2_rescale:
            return kernels.decode_topk_gemv(x, weight_t, self.bias, self.keep_k)
        if self.block_size:
            indices = block_indices(x.reshape(-1), block_keep(self.keep_k, self.in_features, self.block_size),
                                    self.block_size)
        else:
            indices = kernels.topk_indices(x, self.keep_k)
        output = kernels.index_gemv(x, indices, weight_t, None)
        if self.l2_rescale:
            flat = x.reshape(-1).float()
            scale = l2_rescale_factor(flat, flat.index_select(0, indices))
            output = (output.float() * scale).to(output.dtype)
        if self.bias is not None:
            output = output + self.bias
        return output

    def extra_repr(self) -> str:
        options = ""
        if self.block_size:
            options += f", block={block_keep(self.keep_k, self.in_features, self.block_size)}:{self.block_size}"
        if self.l2_rescale:
            options += ", l2_rescale=True"
        if self.residual_bits:
            options += f", residual_bits={self.residual_bits}, residual_copy_k={self.residual_copy_k}"
        return f"{super().extra_repr()}, keep_k={self.keep_k}, site={self.site}{options}"


class QuantizedTopKLinear(TopKLinear):
    """A `TopKLinear` whose weight is stored weight-only quantized (`rotsparse.quantize`): buffers ``qweight``
    (int8 (in, out), or int4 packed two per byte along the output, (in, out / 2) uint8) and ``qscale`` (the
    scales' raw bits: int8 (out,) float32 as int32, int4 (in / group_size, out) float16 as int16), so that a
    kept input channel is one contiguous row of bytes and casting the model leaves them untouched. There is no
    ``weight`` parameter (`dequantized_weight` gives the float weight it stands for).

    Single-token inference runs the int8 / int4 Top-K kernel, and so do up to `kernels.INT8_KERNEL_MAX_TOKENS` /
    `kernels.INT4_KERNEL_MAX_TOKENS` tokens per call on the CPU; everything else (longer prefills, block or L2
    modes) the dense-masked path on the dequantized weight, the same function: with int4 weights both round the
    kept activations to int8 per weight group (`kernels.reference.group_int8_activations`; straight-through in
    training).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, keep_k: int, site: str, weight_bits: int,
                 group_size: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, keep_k, site, device="meta", dtype=dtype)
        del self.weight
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        (q_shape, q_dtype), (s_shape, s_dtype) = quantized_shapes(in_features, out_features, weight_bits, group_size)
        self.register_buffer("qweight", torch.empty(q_shape, dtype=q_dtype, device=device))
        self.register_buffer("qscale", torch.empty(s_shape, dtype=s_dtype, device=device))
        self.weight_bits, self.group_size = int(weight_bits), int(group_size)

    @classmethod
    def from_topk(cls, module: TopKLinear, weight_bits: int, group_size: int) -> "QuantizedTopKLinear":
        """`module` with its weight quantized (`rotsparse.quantize.quantize` of the input-major weight)."""
        qweight, qscale = quantize(module.weight.t(), weight_bits, group_size)
        quantized = cls(module.in_features, module.out_features, False, module.keep_k, module.site, weight_bits,
                        group_size, device="meta")
        quantized.qweight, quantized.qscale, quantized.bias = qweight, qscale, module.bias
        for name in ("use_kernel", "straight_through", "l2_rescale", "block_size"):
            setattr(quantized, name, getattr(module, name))
        return quantized.train(module.training)

    @property
    def scales(self) -> torch.Tensor:
        """The float scales (a view of ``qscale``)."""
        return scale_values(self.qscale, self.weight_bits)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) float weight the quantized one stands for."""
        return dequantize(self.qweight, self.scales, self.weight_bits, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_decode_step(x) and not self.block_size and not self.l2_rescale:
            gemv = kernels.topk_gemv_int8 if self.weight_bits == 8 else kernels.topk_gemv_int4
            return gemv(x, self.qweight, self.scales, self.bias, self.keep_k)
        if self.weight_bits == 8 and self._is_batched_step(x, kernels.INT8_KERNEL_MAX_TOKENS):
            return kernels.topk_gemv_int8(x, self.qweight, self.scales, self.bias, self.keep_k)
        if self.weight_bits == 4 and self._is_batched_step(x, kernels.INT4_KERNEL_MAX_TOKENS):
            return kernels.topk_gemv_int4(x, self.qweight, self.scales, self.bias, self.keep_k)
        weight = self.dequantized_weight(x.dtype)
        sparse = x if self.kept_per_token >= self.in_features else sparsify_activation(
            x, self.keep_k, block_size=self.block_size, l2_rescale=self.l2_rescale,
            straight_through=self.training and self.straight_through)
        if self.weight_bits == 4:
            rounded = group_int8_activations(sparse, self.group_size).to(sparse.dtype)
            sparse = sparse + (rounded - sparse).detach()
        return F.linear(sparse, weight, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.weight_bits == 4 else ""
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}{group}"


def topk_linear(linear: nn.Linear, keep_k: int, site: str, config: SparsifyConfig) -> TopKLinear:
    """The run-time module of a site linear: a `TopKLinear`, quantized if `config.weight_bits` asks for it, with a
    residual copy if `config.residual_bits` does."""
    module = TopKLinear.from_linear(linear, keep_k, site)
    if config.residual_bits:
        module.attach_residual(config.residual_bits, config.copied_inputs(module.in_features, keep_k))
    if config.weight_bits is None:
        return module
    return QuantizedTopKLinear.from_topk(module, config.weight_bits, config.group_size)


def declare_quantized(family: Family, plan: SparsityPlan) -> None:
    """Replace every site linear of an empty (meta) model by an empty `QuantizedTopKLinear` of the plan's format
    and K, so that loading a quantized checkpoint fills its buffers (`rotsparse.hf_quantizer`); `install_topk`
    keeps them."""
    config = plan.config
    for index, layer in enumerate(family.layer_views()):
        for position, site in enumerate(SITES):
            linears = layer.site_linears()[site]
            for (parent, name), keep_k in zip(linears, plan.site_reader_keep_k(index, position, len(linears))):
                linear = getattr(parent, name)
                module = QuantizedTopKLinear(linear.in_features, linear.out_features, False, keep_k, site,
                                             config.weight_bits, config.group_size, device="meta")
                module.bias = linear.bias
                setattr(parent, name, module)


class TopKSite(nn.Module):
    """Per-token Top-K of an activation that feeds batched weights rather than one linear (a mixture of experts'
    shared input, h3, or every expert's down_proj input, h4): keeps the `keep_k` largest-magnitude entries of
    each row, with the same Q-Sparse switches as `TopKLinear` (set by `apply_topk_options`). Dense-masked: no
    decode kernel. No parameters or buffers."""

    def __init__(self, in_features: int, keep_k: int, site: str):
        super().__init__()
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}")
        if not 0 <= keep_k <= in_features:
            raise ValueError(f"keep_k must be in [0, {in_features}], got {keep_k}")
        self.in_features, self.keep_k, self.site = int(in_features), int(keep_k), site
        self.straight_through = True
        self.l2_rescale = False
        self.block_size = 0

    kept_per_token = TopKLinear.kept_per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept_per_token >= self.in_features:
            return x
        return sparsify_activation(x, self.keep_k, block_size=self.block_size, l2_rescale=self.l2_rescale,
                                   straight_through=self.training and self.straight_through)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, keep_k={self.keep_k}, site={self.site}"


class TopKExperts(nn.Module):
    """Stands in for a mixture-of-experts block's batched experts (same parameters, same names and shapes:
    gate_up_proj (E, 2I, d), down_proj (E, d, I), the activation; called as ``experts(hidden (tokens, d),
    top_k_index, top_k_weights)`` by the block, whose router has already read the dense input). Every expert reads
    the Top-K of the shared input (`input_topk`, site h3) and its down_proj the Top-K of its own gated activation
    (`hidden_topk`, h4).

    The expert weights are stored input-channel-major like `TopKLinear`'s: each is a transpose view of a contiguous
    (E, d, 2I) / (E, I, d) tensor. A single-token inference step (CPU, kernel dtype, `use_kernel`) selects the
    shared input's Top-K once and runs every routed expert through the sparse kernels (`kernels.index_gemv` on
    the kept rows of gate_up, `kernels.topk_gemv` for down); everything else (prefill, batches, training, block
    or L2 modes) runs the dense-masked path, which computes the same function.
    """

    @property
    def input_major_parameters(self) -> tuple[str, ...]:
        """Parameters laid out input-channel-major, here all its own: the two expert weights (`rotsparse.offload`
        keeps them so when it reloads them)."""
        return tuple(self._parameters)

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, activation: nn.Module,
                 activation_name: str, keep_k_input: int, keep_k_hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(to_input_major(gate_up_proj), requires_grad=gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(to_input_major(down_proj), requires_grad=down_proj.requires_grad)
        self.activation_name = activation_name  # the experts' own attribute name (`ExpertsLayer.set_mlp_activation`)
        setattr(self, activation_name, activation)
        count, double_intermediate, hidden = self.gate_up_proj.shape
        self.num_experts = count
        self.use_kernel = True
        self.input_topk = TopKSite(hidden, keep_k_input, "h3")
        self.hidden_topk = TopKSite(double_intermediate // 2, keep_k_hidden, "h4")

    def _is_decode_step(self, x: torch.Tensor) -> bool:
        sites = (self.input_topk, self.hidden_topk)
        return (self.use_kernel and not torch.is_grad_enabled() and not self.training
                and x.numel() == self.input_topk.in_features and x.device.type == "cpu"
                and x.dtype in NATIVE_DTYPES and x.dtype == self.gate_up_proj.dtype == self.down_proj.dtype
                and not any(site.block_size or site.l2_rescale for site in sites)
                and self.gate_up_proj.transpose(-2, -1).is_contiguous()
                and self.down_proj.transpose(-2, -1).is_contiguous())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._is_decode_step(hidden_states):
            return self._decode(hidden_states, top_k_index, top_k_weights)
        sparse = self.input_topk(hidden_states)
        output = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:  # padding index of expert-parallel routing
                continue
            tokens, slots = torch.nonzero(top_k_index == expert, as_tuple=True)
            projected = F.linear(sparse[tokens], self.gate_up_proj[expert])
            gate, up = projected.chunk(2, dim=-1)
            activation = getattr(self, self.activation_name)
            expert_out = F.linear(self.hidden_topk(activation(gate) * up), self.down_proj[expert])
            output.index_add_(0, tokens, (expert_out * top_k_weights[tokens, slots, None]).to(output.dtype))
        return output

    def _decode(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """One token x (1, d): the shared input's Top-K indices once, then per routed expert (ascending, as the
        masked path adds them) gate_up on the kept rows, the activation, down on its hidden Top-K."""
        indices = kernels.topk_indices(x, self.input_topk.keep_k)
        gate_up_t, down_t = self.gate_up_proj.transpose(-2, -1), self.down_proj.transpose(-2, -1)
        activation = getattr(self, self.activation_name)
        weights = top_k_weights.reshape(-1)
        output = torch.zeros_like(x)
        for slot, expert in sorted(enumerate(top_k_index.reshape(-1).tolist()), key=lambda item: item[1]):
            if not 0 <= expert < self.num_experts:  # padding index of expert-parallel routing
                continue
            gate, up = kernels.index_gemv(x, indices, gate_up_t[expert], None).chunk(2, dim=-1)
            expert_out = kernels.topk_gemv(activation(gate) * up, down_t[expert], None, self.hidden_topk.keep_k)
            output += (expert_out * weights[slot:slot + 1]).to(output.dtype)  # (1,): promotes like the masked path
        return output


class KernelLinear(nn.Linear):
    """A dense `nn.Linear` (the lm_head of a sparsified model) whose single-token inference steps go through
    rotsparse's dense decode GEMV (`rotsparse.kernels.dense_gemv`, the same row-major weight: no re-layout,
    ties to the embeddings kept); everything else is `F.linear`. Same function, same parameters and names.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "KernelLinear":
        """A KernelLinear sharing `linear`'s parameter objects (no copy), in `linear`'s train/eval mode."""
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() == self.in_features and not self.training and not torch.is_grad_enabled()
                and x.device.type == "cpu" and x.dtype == self.weight.dtype and self.weight.is_contiguous()
                and not torch.is_autocast_enabled("cpu")):
            return kernels.dense_gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def install_head_kernel(family: Family) -> None:
    """Route the model's (dense) lm_head through the dense decode kernel (see `KernelLinear`).

    Done by `install_topk` (so by `sparsify`, `load` and the benchmark's kernel-dense baseline alike: the head
    costs the same in all). Idempotent; a no-op for anything but a plain `nn.Linear` (e.g. an already replaced
    head, or a quantised one).
    """
    parent, name = family.head_slot()
    head = getattr(parent, name, None)
    if type(head) is not nn.Linear:
        return
    setattr(parent, name, adopt_hooks(head, KernelLinear.from_linear(head)))


class SquaredReLU(nn.Module):
    """ReLU(x)^2: with it a gated MLP computes ReLU(x W_gate)^2 * (x W_up) (Q-Sparse's choice from scratch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def apply_topk_options(model: nn.Module, config: SparsifyConfig) -> None:
    """Make the installed Top-K sites (and MLPs) follow `config`'s Q-Sparse switches (`l2_rescale`,
    `block_size`, `mlp_activation`). Idempotent; called after the TopKLinears are installed (`install_topk`)
    and by `rotsparse.recovery.configure`."""
    sites = [m for m in model.modules() if isinstance(m, (TopKLinear, TopKSite))]
    if config.block_size:
        bad = sorted({m.in_features for m in sites if m.in_features % config.block_size})
        if bad:
            raise ValueError(f"block_size {config.block_size} does not divide the Top-K input widths {bad}")
    for module in sites:
        module.l2_rescale = bool(config.l2_rescale)
        module.block_size = int(config.block_size)
    layers = get_family(model).layer_views()
    if config.mlp_activation == "relu2":
        for layer in layers:
            if not isinstance(layer.mlp_activation, SquaredReLU):
                layer.set_mlp_activation(SquaredReLU())
    elif config.mlp_activation is None and any(isinstance(layer.mlp_activation, SquaredReLU) for layer in layers):
        raise ValueError("the MLPs already use squared ReLU; it cannot be switched back in place")


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (..., d) @ rotation (d, d); in inference a single token, or up to `kernels.KERNEL_MAX_TOKENS` on the
    CPU, go through the decode kernel at K = d."""
    rotation = rotation.to(x.dtype)
    width = rotation.shape[0]
    if (not torch.is_grad_enabled() and rotation.is_contiguous()
            and (x.numel() == width or kernels.several_tokens_on_cpu(x, width))):
        return kernels.decode_topk_gemv(x, rotation, None, rotation.shape[0])
    return x @ rotation


def _rotate_output_hook(module: nn.Module, args, output):
    rotation = getattr(module, ROTATION_BUFFER)
    if isinstance(output, tuple):
        return (rotate_rows(output[0], rotation),) + tuple(output[1:])
    return rotate_rows(output, rotation)


def attach_output_rotation(module: nn.Module, rotation: torch.Tensor) -> None:
    """Multiply `module`'s output (row vectors, last dim d) by `rotation` (d, d), kept as a buffer.

    Used for the residual rotations Q_l^T Q_{l+1} on decoder layers and for Gemma-3's post-norms.
    """
    if hasattr(module, ROTATION_BUFFER):
        raise RuntimeError(f"{type(module).__name__} already has an output rotation")
    module.register_buffer(ROTATION_BUFFER, rotation)
    module.register_forward_hook(_rotate_output_hook)


def install_topk(family: Family, plan: SparsityPlan) -> None:
    """Replace every site linear by a `TopKLinear` with the plan's K (per reader linear where the plan has
    them; a `QuantizedTopKLinear` when the plan's config has `weight_bits`) and a mixture of experts' batched experts
    by `TopKExperts` (its h3/h4 K), apply the plan's Q-Sparse switches, and route the (dense) lm_head through the
    dense decode kernel (`KernelLinear`: same weight, same function)."""
    layers = family.layer_views()
    if len(plan.keep_k) != len(layers):
        raise ValueError(f"plan has {len(plan.keep_k)} layers, model has {len(layers)}")
    for index, layer in enumerate(layers):
        for position, site in enumerate(SITES):
            linears = layer.site_linears()[site]
            for (parent, name), keep_k in zip(linears, plan.site_reader_keep_k(index, position, len(linears))):
                linear = getattr(parent, name)  # adopt_hooks: an accelerate-offloaded linear keeps its store
                if not isinstance(linear, QuantizedTopKLinear):  # (declared and loaded: `declare_quantized`)
                    setattr(parent, name, adopt_hooks(linear, topk_linear(linear, keep_k, site, plan.config)))
        experts = getattr(layer, "experts", None)  # mixture of experts (`ExpertsLayer`): h3/h4 at its inputs
        if experts is not None and not isinstance(experts, TopKExperts):
            parent, name = layer.experts_slot()
            topk_experts = TopKExperts(*layer.expert_parts(), plan.keep_k[index][2], plan.keep_k[index][3])
            setattr(parent, name, adopt_hooks(experts, topk_experts.train(experts.training)))
    apply_topk_options(family.model, plan.config)
    install_head_kernel(family)


def set_kernels(model: nn.Module, enabled: bool) -> None:
    """Switch the sparse decode kernels on or off (off: the dense-masked path, same function)."""
    for module in model.modules():
        if isinstance(module, (TopKLinear, TopKExperts)):
            module.use_kernel = enabled


def is_sparsified(model: nn.Module) -> bool:
    return any(isinstance(m, TopKLinear) for m in model.modules())
