"""Calibration time and peak memory of the default method (``auto``) at real layer shapes, and their
extrapolation to the whole model.

Each (model, layers, calibration amount) runs in a fresh subprocess: a synthetic model (random weights at the
real shapes, `rotsparse.bench.synthetic_model`, bfloat16) with the first `--layers` decoder layers, random token
ids as calibration text, then `rotsparse.calibrate` (timed, with its per-stage progress lines collected from the
``rotsparse`` logger) and `rotsparse.sparsify(calibrated=...)` at 40% (choose + fold, timed). Peak memory is the
subprocess' maximum resident set size (`resource.getrusage`), before calibration (the model) and at the end.
Times are wall-clock and process CPU seconds (on a shared core the CPU time is the single-thread cost; per stage
from the progress lines).

Extrapolation: with two or more depths, every time and memory figure is fitted as a + b * layers (least squares)
and evaluated at the model's full depth; with one depth, b = (value - the model-only part) / layers.

    taskset -c 1 env OMP_NUM_THREADS=1 python eval/calibration_scale.py --model llama2-7b --layers 2 4 \
        --num-sequences 4 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import time

import torch

import rotsparse
from rotsparse.bench import SYNTHETIC_SHAPES, synthetic_model
from rotsparse.config import SparsifyConfig

MIB = 1024 * 1024


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Lines(logging.Handler):
    """Keeps (process CPU time, message) of every log line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record):
        self.lines.append((time.process_time(), record.getMessage()))


def _stage_seconds(lines: list[tuple[float, str]], started: float) -> dict[str, float]:
    """CPU seconds per stage: each progress line's CPU time since the line before it (or since `started`),
    summed by stage."""
    seconds, previous = {}, started
    for cpu, message in lines:
        match = re.match(r"rotsparse: (.+?): \w+ \d+/\d+", message)
        if match:
            seconds[match.group(1)] = seconds.get(match.group(1), 0.0) + cpu - previous
        previous = cpu
    return seconds


def memory_estimate_mib(shape: dict, layers: int, sequences: int, seqlen: int, dtype_bytes: int,
                     error_tokens: int = 512, sensitivity_sequences: int = 4) -> dict[str, float]:
    """docs/methods.md's estimate of ``auto``'s calibration memory beyond the model's weights, MiB: the larger of
    its two phases, plus what is kept.

    sensitivity (loss sensitivity): every layer's inputs of the n_s sequences, kept for the backward pass, L n_s s d b;
        those sequences' inputs and outputs of one layer, 2 n_s s d b; one sequence's logits, their float32 copy,
        log-softmax and gradients, s V (2 b + 12).
    statistics (the layer-by-layer pass): every sequence's inputs and outputs of one layer, 2 n s d b, plus one
        layer's float64 work: the second moment d^2; the sampled rows e (2 d + H + I); the reader matrices (q, k, v,
        o and down as they are, gate and up as d x d factors); the largest site's readers twice more (folds); while
        gate/up are factored, one of them (I d) and its Gram matrix and eigh workspace (3 d^2); and the error
        curves' float32 chunks (6 x 2^24 x 4 bytes).
    kept: per layer the value-head rotations kv h_d^2 and the error curves, 8 bytes each.
    """
    d, inner, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], \
        shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or d // heads
    n_s, b = min(sensitivity_sequences, sequences), dtype_bytes
    width_q = heads * head_dim
    readers = width_q * d + 2 * kv * head_dim * d + d * width_q + 2 * d * d + d * inner  # as kept (min(out, in) x in)
    largest = max(width_q + 2 * kv * head_dim, 2 * d) * d
    layer = 8 * (d * d + error_tokens * (2 * d + width_q + inner) + readers + 2 * largest + inner * d + 3 * d * d) \
        + 6 * 2 ** 24 * 4
    terms = {
        "sensitivity": (layers + 2) * n_s * seqlen * d * b + seqlen * shape["vocab_size"] * (2 * b + 12),
        "statistics": 2 * sequences * seqlen * d * b + layer,
        "kept": 8 * layers * (kv * head_dim ** 2 + 3 * (d + 1) + 2 * (width_q + 1) + 2 * (d + 1) + inner + 1),
    }
    terms = {key: value / MIB for key, value in terms.items()}
    terms["estimate"] = max(terms["sensitivity"], terms["statistics"]) + terms["kept"]
    return terms


