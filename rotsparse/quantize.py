"""Weight-only quantization of the Top-K linears (`SparsifyConfig.weight_bits`), as pure tensor functions.

Symmetric absmax quantization, no zero point, computed in float64 and cast once, on the input-channel-major
weight ``weight_t`` (in, out) that the decode kernels read (rotsparse/kernels/topk_gemv.cpp):

* int8: ``q`` (in, out) int8 in [-127, 127] and one float32 scale per output column, ``absmax / 127``.
* int4: values in [-8, 7] with one float16 scale per (group of `group_size` input channels, output column),
  ``absmax / 7.5`` (the symmetric mapping of torchao's ``choose_qparams_affine``), stored as nibbles ``q + 8``
  packed two per byte along the output dimension (`rotsparse.kernels.reference.pack_int4`): (in, out / 2) uint8
  and scales (in / group_size, out).

Scales are stored as the raw bits of their float dtype in an integer tensor (`scale_bits` / `scale_values`), so
that casting a model (``model.to(torch.bfloat16)``, transformers' ``dtype=`` when loading) never rounds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import WEIGHT_BITS
from .kernels.reference import int4_weight, pack_int4

SCALE_DTYPES = {8: torch.float32, 4: torch.float16}
"""Float dtype of the scales of each format."""
_BITS_DTYPES = {torch.float32: torch.int32, torch.float16: torch.int16}


def scale_bits(scales: Tensor) -> Tensor:
    """Float scales as their raw bits (int32 for float32, int16 for float16): the stored form."""
    return scales.view(_BITS_DTYPES[scales.dtype])


def scale_values(bits: Tensor, weight_bits: int) -> Tensor:
    """Inverse of `scale_bits`: the float scales of a `weight_bits` format (a view, no copy)."""
    return bits.view(SCALE_DTYPES[weight_bits])


def quantize_int8(weight_t: Tensor) -> tuple[Tensor, Tensor]:
    """(in, out) float -> (q (in, out) int8, scale (out,) float32): symmetric per output column."""
    weight = weight_t.detach().double()
    scale = (weight.abs().amax(0) / 127).float().clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(weight / scale.double()).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_int4(weight_t: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(in, out) float -> (packed (in, out / 2) uint8, scales (in / group_size, out) float16): symmetric per group
    of `group_size` consecutive input channels and output column. ValueError if `group_size` does not divide in,
    out is odd, or a scale does not fit float16."""
    n_in, n_out = weight_t.shape
    if group_size < 1 or n_in % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the input width {n_in}")
    if n_out % 2:
        raise ValueError(f"int4 packs two output columns per byte; the output width {n_out} is odd")
    groups = weight_t.detach().double().reshape(n_in // group_size, group_size, n_out)
    absmax = groups.abs().amax(1)
    if absmax.max() / 7.5 > torch.finfo(torch.float16).max:
        raise ValueError(f"weights up to {absmax.max().item():.3g} do not fit int4 with float16 scales")
    scales = (absmax / 7.5).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    q = torch.round(groups / scales.double().unsqueeze(1)).clamp(-8, 7) + 8
    return pack_int4(q.reshape(n_in, n_out).to(torch.uint8)).contiguous(), scales


def quantize(weight_t: Tensor, weight_bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(qweight, scale bits) of `weight_t` (in, out) in the `weight_bits` format (`group_size`: int4 only)."""
    if weight_bits == 8:
        q, scales = quantize_int8(weight_t)
    elif weight_bits == 4:
        q, scales = quantize_int4(weight_t, group_size)
    else:
        raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
    return q, scale_bits(scales)


def dequantize(qweight: Tensor, scales: Tensor, weight_bits: int, dtype: torch.dtype) -> Tensor:
    """The (in, out) weight a quantized one stands for, in `dtype`; `scales` as floats (`scale_values`)."""
    if weight_bits == 8:  # int8 times a float32 scale: one rounding in float32 or wider
        wide = torch.promote_types(dtype, torch.float32)
        return (qweight.to(wide) * scales.to(wide)).to(dtype)
    return int4_weight(qweight, scales, dtype)


def quantized_shapes(in_features: int, out_features: int, weight_bits: int, group_size: int):
    """((qweight shape, dtype), (scale bits shape, dtype)) of a quantized (in, out) weight."""
    if weight_bits == 8:
        return ((in_features, out_features), torch.int8), ((out_features,), torch.int32)
    return ((in_features, out_features // 2), torch.uint8), ((in_features // group_size, out_features), torch.int16)


def quantize_residual(weight_t: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(in, out) float -> (codes (in, ceil(out / group_size) * group_size * bits / 8) uint8, scales
    (in, ceil(out / group_size)) float16): the low-bit copy that carries the inputs Top-K drops
    (`SparsifyConfig.residual_bits`).

    Per input channel (one row of `weight_t`, so a dropped channel reads one contiguous row) and group of
    `group_size` output columns: a value is ``(c - (2**bits - 1) / 2) * scale`` with a code c in [0, 2**bits);
    the scale is the least-squares one for its codes, refined from ``absmax / ((2**bits - 1) / 2)`` by Lloyd
    iterations (for 1 bit: codes are the signs and the scale 2 * mean |w|). Output columns past `out` are
    zero-padded to a whole group. Codes are packed 8 / bits per byte, the first in the low bits; the weight the copy
    stands for is `rotsparse.kernels.reference.residual_weight_torch`.
    """
    if bits not in (1, 2):
        raise ValueError(f"residual bits must be 1 or 2, got {bits!r}")
    n_in, n_out = weight_t.shape
    groups = -(-n_out // group_size)
    pad = groups * group_size - n_out
    weight = torch.nn.functional.pad(weight_t.detach().double(), (0, pad)).reshape(n_in, groups, group_size)
    real = torch.nn.functional.pad(torch.ones(n_out, dtype=torch.float64), (0, pad)).reshape(groups, group_size)
    top, centre = 2 ** bits - 1, (2 ** bits - 1) / 2
    scale = weight.abs().amax(-1, keepdim=True) / centre
    for _ in range(8 if bits > 1 else 1):
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (weight >= 0).double() if bits == 1 else torch.clamp(torch.round(weight / safe + centre), 0, top)
        levels = (codes - centre) * real
        scale = (weight * levels).sum(-1, keepdim=True) / (levels * levels).sum(-1, keepdim=True)
    scales = scale.squeeze(-1).to(torch.float16)
    codes = codes.to(torch.uint8).reshape(n_in, -1, 8 // bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    packed = (codes << shifts).sum(-1, dtype=torch.uint8)
    return packed.contiguous(), scales

