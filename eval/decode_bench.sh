#!/usr/bin/env bash
# Batch-1 decode speed, dense vs sparse, interleaved in each run. Appends one JSON line per run.
# Usage: bash eval/decode_bench.sh > eval/results/decode_bench.jsonl
set -euo pipefail
for run in "0.4 auto" "0.5 auto" "0.4 topk" "0.5 topk"; do
  set -- $run
  rotsparse bench --model synthetic:llama2-7b --layers 4 --dtype bfloat16 --sparsity "$1" --method "$2" \
    --tokens 32 --repeats 3 --threads 2 --json | tail -n 1
done
