#!/usr/bin/env bash
# Batch-1 decode of synthetic Llama-2-7B layer shapes (4 decoder layers, bfloat16 activations) with int8 / int4
# Top-K linears. Each run times, interleaved step by step: the dense model quantized the same way through the same
# kernels at K = in (`dense_*`, the baseline of `speedup`), the quantized sparse model (`sparse_*`) and the bf16
# dense weights through rotsparse's bf16 kernel (`kernel_dense_*`, the baseline of `speedup_vs_kernel_dense`).
# `layers_*`: the decoder stack alone (the bytes the weights format changes); the lm_head stays bf16.
# One JSON line per run. Usage (THREADS defaults to 1, TOKENS (decode steps per repeat) to 32; pin it):
#   THREADS=1 taskset -c 1 bash eval/quantized_decode_bench.sh > eval/results/quantized_decode.jsonl
set -euo pipefail
THREADS="${THREADS:-1}"
TOKENS="${TOKENS:-32}"
for run in "4 0.5" "4 0.4" "8 0.5" "8 0.4"; do
  set -- $run
  OMP_NUM_THREADS="$THREADS" rotsparse bench --model synthetic:llama2-7b --layers 4 --dtype bfloat16 --method topk \
    --weight-bits "$1" --sparsity "$2" --tokens "$TOKENS" --repeats 3 --threads "$THREADS" --json | tail -n 1
done
