"""Batch-1 latency of the int8 / int4 Top-K decode kernels vs their dense forms and the bfloat16 dense kernel (CPU).

For the Llama-2-7B linear shapes (in x out: 4096x4096 q/k/v/o, 4096x11008 gate/up, 11008x4096 down) it times,
interleaved round-robin over a weight pool larger than ``--pool-factor`` x the last-level cache (so weights come
from DRAM as in real decoding):

* ``bf16 dense``   -- ``topk_gemv(x, weight_t, None, in)``: rotsparse's bfloat16 kernel with K = in (the fastest
  dense bf16 GEMV on these CPUs)
* ``int8 dense`` / ``int4 dense`` -- ``topk_gemv_int8`` / ``topk_gemv_int4`` with K = in (same code, all rows)
* ``int8 sparse`` / ``int4 sparse`` at each sparsity -- the same kernels with K = round(in * (1 - s)), Top-K
  selection of the bfloat16 activation included

GB/s is computed on the bytes each call must read: int8 ``K * out`` + the ``out`` float32 scales; int4
``K * out / 2`` + the float16 scale rows of every group (all groups hold a kept channel at these sparsities);
bf16 ``in * out * 2``. The table reports, per shape, GB/s, the sparse kernel's GB/s as a fraction of its dense
form's, and the speed-ups of each kernel over the int dense form and over bf16 dense (median times, or with
``--stat min`` the fastest call of each, for a machine shared with other jobs).

Usage (one thread pinned to one core; the numbers in eval/results/quantized.md)::

    taskset -c 1 env OMP_NUM_THREADS=1 python eval/bench_quantized_kernel.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

import torch

from rotsparse.kernels import build_extension, topk_gemv, topk_gemv_int4, topk_gemv_int8
from rotsparse.quantize import quantize_int4, quantize_int8

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernel import LLAMA2_7B_SHAPES, llc_bytes, quantized_header, time_interleaved  # noqa: E402


def bench_shape(n_in: int, n_out: int, sparsities, group_size: int, reps: int, pool_bytes: int, warmup: int = 3):
    """{method: [seconds per call]} and {method: bytes read} for one shape."""
    gen = torch.Generator().manual_seed(0)
    n_buf = max(3, -(-pool_bytes // (n_in * n_out * 2)))
    x = torch.randn(1, n_in, generator=gen).to(torch.bfloat16)
    bf16, int8, int4 = [], [], []
    for _ in range(n_buf):
        weight_t = (torch.randn(n_in, n_out, generator=gen) * 0.02).to(torch.bfloat16)
        bf16.append(weight_t)
        int8.append(quantize_int8(weight_t))
        int4.append(quantize_int4(weight_t, group_size))
    scale4 = n_in // group_size * n_out * 2
    methods = {"bf16 dense": (lambda i: topk_gemv(x, bf16[i], None, n_in), n_in * n_out * 2)}
    ks = [n_in] + [int(round(n_in * (1 - s))) for s in sparsities]
    for label, k in zip(["dense"] + [f"sparse s={s}" for s in sparsities], ks):
        methods[f"int8 {label}"] = (lambda i, k=k: topk_gemv_int8(x, *int8[i], None, k), k * n_out + 4 * n_out)
        methods[f"int4 {label}"] = (lambda i, k=k: topk_gemv_int4(x, *int4[i], None, k), k * n_out // 2 + scale4)
    times = time_interleaved({name: fn for name, (fn, _) in methods.items()}, n_buf, reps, warmup)
    return times, {name: nbytes for name, (_, nbytes) in methods.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20, help="passes over the weight pool per method")
    parser.add_argument("--pool-factor", type=float, default=2.0, help="bf16 weight pool size / last-level cache")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic of the times (min: the least disturbed call, for busy machines)")
    parser.add_argument("--out", default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_extension()
    command = shlex.join(["python", "eval/bench_quantized_kernel.py", *(argv if argv is not None else sys.argv[1:])])
    pool = int(args.pool_factor * llc_bytes())
    lines = quantized_header(command, pool, args.reps, args.stat, f"; int4 group size {args.group_size}") + [
             f"| shape (in x out) | kernel | K | {args.stat} us | GB/s | GB/s vs its dense | speed-up vs its dense "
             "| speed-up vs bf16 dense |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, n_in, n_out, _ in LLAMA2_7B_SHAPES:
        times, nbytes = bench_shape(n_in, n_out, args.sparsity, args.group_size, args.reps, pool)
        stat = statistics.median if args.stat == "median" else min
        median = {method: stat(values) for method, values in times.items()}
        for method, seconds in median.items():
            bits = method.split()[0]
            dense = f"{bits} dense"
            bandwidth = nbytes[method] / seconds / 1e9
            dense_bandwidth = nbytes[dense] / median[dense] / 1e9
            k = n_in if "sparse" not in method else int(round(n_in * (1 - float(method.split("s=")[1]))))
            line = (f"| {n_in}x{n_out} ({name}) | {method} | {k} | {seconds * 1e6:.0f} | {bandwidth:.1f} "
                    f"| {bandwidth / dense_bandwidth:.2f} | {median[dense] / seconds:.2f} "
                    f"| {median['bf16 dense'] / seconds:.2f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
