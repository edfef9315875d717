"""Run-time sparsity: per-token Top-K linears, residual/output rotations, and the K budget.

`TopKLinear` is an `nn.Linear` (same parameter names, so checkpoints keep Hugging Face keys) whose
weight is stored input-channel-major: ``weight`` is a transpose view of a contiguous (in, out) tensor,
so the decode kernel reads the surviving input channels as contiguous rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        self.weight = nn.Parameter(to_input_major(self.weight), requires_grad=self.weight.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_k: int, site: str) -> "TopKLinear":
        """A TopKLinear holding (a re-laid-out copy of) `linear`'s parameters."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, keep_k, site, device="meta")
        module.weight = nn.Parameter(to_input_major(linear.weight), requires_grad=linear.weight.requires_grad)
        module.bias = linear.bias
        return module

    def _is_decode_step(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and not torch.is_grad_enabled() and x.numel() == self.in_features
                and not self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_k >= self.in_features:
            return F.linear(x, self.weight, self.bias)
        if self._is_decode_step(x):
            from .kernels import topk_gemv

            return topk_gemv(x, self.weight.t(), self.bias, self.keep_k)
        sparse = keep_topk(x, self.keep_k, straight_through=self.training and self.straight_through)
        return F.linear(sparse, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep_k={self.keep_k}, site={self.site}"


ROTATION_BUFFER = "rotsparse_output_rotation"


def _rotate_output_hook(module: nn.Module, args, output):
    rotation = getattr(module, ROTATION_BUFFER)
    if isinstance(output, tuple):
        return (output[0] @ rotation.to(output[0].dtype),) + tuple(output[1:])
    return output @ rotation.to(output.dtype)


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


def site_sizes_of(layer_linears: dict[str, list[nn.Linear]]) -> tuple[tuple[int, int], ...]:
    """(input width, parameters fed) of each site, in `SITES` order."""
    sizes = []
    for site in SITES:
        linears = layer_linears[site]
        widths = {linear.in_features for linear in linears}
        if len(widths) != 1:
            raise ValueError(f"linears at site {site} disagree on input width: {sorted(widths)}")
        sizes.append((widths.pop(), sum(linear.in_features * linear.out_features for linear in linears)))
    return tuple(sizes)


def is_sparsified(model: nn.Module) -> bool:
    return any(isinstance(m, TopKLinear) for m in model.modules())

