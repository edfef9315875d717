#!/usr/bin/env bash
# Batched decode (B sequences, one token each per step), dense vs sparse, interleaved in each run: the Hugging Face
# dense model, the dense weights through rotsparse's kernel, and Top-K, on 4 layers of Llama-2-7B shapes (bf16,
# 2 threads). Appends one JSON line per run.
# Usage: bash eval/batch_decode_bench.sh > eval/results/batch_decode.jsonl
set -euo pipefail
for batch in 1 2 4 8 16; do
  for sparsity in 0.4 0.5; do
    rotsparse bench --model synthetic:llama2-7b --layers 4 --dtype bfloat16 --sparsity "$sparsity" --method topk \
      --batch-size "$batch" --tokens 32 --repeats 3 --threads 2 --json | tail -n 1
  done
done
