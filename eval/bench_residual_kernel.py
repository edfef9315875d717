"""Batch-1 latency of the residual Top-K kernel (`SparsifyConfig.residual_bits`) vs the bfloat16 dense kernel and
plain Top-K at the same bytes read (CPU).

For the Llama-2-7B linear shapes (4096x4096 q/k/v/o, 4096x11008 gate/up, 11008x4096 down), bfloat16 weights, it
times, interleaved round-robin over a weight pool larger than ``--pool-factor`` x the last-level cache (weights
come from DRAM, as in decoding):

* ``dense``        -- ``topk_gemv(x, weight_t, None, in)``: rotsparse's bf16 kernel with K = in, the fastest dense
  bf16 GEMV on these CPUs (eval/results/kernel_bench.md)
* ``topk s``       -- ``topk_gemv`` at K = round(in * (1 - s)): plain Top-K reading (1 - s) of the bytes
* ``res<B> s``     -- ``topk_residual_gemv`` with a B-bit copy at the K that reads the same bytes as ``topk s``
  (K = round(in * (1 - s / (1 - c))), c = (B + 16 / 64) / 16: the kept bf16 rows plus the dropped rows' codes and
  float16 scales)
* ``res<B>b<F> s`` -- the same with a band (``--bands``): only the largest dropped inputs, F of the input width,
  through the copy (``residual_band``; K = round(in * (1 - s - c * F)))

GB/s is computed on the bytes each call reads. Speed-ups are against ``dense``; ``vs topk`` compares the residual
kernel with plain Top-K at the same bytes (1.00: the copy costs no time beyond its bytes).

Usage (the numbers in docs/speed.md)::

    taskset -c 1 env OMP_NUM_THREADS=1 python eval/bench_residual_kernel.py --threads 1 \
        --out eval/results/residual_kernel.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

import torch

from rotsparse.config import SparsifyConfig
from rotsparse.kernels import build_extension, topk_gemv, topk_residual_gemv
from rotsparse.quantize import quantize_residual

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernel import LLAMA2_7B_SHAPES, llc_bytes, quantized_header, time_interleaved  # noqa: E402

GROUP = 64


def bench_shape(n_in: int, n_out: int, sparsities, bits_list, reps: int, pool_bytes: int, warmup: int = 3,
                bands=()):
    """{method: [seconds per call]}, {method: bytes read}, {method: K} for one shape."""
    gen = torch.Generator().manual_seed(0)
    n_buf = max(3, -(-pool_bytes // (n_in * n_out * 2)))
    x = torch.randn(1, n_in, generator=gen).to(torch.bfloat16)
    weights, copies = [], {bits: [] for bits in bits_list}
    for _ in range(n_buf):
        weight_t = (torch.randn(n_in, n_out, generator=gen) * 0.02).to(torch.bfloat16)
        weights.append(weight_t)
        for bits in bits_list:
            codes, scales = quantize_residual(weight_t, bits, GROUP)
            copies[bits].append((codes, scales))
    groups = -(-n_out // GROUP)
    methods = {"dense": (lambda i: topk_gemv(x, weights[i], None, n_in), n_in * n_out * 2, n_in)}
    for s in sparsities:
        k = int(round(n_in * (1 - s)))
        methods[f"topk {s}"] = (lambda i, k=k: topk_gemv(x, weights[i], None, k), k * n_out * 2, k)
        for bits in bits_list:
            row = groups * GROUP * bits // 8 + groups * 2
            for band in (None, *bands):
                config = SparsifyConfig(sparsity=s, residual_bits=bits, residual_band=band)
                k = int(round(n_in * (1 - config.topk_sparsity)))
                c = config.copied_inputs(n_in, k)
                name = f"res{bits} {s}" if band is None else f"res{bits}b{band:g} {s}"
                methods[name] = (
                    lambda i, k=k, bits=bits, c=c: topk_residual_gemv(x, weights[i], *copies[bits][i], None, k, bits,
                                                                      c),
                    k * n_out * 2 + c * row, k)
    times = time_interleaved({name: m[0] for name, m in methods.items()}, n_buf, reps, warmup)
    return times, {name: m[1] for name, m in methods.items()}, {name: m[2] for name, m in methods.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--bands", type=float, nargs="*", default=[], help="residual_band values to time too")
    parser.add_argument("--reps", type=int, default=10, help="passes over the pool per method")
    parser.add_argument("--pool-factor", type=float, default=2.0, help="bf16 weight pool size / last-level cache")
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    parser.add_argument("--out", default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_extension()
    command = shlex.join(["python", "eval/bench_residual_kernel.py", *(argv if argv is not None else sys.argv[1:])])
    pool = int(args.pool_factor * llc_bytes())
    lines = quantized_header(command, pool, args.reps, args.stat) + [
             f"| shape (in x out) | kernel | K | bytes vs dense | {args.stat} us | GB/s | speed-up vs dense "
             "| vs topk at the same bytes |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, n_in, n_out, _ in LLAMA2_7B_SHAPES:
        times, nbytes, ks = bench_shape(n_in, n_out, args.sparsity, args.bits, args.reps, pool, bands=args.bands)
        stat = statistics.median if args.stat == "median" else min
        value = {method: stat(v) for method, v in times.items()}
        for method, seconds in value.items():
            same_bytes = f"topk {method.split()[1]}" if method.startswith("res") else None  # (bands too)
            versus = f"{value[same_bytes] / seconds:.2f}" if same_bytes else ""
            line = (f"| {n_in}x{n_out} ({name}) | {method} | {ks[method]} | {nbytes[method] / nbytes['dense']:.3f} "
                    f"| {seconds * 1e6:.0f} | {nbytes[method] / seconds / 1e9:.1f} | {value['dense'] / seconds:.2f} "
                    f"| {versus} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
