"""Several tokens per call (batched decode, short prompts): the Top-K kernel vs the masked product vs dense (CPU).

For the Llama-2-7B linear shapes (4096x4096 q/k/v/o, 4096x11008 gate/up, 11008x4096 down) and M tokens per call,
it times, interleaved round-robin over a weight pool larger than ``--pool-factor`` x the last-level cache (weights
come from DRAM, as in decoding):

* ``torch dense``  -- ``F.linear(x, W)``, W (out, in) contiguous: a dense Hugging Face model's linear
* ``masked s``     -- ``F.linear(topk_mask(x, K), weight_t.t())``: what a `TopKLinear` runs above
  ``kernels.KERNEL_MAX_TOKENS`` tokens or with its kernels off (its weight is input-major)
* ``kernel dense`` -- ``topk_gemv(x, weight_t, None, in)``: rotsparse's kernel at K = in
* ``kernel s``     -- ``topk_gemv(x, weight_t, None, K)``, K = round(in * (1 - s)): every token's Top-K, one pass
  over the union of the M tokens' kept rows (up to 8 tokens per pass)

``--dtypes int8 int4``: the same with `weight_bits=8` / `weight_bits=4` weights (``--group-size`` input channels per
int4 scale; bfloat16 activations; ``kernel``: `topk_gemv_int8` / `topk_gemv_int4`; ``masked``: the weight
dequantized per call, then the masked product -- for int4 of the kept activations rounded to int8 per group, the
kernel's function -- as `QuantizedTopKLinear` runs it above its kernel's token limit).

x: M independent standard-normal tokens, so the union of their kept rows is as large as it gets (``rows read``:
its share of ``in``, averaged); a real batch's tokens share their large channels, and read fewer.

Usage (the numbers in docs/speed.md)::

    taskset -c 0,1 python eval/bench_batch_kernel.py --threads 2 --out eval/results/batch_kernel.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

import torch

from rotsparse.kernels import build_extension, topk_gemv, topk_gemv_int4, topk_gemv_int8, topk_indices, topk_mask
from rotsparse.kernels.reference import group_int8_activations
from rotsparse.quantize import dequantize, quantize_int4, quantize_int8

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernel import LLAMA2_7B_SHAPES, llc_bytes, quantized_header, time_interleaved  # noqa: E402


PASS_TOKENS = 8
"""Tokens per pass of the C++ kernel over the union of their kept rows."""


def union_share(x: torch.Tensor, keep_k: int) -> float:
    """Mean over passes of PASS_TOKENS tokens of |union of their kept rows| / in."""
    shares = []
    for start in range(0, x.shape[0], PASS_TOKENS):
        rows = set()
        for token in x[start:start + PASS_TOKENS]:
            rows.update(topk_indices(token, keep_k).tolist())
        shares.append(len(rows) / x.shape[1])
    return statistics.mean(shares)


def bench_shape(n_in: int, n_out: int, weights_name: str, tokens: list[int], sparsities: list[float], reps: int,
                pool_bytes: int, group_size: int = 32) -> list[dict]:
    """weights_name: a float dtype, or "int8" / "int4" (`weight_bits` 8 / 4: bfloat16 activations, the kernel on
    the quantized rows, the masked product on the weight dequantized per call, as `QuantizedTopKLinear` runs it)."""
    int8, int4 = weights_name == "int8", weights_name == "int4"
    dtype = torch.bfloat16 if int8 or int4 else getattr(torch, weights_name)
    size = n_in * n_out * (1 if int8 else 0.5 if int4 else torch.empty((), dtype=dtype).element_size())
    size = int(size)
    n_buf = max(3, -(-pool_bytes // size))
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n_out, n_in, generator=generator) / n_in ** 0.5).to(dtype) for _ in range(n_buf)]
    if int8:
        quantized = [quantize_int8(weight.t()) for weight in weights]

        def gemv(x, i, k):
            return topk_gemv_int8(x, *quantized[i], None, k)

        def masked_product(x, i, k):
            return torch.nn.functional.linear(topk_mask(x, k), dequantize(*quantized[i], 8, dtype).t())
    elif int4:
        quantized = [quantize_int4(weight.t(), group_size) for weight in weights]

        def gemv(x, i, k):
            return topk_gemv_int4(x, *quantized[i], None, k)

        def masked_product(x, i, k):
            kept = group_int8_activations(topk_mask(x, k), group_size).to(dtype)
            return torch.nn.functional.linear(kept, dequantize(*quantized[i], 4, dtype).t())
    else:
        weights_t = [weight.t().contiguous() for weight in weights]

        def gemv(x, i, k):
            return topk_gemv(x, weights_t[i], None, k)

        def masked_product(x, i, k):
            return torch.nn.functional.linear(topk_mask(x, k), weights_t[i].t())
    rows = []
    for count in tokens:
        x = torch.randn(count, n_in, generator=generator).to(dtype)
        calls = {"torch dense": lambda i: torch.nn.functional.linear(x, weights[i]),
                 "kernel dense": lambda i: gemv(x, i, n_in)}
        for sparsity in sparsities:
            keep_k = int(round(n_in * (1 - sparsity)))
            calls[f"masked {sparsity:g}"] = lambda i, k=keep_k: masked_product(x, i, k)
            calls[f"kernel {sparsity:g}"] = lambda i, k=keep_k: gemv(x, i, k)
        times = {name: statistics.median(values) * 1e3
                 for name, values in time_interleaved(calls, n_buf, reps).items()}
        for sparsity in sparsities:
            keep_k = int(round(n_in * (1 - sparsity)))
            kernel, masked = times[f"kernel {sparsity:g}"], times[f"masked {sparsity:g}"]
            rows.append({"shape": f"{n_in}x{n_out}", "dtype": weights_name, "tokens": count,
                         "sparsity": sparsity, "rows_read": union_share(x, keep_k),
                         "torch_dense_ms": times["torch dense"], "kernel_dense_ms": times["kernel dense"],
                         "masked_ms": masked, "kernel_ms": kernel, "vs_masked": masked / kernel,
                         "vs_torch_dense": times["torch dense"] / kernel,
                         "vs_kernel_dense": times["kernel dense"] / kernel})
            print(" ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in rows[-1].items()), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        help="weights: float dtypes, or int8 / int4 (weight_bits 8 / 4, bfloat16 activations)")
    parser.add_argument("--group-size", type=int, default=32, help="int4: input channels per scale")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--reps", type=int, default=10, help="passes over the weight pool per method")
    parser.add_argument("--pool-factor", type=float, default=3.0, help="weight pool size / last-level cache")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_extension()
    pool = int(args.pool_factor * llc_bytes())
    rows = []
    for weights_name in args.dtypes:
        for _, n_in, n_out, _ in LLAMA2_7B_SHAPES:
            rows += bench_shape(n_in, n_out, weights_name, args.tokens, args.sparsity, args.reps, pool,
                                args.group_size)
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    lines = ["# Several tokens per call: Top-K kernel vs masked product vs dense", "",
             *quantized_header(command, pool, args.reps, "median"),
             "ms per call (median); `rows read`: share of the input rows in the union of the tokens' kept rows "
             "(independent random tokens: the largest union).", "",
             "| dtype | shape | tokens | sparsity | rows read | torch dense | kernel dense | masked | **kernel** | "
             "kernel vs masked | vs torch dense | vs kernel dense |", "|" + "---|" * 12]
    for row in rows:
        lines.append(f"| {row['dtype']} | {row['shape']} | {row['tokens']} | {row['sparsity']:.0%} | "
                     f"{row['rows_read']:.2f} | {row['torch_dense_ms']:.2f} | {row['kernel_dense_ms']:.2f} | "
                     f"{row['masked_ms']:.2f} | **{row['kernel_ms']:.2f}** | {row['vs_masked']:.2f}x | "
                     f"{row['vs_torch_dense']:.2f}x | {row['vs_kernel_dense']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
