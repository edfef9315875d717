"""Batch-1 latency and achieved bandwidth of the Triton Top-K sparse GEMV vs cuBLAS (CUDA).

For Llama-2-7B linear shapes (in x out): 4096x4096 (q/k/v/o), 4096x11008 (gate/up), 11008x4096 (down), each
dtype and sparsity, it measures (CUDA events; the median over repeats):

* ``dense F.linear``   -- cuBLAS GEMV, ``F.linear(x, W)``, W (out, in) contiguous
* ``sparse kernel``    -- ``rotsparse.kernels.topk_gemv(x, weight_t, None, K)``: Top-K selection fused into the
  Triton gather-GEMV (one launch)
* ``gather only``      -- ``index_gemv`` on precomputed indices (the same kernel reading an index array)
* ``selection only``   -- the Top-K selection alone (``topk_indices``: one program writing the indices)
* ``sparse kernel, before`` -- (with ``--before FILE``) ``topk_gemv_triton`` of another copy of
  ``triton_gemv.py`` (e.g. the committed one), timed in the same run for a side-by-side comparison

each twice: ``eager`` (one launch after another, as a Python decode loop runs them) and ``graph`` (captured in
a CUDA graph and replayed, which removes launch overhead, as a compiled/graphed decode loop runs them).
Every call reads a different weight from a pool larger than 3x the L2 cache, so weights come from HBM as in
real decoding. Bandwidth is computed on the bytes each method must read: dense ``in*out*bytes``, sparse
``K*out*bytes``. A device-to-device copy gives the machine's bandwidth ceiling.

Usage::

    python eval/bench_kernel_cuda.py            # table -> eval/results/kernel_bench_cuda.md
    git show HEAD:rotsparse/kernels/triton_gemv.py > /tmp/before.py
    python eval/bench_kernel_cuda.py --before /tmp/before.py   # + the committed kernel, same run
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from rotsparse.kernels import index_gemv, kernel_backend, topk_gemv, topk_indices

LLAMA2_7B_SHAPES = [  # (name, in, out, count per decoder layer)
    ("q/k/v/o", 4096, 4096, 4),
    ("gate/up", 4096, 11008, 2),
    ("down", 11008, 4096, 1),
]


def time_calls(calls, reps: int, graph: bool) -> float:
    """Median seconds per call of running `calls` (a list of zero-argument functions) back to back."""
    run = lambda: [call() for call in calls]  # noqa: E731
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    if graph:
        captured = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # warm-up on the side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(captured):
            run()
        run = captured.replay
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    seconds = time_calls([lambda: dst.copy_(src)], reps=20, graph=False)
    return 2 * src.numel() / seconds / 1e9


def load_before(path: str):
    """The module in `path` (a copy of rotsparse/kernels/triton_gemv.py), imported under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("triton_gemv_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_shape(n_in, n_out, dtype, sparsities, reps, pool_bytes, before=None):
    """{(method, mode): seconds per call}, {method: bytes read} for one shape and dtype."""
    es = torch.empty((), dtype=dtype).element_size()
    n_buf = max(3, -(-pool_bytes // (n_in * n_out * es)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = [torch.randn(n_out, n_in, generator=gen, device="cuda").to(dtype) for _ in range(n_buf)]
    w_t = [torch.randn(n_in, n_out, generator=gen, device="cuda").to(dtype) for _ in range(n_buf)]
    xs = [torch.randn(1, n_in, generator=gen, device="cuda").to(dtype) for _ in range(n_buf)]
    methods = {"dense F.linear": ([lambda i=i: F.linear(xs[i], w[i]) for i in range(n_buf)], n_in * n_out * es)}
    for s in sparsities:
        k = int(round(n_in * (1.0 - s)))
        idx = [topk_indices(xs[i], k) for i in range(n_buf)]
        methods[f"sparse kernel|{s}"] = ([lambda i=i, k=k: topk_gemv(xs[i], w_t[i], None, k) for i in range(n_buf)],
                                         k * n_out * es)
        if before is not None:
            methods[f"sparse kernel, before|{s}"] = (
                [lambda i=i, k=k: before.topk_gemv_triton(xs[i], w_t[i], None, k) for i in range(n_buf)], k * n_out * es)
        methods[f"gather only|{s}"] = ([lambda i=i: index_gemv(xs[i], idx[i], w_t[i]) for i in range(n_buf)],
                                       k * n_out * es)
        methods[f"selection only|{s}"] = ([lambda i=i, k=k: topk_indices(xs[i], k) for i in range(n_buf)], 0)
    times = {}
    with torch.inference_mode():
        for method, (calls, _) in methods.items():
            for graph in (False, True):
                times[(method, "graph" if graph else "eager")] = time_calls(calls, reps, graph)
    return times, {m: b for m, (_, b) in methods.items()}, n_buf


def sweep_configs(dtypes, reps: int, pool_bytes: int, sparsity: float = 0.5) -> list[str]:
    """Graph-replayed time of the gather kernel alone for a grid of tiles, and of the selection kernel for a few
    warp counts: table rows (each printed too for the selection and for the best tile of each shape)."""
    from itertools import product

    import triton

    from rotsparse.kernels.triton_gemv import GatherConfig, default_config, index_gemv_triton, select_triton

    rows = ["| shape | dtype | block_n | block_k | warps | programs/SM | stages | graph us | GB/s | default |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for dt_name in dtypes:
        dtype = getattr(torch, dt_name)
        es = dtype.itemsize
        for name, n_in, n_out, _ in LLAMA2_7B_SHAPES:
            n_buf = max(3, -(-pool_bytes // (n_in * n_out * es)))
            w_t = [torch.randn(n_in, n_out, device="cuda").to(dtype) for _ in range(n_buf)]
            xs = [torch.randn(n_in, device="cuda").to(dtype) for _ in range(n_buf)]
            k = int(round(n_in * (1.0 - sparsity)))
            idx = [topk_indices(x, k) for x in xs]
            grid = product((512, 1024), (16, 32, 64), (4, 8), (4, 8), (1, 3))
            best = None
            for config in (GatherConfig(*c) for c in grid):
                calls = [lambda i=i, c=config: index_gemv_triton(xs[i], idx[i], w_t[i], None, c)
                         for i in range(n_buf)]
                try:
                    with torch.inference_mode():
                        t = time_calls(calls, reps, graph=True)
                except triton.runtime.errors.OutOfResources:
                    continue
                best = min(best or (t, config), (t, config))
                rows.append(f"| {n_in}x{n_out} | {dt_name} | {config.block_n} | {config.block_k} | "
                            f"{config.num_warps} | {config.programs_per_sm} | {config.num_stages} | {t * 1e6:.1f} | "
                            f"{k * n_out * es / t / 1e9:.0f} | {'yes' if config == default_config(dtype) else ''} |")
            del w_t
            print(f"best tile {n_in}x{n_out} {dt_name}: {best[1]}, {best[0] * 1e6:.1f} us", flush=True)
            for warps in (8, 16, 32):  # the selection kernel's warps
                calls = [lambda i=i, w=warps: select_triton(xs[i], k, w) for i in range(n_buf)]
                with torch.inference_mode():
                    t = time_calls(calls, reps, graph=True)
                rows.append(f"| {n_in}x{n_out} | {dt_name} | selection, {warps} warps | | | | | {t * 1e6:.1f} | | |")
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="eval/results/kernel_bench_cuda.md")
    ap.add_argument("--before", default=None,
                    help="also time topk_gemv_triton of this copy of triton_gemv.py (e.g. the committed one)")
    ap.add_argument("--sweep", default=None,
                    help="also time a grid of gather tiles (first dtype only); write that table here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernel_cuda.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    pool = 3 * l2
    command = shlex.join(["python", "eval/bench_kernel_cuda.py", *(argv if argv is not None else sys.argv[1:])])
    import triton

    header = [
        f"Command: `{command}`",
        "",
        f"- GPU: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; weight pool per method "
        f">= {pool >> 20} MiB",
        f"- torch {torch.__version__}, triton {triton.__version__}, kernel backend: "
        f"{kernel_backend('cuda', torch.bfloat16)}",
        f"- device-to-device copy (read + write): {copy_bandwidth():.0f} GB/s",
        f"- median of {args.reps} timed passes over the pool (CUDA events); eager = launched one by one, "
        f"graph = replayed from a CUDA graph",
        "",
    ]
    print("\n".join(header), flush=True)
    table = ["| shape (in x out) | dtype | method | K | eager us | eager GB/s | graph us | graph GB/s "
             "| graph BW vs dense | graph speed-up vs dense | eager speed-up vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    layer = {}
    before = load_before(args.before) if args.before else None
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        for name, n_in, n_out, count in LLAMA2_7B_SHAPES:
            times, nbytes, _ = bench_shape(n_in, n_out, dtype, args.sparsity, args.reps, pool, before)
            dense = {mode: times[("dense F.linear", mode)] for mode in ("eager", "graph")}
            dense_bw = nbytes["dense F.linear"] / dense["graph"] / 1e9
            for method in nbytes:
                e, g = times[(method, "eager")], times[(method, "graph")]
                k = n_in if "|" not in method else int(round(n_in * (1 - float(method.split("|")[1]))))
                bw_e, bw_g = nbytes[method] / e / 1e9, nbytes[method] / g / 1e9
                line = (f"| {n_in}x{n_out} ({name}) | {dt_name} | {method.replace('|', ' s=')} | {k} "
                        f"| {e * 1e6:.1f} | {bw_e:.0f} | {g * 1e6:.1f} | {bw_g:.0f} | {bw_g / dense_bw:.2f} "
                        f"| {dense['graph'] / g:.2f} | {dense['eager'] / e:.2f} |")
                table.append(line)
                print(line, flush=True)
                for mode, t in (("eager", e), ("graph", g)):
                    key = (dt_name, method.replace("|", " s="), mode)
                    layer[key] = layer.get(key, 0.0) + count * t
    summary = ["", "Per Llama-2-7B decoder layer (4x q/k/v/o + 2x gate/up + 1x down), sum of median times:", "",
               "| dtype | method | eager us / layer | graph us / layer | graph speed-up vs dense "
               "| eager speed-up vs dense |", "|---|---|---|---|---|---|"]
    for (dt_name, label, mode), t in layer.items():
        if mode != "graph" or label.startswith(("selection", "gather")):
            continue
        e = layer[(dt_name, label, "eager")]
        summary.append(f"| {dt_name} | {label} | {e * 1e6:.1f} | {t * 1e6:.1f} "
                       f"| {layer[(dt_name, 'dense F.linear', 'graph')] / t:.2f} "
                       f"| {layer[(dt_name, 'dense F.linear', 'eager')] / e:.2f} |")
    print("\n".join(summary), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(["# Sparse GEMV kernel benchmark (batch 1, CUDA)", ""] + header + table + summary) + "\n")
    print(f"wrote {out}")
    if args.sweep:
        rows = sweep_configs(args.dtypes[:1], max(10, args.reps // 2), pool)
        title = ["# Gather tile sweep (s = 0.5, CUDA graph replay)", ""]
        Path(args.sweep).write_text("\n".join(title + header + rows) + "\n")
        print(f"wrote {args.sweep}")


if __name__ == "__main__":
    main()
