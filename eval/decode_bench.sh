#!/usr/bin/env bash
# Batch-1 decode speed, dense vs sparse, interleaved in each run. Appends one JSON line per run.
# Each run: sparsity, method, decoder layers, residual adapter after every G-th layer (rotating methods;
# 1 = after every layer, the worst case; 5 = auto's run5 structure: 2 adapters in 11 layers, as 6 in 32).
# Usage: bash eval/decode_bench.sh > eval/results/decode_bench.jsonl
set -euo pipefail
for run in "0.4 auto 4 1" "0.5 auto 4 1" "0.4 topk 4 1" "0.5 topk 4 1" "0.4 auto 11 5" "0.5 auto 11 5" \
           "0.4 topk 11 1" "0.5 topk 11 1"; do
  set -- $run
  rotsparse bench --model synthetic:llama2-7b --layers "$3" --adapter-every "$4" --dtype bfloat16 \
    --sparsity "$1" --method "$2" --tokens 32 --repeats 3 --threads 2 --json | tail -n 1
done
