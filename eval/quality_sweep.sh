#!/usr/bin/env bash
# The committed quality tables: every method and ablation at 25/40/50/60%, both pip-shipped
# models (one process per model, one thread each, so the two run side by side on a 2-core machine).
#   bash eval/quality_sweep.sh            (about 2 h on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--calibration-sequences 4 --error-tokens 512 --eval-tokens 4096 --threads 1)
run_model() {
  local model=$1 short=$2
  local out=eval/results/quality_${short}.jsonl md=eval/results/quality_${short}.md
  python eval/quality.py --models "$model" --methods topk larosa --sparsities 0.25 0.4 0.5 0.6 \
    "${common[@]}" --out "$out" --markdown "$md"
  python eval/quality.py --models "$model" --methods auto auto-per-site auto-no-check auto-no-runs auto-no-value-rotation auto-uncharged wina+alloc wina \
    --sparsities 0.25 0.4 0.5 0.6 "${common[@]}" --reuse-dense --out "$out" --markdown "$md"
}
run_model smollm2-135m smollm2 > eval/results/quality_smollm2.log 2>&1 &
run_model gemma3-270m gemma > eval/results/quality_gemma.log 2>&1 &
wait
cat eval/results/quality_smollm2.jsonl eval/results/quality_gemma.jsonl > /tmp/rotsparse_quality_all.jsonl
python eval/plot.py /tmp/rotsparse_quality_all.jsonl eval/results/quality.png --methods topk larosa auto
