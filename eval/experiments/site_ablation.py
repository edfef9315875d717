"""Diagnostic for #7 (2026-11-23): which Top-K sites carry the perplexity gap.

Sparsify (topk, then auto) at SPARSITY, then give every site but one back its full width.
Usage: python eval/experiments/site_ablation.py MODEL SPARSITY. Output: eval/results/experiments/site_ablation_*.log
"""
import sys, copy, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from rotsparse.api import sparsify, calibrate
from rotsparse.config import SparsifyConfig, SITES
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model
from rotsparse.evaluation import perplexity
from rotsparse.topk import TopKLinear
torch.set_num_threads(1)
model_name, sp = sys.argv[1], float(sys.argv[2])
dense, tok = load_model(model_name)
ev = load_texts("embedded", part="evaluation")
cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
for method in ("topk", "auto"):
    cfg = SparsifyConfig(sparsity=sp, method=method, num_sequences=4, error_tokens=512)
    c = calibrate(dense, calibration=cal, config=cfg, progress=False) if method == "auto" else None
    base = sparsify(copy.deepcopy(dense), config=cfg, calibrated=c, progress=False)
    for keep in (None,) + SITES:
        m = copy.deepcopy(base)
        if keep:
            for mod in m.modules():
                if isinstance(mod, TopKLinear) and mod.site != keep:
                    mod.keep_k = mod.in_features
        p = perplexity(m, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
        kept = [[k for k in layer] for layer in m.rotsparse_plan.keep_k]
        print(model_name, method, sp, "only", keep, f"ppl {p:.3f}", flush=True)
    if method == "auto":
        print("keep_k per layer", base.rotsparse_plan.keep_k, flush=True)
