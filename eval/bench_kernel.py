"""Batch-1 latency of the Top-K sparse GEMV kernel vs dense PyTorch (CPU).

For Llama-2-7B linear shapes (in x out): 4096x4096 (q/k/v/o), 4096x11008
(gate/up), 11008x4096 (down), each dtype and sparsity, it measures

* ``dense F.linear``  -- ``torch.nn.functional.linear(x, W)``, W (out, in) contiguous
* ``dense x@W_t``     -- ``x @ weight_t``, weight_t (in, out) contiguous
* ``sparse kernel``   -- ``rotsparse.kernels.topk_gemv(x, weight_t, None, K)``
  (Top-K selection included, through the public API / custom op)
* ``dense rotsparse K=in`` -- the same kernel with keep_k = in (a dense GEMV that
  is bandwidth-bound also in bf16, unlike torch's CPU bf16 GEMV)
* ``index_select+mv`` -- ``topk`` + ``weight_t.index_select(0, idx)`` + ``mv``

Every call reads a different weight buffer from a pool larger than
``--pool-factor`` x the last-level cache, so weights come from DRAM as in
real decoding.  Methods are interleaved round-robin so machine noise hits all
of them alike; the median per method is reported.  Bandwidth is computed on
the bytes each method must read: dense ``in*out*bytes``, sparse ``K*out*bytes``.

Usage::

    python eval/bench_kernel.py                 # full table -> eval/results/kernel_bench.md
    python eval/bench_kernel.py --quick         # fewer repetitions, no file
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from rotsparse.kernels import build_extension, kernel_backend, topk_gemv

LLAMA2_7B_SHAPES = [  # (name, in, out, count per decoder layer)
    ("q/k/v/o", 4096, 4096, 4),
    ("gate/up", 4096, 11008, 2),
    ("down", 11008, 4096, 1),
]


def llc_bytes() -> int:
    """Size of the largest CPU cache (bytes), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            txt = (idx / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            pass
    return best or (32 << 20)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def autogroup() -> str:
    """Scheduler autogroup of this process (its nice value matters on a shared machine)."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return "n/a"


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def quantized_header(command: str, pool: int, reps: int, stat: str, extra: str = "") -> list[str]:
    """The header lines of the quantized / residual kernel tables: command, machine, repetitions."""
    return [f"Command: `{command}`", "",
            f"- CPU: {cpu_name()}, last-level cache {llc_bytes() >> 20} MiB, bf16 pool >= {pool >> 20} MiB; "
            f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
            f"AVX-512 path: {bool(torch.ops.rotsparse_cpp.has_avx512())}{extra}",
            f"- {reps} passes over the pool per method, interleaved; {stat} times; load average at start "
            f"{loadavg()}", ""]


def time_interleaved(calls: dict, n_buf: int, reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """{name: [seconds per call]}: every call(i) for i over the pool, methods round-robin, `reps` passes."""
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            for i in range(warmup):
                fn(i % n_buf)
        for _ in range(reps):
            for name, fn in calls.items():
                for i in range(n_buf):
                    start = time.perf_counter()
                    fn(i)
                    times[name].append(time.perf_counter() - start)
    return times


def bench_shape(n_in, n_out, dtype, sparsities, reps, pool_bytes, warmup=3):
    """Return {method: [seconds per call]}, {method: bytes read}, pool size, for one shape/dtype."""
    es = torch.empty((), dtype=dtype).element_size()
    n_buf = max(3, -(-pool_bytes // (n_in * n_out * es)))
    gen = torch.Generator().manual_seed(0)
    w_t = [torch.randn(n_in, n_out, generator=gen).to(dtype) for _ in range(n_buf)]  # (in, out)
    w = [torch.randn(n_out, n_in, generator=gen).to(dtype) for _ in range(n_buf)]  # (out, in)
    x = torch.randn(1, n_in, generator=gen).to(dtype)
    x1 = x.reshape(n_in)

    methods = {
        "dense F.linear": (lambda i: torch.nn.functional.linear(x, w[i]), n_in * n_out * es),
        "dense x@W_t": (lambda i: x @ w_t[i], n_in * n_out * es),
        # our kernel with keep_k = in is a plain dense GEMV: a bandwidth-bound
        # dense reference where torch's own path is not (bf16 on CPU)
        "dense rotsparse K=in": (lambda i: topk_gemv(x, w_t[i], None, n_in), n_in * n_out * es),
    }
    for s in sparsities:
        k = int(round(n_in * (1.0 - s)))

        def sparse(i, k=k):
            return topk_gemv(x, w_t[i], None, k)

        def isel(i, k=k):
            idx = x1.abs().topk(k, sorted=False).indices.sort().values
            return torch.mv(w_t[i].index_select(0, idx).t(), x1.index_select(0, idx))

        methods[f"sparse kernel|{s}"] = (sparse, k * n_out * es)
        methods[f"index_select+mv|{s}"] = (isel, k * n_out * es)

    times = {m: [] for m in methods}
    with torch.inference_mode():
        for fn, _ in methods.values():
            for i in range(warmup):
                fn(i % n_buf)
        for _ in range(reps):
            for m, (fn, _) in methods.items():
                for i in range(n_buf):
                    t0 = time.perf_counter()
                    fn(i)
                    times[m].append(time.perf_counter() - t0)
    w.clear()  # free the pools before the next shape
    w_t.clear()
    return times, {m: b for m, (_, b) in methods.items()}, n_buf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=30, help="passes over the weight pool per method")
    ap.add_argument("--pool-factor", type=float, default=3.0, help="weight pool size / last-level cache")
    ap.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic for GB/s, ratios and speed-ups (min = least disturbed run, for busy machines)",
    )
    ap.add_argument("--out", default="eval/results/kernel_bench.md")
    ap.add_argument("--quick", action="store_true", help="5 reps, do not write the results file")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 5

    torch.set_num_threads(args.threads)
    build_extension()
    command = shlex.join(["python", "eval/bench_kernel.py", *(argv if argv is not None else sys.argv[1:])])
    llc = llc_bytes()
    pool = int(args.pool_factor * llc)
    header = [
        f"Command: `{command}`",
        "",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs), last-level cache {llc >> 20} MiB; "
        f"weight pool per method >= {pool >> 20} MiB",
        f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"kernel backend: {kernel_backend('cpu')} "
        f"(AVX-512 path: {bool(torch.ops.rotsparse_cpp.has_avx512())})",
        f"- {args.reps} passes over the pool per method, methods interleaved; GB/s, ratios and speed-ups "
        f"use the **{args.stat}** time",
        f"- machine load average (1/5/15 min) at start: {loadavg()}; scheduler autogroup: {autogroup()}",
        "",
    ]
    print("\n".join(header), flush=True)

    table = [
        "| shape (in x out) | dtype | method | K | median ms | min ms | GB/s | BW ratio vs F.linear "
        "| speed-up vs F.linear | speed-up vs best dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    stat = statistics.median if args.stat == "median" else min
    layer = {}  # (dtype, method) -> per-decoder-layer time (s)
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        for name, n_in, n_out, count in LLAMA2_7B_SHAPES:
            times, nbytes, _ = bench_shape(n_in, n_out, dtype, args.sparsity, args.reps, pool)
            st = {m: stat(v) for m, v in times.items()}
            d = st["dense F.linear"]
            d_bw = nbytes["dense F.linear"] / d / 1e9
            best_dense = min(v for m, v in st.items() if m.startswith("dense"))
            for m, t in st.items():
                bw = nbytes[m] / t / 1e9
                k = n_in if "|" not in m else int(round(n_in * (1 - float(m.split("|")[1]))))
                label = m.replace("|", " s=")
                line = (
                    f"| {n_in}x{n_out} ({name}) | {dt_name} | {label} | {k} "
                    f"| {statistics.median(times[m]) * 1e3:.2f} | {min(times[m]) * 1e3:.2f} | {bw:.2f} "
                    f"| {bw / d_bw:.2f} | {d / t:.2f} | {best_dense / t:.2f} |"
                )
                table.append(line)
                print(line, flush=True)
                layer[(dt_name, label)] = layer.get((dt_name, label), 0.0) + count * t

    summary = [
        "",
        f"Per Llama-2-7B decoder layer (4x q/k/v/o + 2x gate/up + 1x down), sum of {args.stat} times:",
        "",
        "| dtype | method | ms / layer | speed-up vs F.linear |",
        "|---|---|---|---|",
    ]
    for (dt_name, label), t in layer.items():
        base = layer[(dt_name, "dense F.linear")]
        summary.append(f"| {dt_name} | {label} | {t * 1e3:.2f} | {base / t:.2f} |")
    footer = ["", f"Load average at end: {loadavg()}"]
    print("\n".join(summary + footer), flush=True)

    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        notes_marker = "<!-- notes -->"
        notes = ""
        if out.exists():  # keep a hand-written notes section across re-runs
            txt = out.read_text()
            if notes_marker in txt:
                notes = txt[txt.index(notes_marker):]
        body = ["# Sparse GEMV kernel benchmark (batch 1, CPU)", ""] + header + table + summary + footer
        out.write_text("\n".join(body) + "\n\n" + (notes or notes_marker + "\n"))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
