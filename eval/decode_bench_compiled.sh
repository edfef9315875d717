#!/usr/bin/env bash
# Batch-1 decode speed with torch.compile: dense, kernel-dense and sparse each compiled alike (rotsparse.compile,
# static KV cache), timed interleaved; and the same runs eager, for comparison. Appends one JSON line per run
# ("compiled": true/false). Run on a quiet machine (load average well below the thread count).
# Usage (from the repository root): bash eval/decode_bench_compiled.sh > eval/results/decode_bench_compiled.jsonl
set -euo pipefail
THREADS=${THREADS:-2}
for sparsity in 0.4 0.5; do
  for compile in "" "--compile reduce-overhead"; do
    python -m rotsparse.cli bench --model synthetic:llama2-7b --layers 4 --dtype bfloat16 --sparsity "$sparsity" --method topk \
      --tokens 32 --repeats 3 --threads "$THREADS" $compile --json -q | tail -n 1
  done
done
for compile in "" "--compile reduce-overhead"; do
  python -m rotsparse.cli bench --model smollm2-135m --dtype float32 --sparsity 0.4 --method topk \
    --tokens 32 --repeats 3 --threads "$THREADS" $compile --json -q | tail -n 1
done
