#!/usr/bin/env bash
# Batched decode (B sequences, one token each per step), dense vs sparse, interleaved in each run: the Hugging Face
# dense model, the dense weights through rotsparse's kernel, and Top-K, on 4 layers of Llama-2-7B shapes (bf16,
# 2 threads). Appends one JSON line per run.
# Usage: bash eval/batch_decode_bench.sh > eval/results/batch_decode.jsonl
# Quantized Top-K linears (the dense baseline quantized alike, through the same kernels):
#   WEIGHT_BITS=4 BATCHES="1 2 8" SPARSITIES=0.5 bash eval/batch_decode_bench.sh > eval/results/batch_decode_int4.jsonl
set -euo pipefail
quantized=()
if [[ -n "${WEIGHT_BITS:-}" ]]; then quantized=(--weight-bits "$WEIGHT_BITS"); fi
for batch in ${BATCHES:-1 2 4 8 16}; do
  for sparsity in ${SPARSITIES:-0.4 0.5}; do
    rotsparse bench --model synthetic:llama2-7b --layers 4 --dtype bfloat16 --sparsity "$sparsity" --method topk \
      --batch-size "$batch" --tokens 32 --repeats 3 --threads 2 "${quantized[@]}" --json | tail -n 1
  done
done
