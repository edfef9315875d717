#!/usr/bin/env bash
# Everything rotsparse checks on a CUDA machine, in one go (the lent GPU machine runs it from the repo root):
# the CUDA tests, the kernel benchmark and the decode benchmark on the GPU. Logs go to $OUT (default eval/results).
# Usage: bash eval/gpu_check.sh        (SWEEP=1 also times a grid of gather-kernel tiles;
#        BEFORE=/tmp/before.py also times that copy of triton_gemv.py, e.g. from `git show HEAD:rotsparse/kernels/triton_gemv.py`)
set -uo pipefail
OUT=${OUT:-eval/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_io.py -k "cuda or triton" -rs 2>&1 | tee "$OUT/gpu_pytest.log" | tail -n 15
for run in "0.4 auto" "0.5 auto" "0.5 topk"; do
  set -- $run
  python3 -c "import sys; from rotsparse.cli import main; sys.exit(main(sys.argv[1:]))" bench \
    --model synthetic:llama2-7b --layers 4 --dtype bfloat16 --sparsity "$1" --method "$2" --device cuda \
    --tokens 32 --repeats 3 --json | tail -n 1
done | tee "$OUT/decode_bench_cuda.jsonl"
# BEFORE=FILE (a copy of another rotsparse/kernels/triton_gemv.py, e.g. the committed one) times it side by side
python3 eval/bench_kernel_cuda.py --out "$OUT/kernel_bench_cuda.md" ${SWEEP:+--sweep "$OUT/gather_sweep_cuda.md"} \
  ${BEFORE:+--before "$BEFORE"} 2>&1 | tail -n 60