def child(args) -> dict:
    """One measurement in this process; returns its record."""
    torch.set_num_threads(args.threads)
    layers = args.layers[0]
    model = synthetic_model(args.model, num_layers=layers, dtype=getattr(torch, args.dtype))
    config = SparsifyConfig(sparsity=0.4, num_sequences=args.num_sequences, sequence_length=args.seqlen)
    vocab = SYNTHETIC_SHAPES[args.model]["vocab_size"]
    ids = torch.randint(0, vocab, (args.num_sequences + config.check_sequences, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    handler = _Lines()
    logger = logging.getLogger("rotsparse")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    model_mib = _max_rss_mib()
    started, cpu = time.perf_counter(), time.process_time()
    calibrated = rotsparse.calibrate(model, calibration=ids, config=config)
    calibrate_seconds, calibrate_cpu = time.perf_counter() - started, time.process_time() - cpu
    stages = _stage_seconds(handler.lines, cpu)
    calibrate_mib = _max_rss_mib()
    started, cpu = time.perf_counter(), time.process_time()
    rotsparse.sparsify(model, config=config, calibrated=calibrated)
    sparsify_seconds, sparsify_cpu = time.perf_counter() - started, time.process_time() - cpu
    shape = SYNTHETIC_SHAPES[args.model]
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return {"model": args.model, "layers": layers, "num_sequences": args.num_sequences, "seqlen": args.seqlen,
            "check_sequences": config.check_sequences, "error_tokens": config.error_tokens, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "calibrate_s": calibrate_seconds,
            "calibrate_cpu_s": calibrate_cpu, "error_curves_s": calibrated.error_seconds, "stages_cpu_s": stages,
            "sparsify_s": sparsify_seconds, "sparsify_cpu_s": sparsify_cpu, "model_rss_mib": model_mib,
            "calibrate_peak_rss_mib": calibrate_mib, "final_peak_rss_mib": _max_rss_mib(),
            "estimate_mib": memory_estimate_mib(shape, layers, args.num_sequences, args.seqlen, dtype_bytes,
                                             config.error_tokens),
            "full_depth": shape["num_hidden_layers"],
            "torch": torch.__version__}


def _fit(depths: list[int], values: list[float], base: float = 0.0) -> tuple[float, float]:
    """(a, b) of value = a + b * depth: least squares with two or more depths; else a = base."""
    if len(depths) == 1:
        return base, (values[0] - base) / depths[0]
    n = len(depths)
    mean_d, mean_v = sum(depths) / n, sum(values) / n
    slope = sum((d - mean_d) * (v - mean_v) for d, v in zip(depths, values)) / sum((d - mean_d) ** 2 for d in depths)
    return mean_v - slope * mean_d, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2-7b", help="a synthetic shape (rotsparse.bench.SYNTHETIC_SHAPES)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--num-sequences", type=int, default=16, help="calibration sequences (default: the library's)")
    parser.add_argument("--seqlen", type=int, default=2048, help="calibration sequence length (default: the library's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    records = []
    for layers in args.layers:
        command = [sys.executable, __file__, "--child", "--model", args.model, "--layers", str(layers),
                   "--num-sequences", str(args.num_sequences), "--seqlen", str(args.seqlen), "--dtype", args.dtype,
                   "--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        records.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), file=sys.stderr)
    depths = [record["layers"] for record in records]
    full = records[0]["full_depth"]
    summary = {"model": args.model, "depths": depths, "full_depth": full, "num_sequences": args.num_sequences,
               "seqlen": args.seqlen, "threads": args.threads, "dtype": args.dtype}
    for key in ("calibrate_s", "calibrate_cpu_s", "sparsify_s", "sparsify_cpu_s"):
        intercept, slope = _fit(depths, [record[key] for record in records])
        summary[f"{key}_per_layer"] = slope
        summary[f"{key}_fixed"] = intercept
        summary[f"{key}_full_model"] = intercept + slope * full
    for key in ("calibrate_peak_rss_mib", "model_rss_mib"):
        intercept, slope = _fit(depths, [record[key] for record in records])
        summary[f"{key}_per_layer"] = slope
        summary[f"{key}_full_model"] = intercept + slope * full
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    summary["estimate_full_model_mib"] = memory_estimate_mib(SYNTHETIC_SHAPES[args.model], full, args.num_sequences,
                                                             args.seqlen, dtype_bytes, records[0]["error_tokens"])
    summary["records"] = records
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
