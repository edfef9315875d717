"""Run-time sparsity: per-token Top-K linears, residual/output rotations, and the K budget.

`TopKLinear` is an `nn.Linear` (same parameter names, so checkpoints keep Hugging Face keys) whose
weight is stored input-channel-major: ``weight`` is a transpose view of a contiguous (in, out) tensor,
so the decode kernel reads the surviving input channels as contiguous rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import SITES


def keep_topk(x: torch.Tensor, keep_k: int, straight_through: bool = False) -> torch.Tensor:
    """Zero all but the `keep_k` largest |x| of every token (last dim). Shape unchanged.

    The mask is built per token (topk + scatter). With `straight_through`, the backward pass is the
    identity (Q-Sparse's STE): x + (topk(x) - x).detach().
    """
    width = x.shape[-1]
    if not 0 <= keep_k <= width:
        raise ValueError(f"keep_k must be in [0, {width}], got {keep_k}")
    if keep_k == width:
        return x
    if keep_k == 0:
        sparse = torch.zeros_like(x)
    else:
        indices = x.detach().abs().topk(keep_k, dim=-1, sorted=False).indices
        sparse = torch.zeros_like(x).scatter(-1, indices, x.gather(-1, indices))
    if straight_through:
        return x + (sparse - x).detach()
    return sparse


def block_keep(keep_k: int, width: int, block_size: int) -> int:
    """N of block (N:M) Top-K for a site that keeps `keep_k` of `width` entries: round(K * M / width)."""
    if block_size < 1 or width % block_size:
        raise ValueError(f"block_size {block_size} must divide the input width {width}")
    return min(block_size, max(0, int(round(keep_k * block_size / width))))


def keep_topk_blocks(x: torch.Tensor, keep_n: int, block_size: int, straight_through: bool = False) -> torch.Tensor:
    """Block (N:M) Top-K: in every run of `block_size` consecutive entries of the last dim keep the `keep_n`
    largest |x|, per token (Block Q-Sparse). Shape unchanged; `straight_through` as in `keep_topk`."""
    width = x.shape[-1]
    if block_size < 1 or width % block_size:
        raise ValueError(f"block_size {block_size} must divide the last dimension {width}")
    if not 0 <= keep_n <= block_size:
        raise ValueError(f"keep_n must be in [0, {block_size}], got {keep_n}")
    if keep_n == block_size:
        return x
    blocks = x.unflatten(-1, (width // block_size, block_size))
    if keep_n == 0:
        sparse = torch.zeros_like(x)
    else:
        indices = blocks.detach().abs().topk(keep_n, dim=-1, sorted=False).indices
        sparse = torch.zeros_like(blocks).scatter(-1, indices, blocks.gather(-1, indices)).flatten(-2)
    if straight_through:
        return x + (sparse - x).detach()
    return sparse


def l2_rescale_factor(x: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Per-token ||x|| / ||sparse|| (shape (..., 1), float32; 1 where nothing was kept)."""
    full = x.float().norm(dim=-1, keepdim=True)
    kept = sparse.float().norm(dim=-1, keepdim=True)
    return torch.where(kept > 0, full / kept.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(kept))


def sparsify_activation(x: torch.Tensor, keep_k: int, *, block_size: int = 0, l2_rescale: bool = False,
                        straight_through: bool = False) -> torch.Tensor:
    """The Top-K site function: per-token Top-K (or block N:M Top-K when `block_size` > 0, with
    N = `block_keep(keep_k, width, block_size)`), optionally rescaled per token to the L2 norm of `x`
    (Q-Sparse). With `straight_through` the whole function has an identity backward (STE)."""
    if block_size:
        sparse = keep_topk_blocks(x, block_keep(keep_k, x.shape[-1], block_size), block_size)
    else:
        sparse = keep_topk(x, keep_k)
    if sparse is x:
        return x
    if l2_rescale:
        sparse = sparse * l2_rescale_factor(x, sparse).to(sparse.dtype)
    if straight_through:
        return x + (sparse - x).detach()
    return sparse


def to_input_major(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) weight as the transpose view of a contiguous (in, out) tensor."""
    return weight.detach().t().contiguous().t()


class TopKLinear(nn.Linear):
    """Linear that keeps only the `keep_k` largest-magnitude inputs of each token.

    Single-token inference (batch-1 decode) goes through the sparse kernel when `use_kernel` is set;
    everything else runs the dense-masked path, which computes the same function.
    """

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
                and not self.training)

    @property
    def kept_per_token(self) -> int:
        """Entries kept per token: K, or N * (width / M) in block (N:M) mode."""
        if self.block_size:
            return block_keep(self.keep_k, self.in_features, self.block_size) * (self.in_features // self.block_size)
        return self.keep_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_decode_step(x):
            return self._decode(x)
        if self.kept_per_token >= self.in_features:
            return F.linear(x, self.weight, self.bias)
        sparse = sparsify_activation(x, self.keep_k, block_size=self.block_size, l2_rescale=self.l2_rescale,
                                     straight_through=self.training and self.straight_through)
        return F.linear(sparse, self.weight, self.bias)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token through the sparse kernel; block mode and L2 rescaling select the channels here and
        apply the per-token scale ||x|| / ||kept|| to the kernel's output before the bias."""
        weight_t = self.weight.t()
        if not self.block_size and not self.l2_rescale:
            return kernels.decode_topk_gemv(x, weight_t, self.bias, self.keep_k)
        if self.block_size:
            indices = _block_indices(x.reshape(-1), block_keep(self.keep_k, self.in_features, self.block_size),
                                     self.block_size)
        else:
            indices = kernels.topk_indices(x, self.keep_k)
        output = kernels.index_gemv(x, indices, weight_t, None)
        if self.l2_rescale:
            flat = x.reshape(-1).float()
            kept = flat.index_select(0, indices).norm()
            scale = torch.where(kept > 0, flat.norm() / kept.clamp_min(torch.finfo(torch.float32).tiny),
                                torch.ones_like(kept))
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
        return f"{super().extra_repr()}, keep_k={self.keep_k}, site={self.site}{options}"


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


def install_head_kernel(model: nn.Module, name: str = "lm_head") -> None:
    """Route `model`'s (dense) `name` linear through the dense decode kernel (see `KernelLinear`).

    Done by `sparsify`/`load` (via `rotsparse.api.install_topk`) and hence by the kernel-dense baseline of
    the benchmark alike, so the head costs the same in both. Idempotent; a no-op for anything but a plain
    `nn.Linear` (e.g. an already replaced head, or a quantised one).
    """
    from .offload import adopt_hooks

    head = getattr(model, name, None)
    if type(head) is not nn.Linear:
        return
    setattr(model, name, adopt_hooks(head, KernelLinear.from_linear(head)))


def _block_indices(x: torch.Tensor, keep_n: int, block_size: int) -> torch.Tensor:
    """Ascending indices of the entries block (N:M) Top-K keeps in one token x (width,)."""
    blocks = x.view(-1, block_size)
    offsets = torch.arange(0, x.numel(), block_size, device=x.device).unsqueeze(-1)
    return (blocks.abs().topk(keep_n, dim=-1, sorted=False).indices + offsets).flatten().sort().values


class SquaredReLU(nn.Module):
    """ReLU(x)^2: with it a gated MLP computes ReLU(x W_gate)^2 * (x W_up) (Q-Sparse's choice from scratch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def _gated_mlps(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if all(hasattr(m, name) for name in ("act_fn", "gate_proj", "up_proj", "down_proj"))]


def apply_topk_options(model: nn.Module, config) -> None:
    """Make the installed Top-K sites (and MLPs) follow `config`'s Q-Sparse switches.

    config: a `SparsifyConfig` (its `l2_rescale`, `block_size`, `mlp_activation`). Idempotent; called after
    the TopKLinears are installed (sparsify and load) and by `rotsparse.recovery.configure`.
    """
    sites = [m for m in model.modules() if isinstance(m, TopKLinear)]
    if config.block_size:
        bad = sorted({m.in_features for m in sites if m.in_features % config.block_size})
        if bad:
            raise ValueError(f"block_size {config.block_size} does not divide the Top-K input widths {bad}")
    for module in sites:
        module.l2_rescale = bool(config.l2_rescale)
        module.block_size = int(config.block_size)
    mlps = _gated_mlps(model)
    if config.mlp_activation == "relu2":
        if not mlps:
            raise ValueError("mlp_activation='relu2' needs gated MLPs (gate_proj, up_proj, down_proj, act_fn)")
        for mlp in mlps:
            if not isinstance(mlp.act_fn, SquaredReLU):
                mlp.act_fn = SquaredReLU()
    elif config.mlp_activation is None and any(isinstance(mlp.act_fn, SquaredReLU) for mlp in mlps):
        raise ValueError("the MLPs already use squared ReLU; it cannot be switched back in place")


ROTATION_BUFFER = "rotsparse_output_rotation"


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (..., d) @ rotation (d, d); a single inference token goes through the dense decode kernel."""
    rotation = rotation.to(x.dtype)
    if x.numel() == rotation.shape[0] and not torch.is_grad_enabled() and rotation.is_contiguous():
        return kernels.decode_topk_gemv(x, rotation, None, rotation.shape[0])
    return x @ rotation


def _rotate_output_hook(module: nn.Module, args, output):
    rotation = getattr(module, ROTATION_BUFFER)
    if isinstance(output, tuple):
        return (rotate_rows(output[0], rotation),) + tuple(output[1:])
    return rotate_rows(output, rotation)


def attach_output_rotation(module: nn.Module, rotation: torch.Tensor) -> None:
    """Multiply `module`'s output (row vectors, last dim d) by `rotation` (d, d), kept as a buffer.

    Used for the residual adapters Q_l^T Q_{l+1} on decoder layers and for Gemma-3's post-norms.
    """
    if hasattr(module, ROTATION_BUFFER):
        raise RuntimeError(f"{type(module).__name__} already has an output rotation")
    module.register_buffer(ROTATION_BUFFER, rotation)
    module.register_forward_hook(_rotate_output_hook)


def allocate_keep_k(site_sizes: list[tuple[tuple[int, int], ...]], sparsity: float,
                    coefficients: tuple[float, ...]) -> tuple[tuple[int, ...], ...]:
    """K per site per layer so that the parameter-weighted sparsity equals `sparsity`.

    site_sizes[l][s] = (input width, parameters fed). Site s gets sparsity min(alpha * c_s * sparsity, 1)
    with one alpha for the whole model, found by bisection; K is then rounded (within one column).
    """
    if sparsity == 0:
        return tuple(tuple(width for width, _ in layer) for layer in site_sizes)
    total = sum(params for layer in site_sizes for _, params in layer)

    def weighted_sparsity(alpha: float) -> float:
        return sum(params * min(alpha * c * sparsity, 1.0)
                   for layer in site_sizes for c, (_, params) in zip(coefficients, layer)) / total

    low, high = 0.0, 1.0
    while weighted_sparsity(high) < sparsity:
        high *= 2
        if high > 1e6:
            raise ValueError(f"cannot reach sparsity {sparsity} with site coefficients {coefficients}")
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if weighted_sparsity(middle) < sparsity else (low, middle)
    alpha = (low + high) / 2
    return tuple(
        tuple(int(round(width * (1.0 - min(alpha * c * sparsity, 1.0)))) for c, (width, _) in zip(coefficients, layer))
        for layer in site_sizes
    )


def reader_sizes_of(layer_linears: dict[str, list[nn.Linear]]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(input width, parameters) of every reader linear of each site, in `SITES` order (h1: q, k, v; h3: gate,
    up: the layer adapter's order)."""
    sizes = []
    for site in SITES:
        linears = layer_linears[site]
        widths = {linear.in_features for linear in linears}
        if len(widths) != 1:
            raise ValueError(f"linears at site {site} disagree on input width: {sorted(widths)}")
        sizes.append(tuple((linear.in_features, linear.in_features * linear.out_features) for linear in linears))
    return tuple(sizes)


def site_sizes_of(layer_linears: dict[str, list[nn.Linear]]) -> tuple[tuple[int, int], ...]:
    """(input width, parameters fed) of each site, in `SITES` order."""
    return site_sizes_from_readers(reader_sizes_of(layer_linears))


def site_sizes_from_readers(layer_readers: tuple[tuple[tuple[int, int], ...], ...]) -> tuple[tuple[int, int], ...]:
    """One layer's (input width, parameters fed) per site from its `reader_sizes_of`."""
    return tuple((readers[0][0], sum(params for _, params in readers)) for readers in layer_readers)


def is_sparsified(model: nn.Module) -> bool:
    return any(isinstance(m, TopKLinear) for m in model.modules())

