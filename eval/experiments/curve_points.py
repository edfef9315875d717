"""#7 (session 8): does a finer K grid in the Top-K error curves help `auto`?

`topk_error_curve` is exact at `points` + 1 evenly spaced K (32 by default) and linear in between, so the K
allocation mostly lands on those grid points. This recalibrates `auto` (same settings as eval/quality.py: 4 + 2
calibration sequences, 512 error rows) with another grid and reports the perplexity gap on the first 4,096
held-out tokens, as a ratio to the `topk` gap recorded in eval/results/quality_<short>.jsonl.
Usage: python eval/experiments/curve_points.py MODEL POINTS SPARSITY[,SPARSITY...]
"""
import copy
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse import methods
from rotsparse.api import calibrate, sparsify
from rotsparse.config import SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.evaluation import perplexity
from rotsparse.models import load_model
from rotsparse.rotation import topk_error_curve

torch.set_num_threads(1)
model_name, points = sys.argv[1], int(sys.argv[2])
sparsities = [float(s) for s in sys.argv[3].split(",")]
short = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma"}[model_name]
records = [json.loads(line) for line in (Path(__file__).parents[1] / f"results/quality_{short}.jsonl").open()]
dense_ppl = records[-1]["dense_ppl"]
topk_gap = {r["sparsity"]: r["ppl_gap"] for r in records if r["method"] == "topk" and r["eval_tokens"] == 4094}
methods.topk_error_curve = functools.partial(topk_error_curve, points=points)
dense, tokenizer = load_model(model_name)
ids = calibration_batch(tokenizer, load_texts("embedded", part="calibration"), num_sequences=6, sequence_length=2048)
config = SparsifyConfig(num_sequences=4, error_tokens=512)
calibrated = calibrate(dense, calibration=ids, config=config, progress=False)
print(model_name, "points", points, "calibration s", round(calibrated.seconds), flush=True)
eval_texts = load_texts("embedded", part="evaluation")
for sparsity in sparsities:
    model = sparsify(copy.deepcopy(dense), config=SparsifyConfig(**{**config.to_dict(), "sparsity": sparsity}),
                     calibrated=calibrated, progress=False)
    ppl = perplexity(model, tokenizer, eval_texts, seqlen=2048, max_tokens=4096, progress=False).ppl
    gap = ppl - dense_ppl
    print(model_name, "points", points, "sparsity", sparsity, f"gap {gap:+.3f} ratio {gap / topk_gap[sparsity]:.2f}",
          "bases", sorted(set(model.rotsparse_plan.residual_bases)), flush=True)
