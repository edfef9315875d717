#!/usr/bin/env bash
# Batch-1 decode with the residual weight copy (residual_bits) vs plain Top-K, 4 layers of Llama-2-7B shapes,
# bfloat16, 2 threads; each run times dense, kernel-dense and sparse interleaved. Plain Top-K at 25% / 30% is
# there to compare at equal speed. Usage: bash eval/residual_decode_bench.sh > eval/results/residual_decode.jsonl
# Runs are "sparsity bits [band]" (band: residual_band), e.g.
#   RUNS="0.5:2:0.1 0.5:2:0.2 0.4:2:0.1 0.4:2:0.2 0.5:0 0.4:0" bash eval/residual_decode_bench.sh \
#     > eval/results/residual_band_decode.jsonl
set -euo pipefail
for run in ${RUNS:-0.5:2 0.4:2 0.5:1 0.5:0 0.3:0 0.25:0}; do
  IFS=: read -r sparsity bits band <<< "$run"
  rotsparse bench --model synthetic:llama2-7b --layers 4 --dtype bfloat16 --sparsity "$sparsity" --method topk \
    --residual-bits "$bits" ${band:+--residual-band "$band"} --tokens 32 --repeats 3 --threads 2 --json | tail -n 1
done
