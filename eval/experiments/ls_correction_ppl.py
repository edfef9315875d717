"""Discarded for #7 (2026-11-23): closed-form least-squares weight correction for Top-K, end to end.

Per site, layer by layer through the already sparsified model: A = E[x x_s^T] (E[x_s x_s^T] + damp)^-1,
W <- W A (x_s = Top-K of x), i.e. the best linear estimate of the dense input from the kept entries.
Usage: python eval/experiments/ls_correction_ppl.py MODEL METHOD SPARSITY DAMP SEQUENCES [self|norm]
("norm": rows normalised per token). Output: eval/results/experiments/ls_correction.log
"""
import sys, copy, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from rotsparse.api import sparsify, calibrate
from rotsparse.config import SparsifyConfig, SITES
from rotsparse.adapters import get_adapter
from rotsparse.calibration import layerwise
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model
from rotsparse.evaluation import perplexity
from rotsparse.topk import keep_topk

torch.set_num_threads(1)
model_name, method, sparsity, damp, nseq = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
mode = sys.argv[6] if len(sys.argv) > 6 else "self"
dense, tok = load_model(model_name)
ev = load_texts("embedded", part="evaluation")
cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=nseq, sequence_length=2048)
cfg = SparsifyConfig(sparsity=sparsity, method=method, num_sequences=4, error_tokens=512)
calib_ids = cal[:4]
model = copy.deepcopy(dense)
t = time.time()
calibrated = calibrate(dense, calibration=calib_ids, config=cfg, progress=False) if method != "topk" else None
sparsify(model, config=cfg, calibrated=calibrated, progress=False)
print("sparsified", time.time() - t, flush=True)
def ppl(m):
    return perplexity(m, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
base = ppl(model)
print(f"{model_name} {method} {sparsity}: before fix {base:.3f}", flush=True)
adapter = get_adapter(model)
t = time.time()
with torch.no_grad():
    for step in layerwise(model, adapter, cal, None, progress=False):
        la = adapter.layer_adapter_class(step.layer)
        mods = la.site_modules()
        for site in SITES:
            lin = mods[site][0]
            width = lin.in_features
            css = torch.zeros(width, width, dtype=torch.float64); cxs = torch.zeros_like(css)
            def hook(module, args):
                x = args[0].reshape(-1, width)
                xs = keep_topk(x, module.keep_k)
                x, xs = x.double(), xs.double()
                if mode == "norm":
                    n = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    x, xs = x / n, xs / n
                css.add_(xs.T @ xs); cxs.add_(x.T @ xs)
            h = lin.register_forward_pre_hook(hook)
            step.run()
            h.remove()
            reg = damp * css.diagonal().mean() * torch.eye(width, dtype=torch.float64)
            A = torch.linalg.solve(css + reg, cxs.T).T  # A = cxs (css+reg)^-1  (css symmetric)
            for l in mods[site]:
                W = l.weight.detach().double()
                l.weight.copy_((W @ A).to(l.weight.dtype))
print("fix seconds", time.time() - t)
print(f"{model_name} {method} {sparsity} damp {damp} nseq {nseq}: before {base:.3f} after {ppl(model):.3f}", flush=True)
