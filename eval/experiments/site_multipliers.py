"""Discarded for #7 (2026-11-23): correct the error proxy of `auto`'s K allocation with per-site (and depth) multipliers.

Multiply each site's error curves by a factor, re-allocate K at the same budget (rotation choice fixed), and
measure the loss on 2 x 1024 calibration tokens; a coordinate search (x0.5 / x2, then x0.7 / x1.4) keeps a
factor only if that loss falls. Result: the allocation from the unscaled curves is already the optimum up to
noise (SmolLM2 best 2.9921 vs 2.9985 calibration loss, and held-out ppl 16.13 vs 16.06: worse; Gemma-3 no
multiplier below 3.1385 vs 3.1516), and no depth tilt helps. LaRoSA-style coefficient search adds nothing to
error-curve allocation. Logs: eval/results/experiments/site_multipliers_*.log (Gemma-3 run stopped after 12
trials). Usage: python eval/experiments/site_multipliers.py MODEL SPARSITY (calibration cached under $TMPDIR).
"""
import os, sys, copy, math, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse.api import sparsify, calibrate
from rotsparse.config import SparsifyConfig, SITES
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model
from rotsparse.evaluation import perplexity
from rotsparse.topk import TopKLinear
from rotsparse import methods
torch.set_num_threads(1)
model_name, sp = sys.argv[1], float(sys.argv[2])
dense, tok = load_model(model_name)
ev = load_texts("embedded", part="evaluation")
cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rotsparse_calib_{model_name}.pt"
try:
    c = torch.load(path, weights_only=False)
except FileNotFoundError:
    cfg = SparsifyConfig(sparsity=sp, method="auto", num_sequences=4, error_tokens=512)
    c = calibrate(dense, calibration=cal, config=cfg, progress=False)
    torch.save(c, path)
cfg = SparsifyConfig(sparsity=sp, method="auto", num_sequences=4, error_tokens=512)
base = sparsify(copy.deepcopy(dense), config=cfg, calibrated=c, progress=False)
plan = base.rotsparse_plan
site_sizes = plan.site_sizes
choice, _ = methods.choose(c, site_sizes, sp, cfg.coefficients)
curves = [[layer.curves[s][choice[i] if s in ("h1", "h3") else 0] for s in SITES] for i, layer in enumerate(c.layers)]
mods = {}
for name, m in base.named_modules():
    if isinstance(m, TopKLinear):
        mods.setdefault(int(name.split("layers.")[1].split(".")[0]), []).append(m)
def set_k(keep_k):
    for l, ms in mods.items():
        for m in ms:
            m.keep_k = keep_k[l][SITES.index(m.site)]
ids = cal[:2, :1024]
@torch.no_grad()
def calib_loss():
    out = base(input_ids=ids, labels=ids)
    return float(out.loss)
def heldout():
    return perplexity(base, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
def alloc(mult_site, mult_depth=None):
    L = len(curves)
    cs = [[curves[l][s] * mult_site[s] * (1 if mult_depth is None else mult_depth[l]) for s in range(4)] for l in range(L)]
    k, _ = methods.allocate_by_error(cs, site_sizes, sp)
    return k
t = time.time(); l0 = calib_loss(); print("calib loss time", time.time() - t, flush=True)
print("base", l0, "heldout", heldout(), flush=True)
# coordinate search over log2 multipliers per site
best = [1.0] * 4; best_loss = l0
for rnd in range(2):
    for s in range(4):
        for f in (0.5, 2.0) if rnd == 0 else (0.7, 1.4):
            trial = list(best); trial[s] *= f
            set_k(alloc(trial)); loss = calib_loss()
            print("trial", [round(x, 3) for x in trial], f"loss {loss:.4f}", flush=True)
            if loss < best_loss - 1e-4:
                best, best_loss = trial, loss
    print("round", rnd, "best", best, best_loss, flush=True)
set_k(alloc(best)); print("final site mult", best, "calib", calib_loss(), "heldout", heldout(), flush=True)
# depth multiplier: linear in layer index, exp(g * (l/L - 0.5))
L = len(curves)
for g in (-1.0, 1.0, -2.0, 2.0):
    depth = [math.exp(g * (l / (L - 1) - 0.5)) for l in range(L)]
    set_k(alloc(best, depth)); print("depth g", g, "calib", calib_loss(), flush=True)
