"""Discarded for #7 (2026-11-23): two weight corrections for Top-K, fitted on calibration text, checked on held-out text.

Dense SmolLM2-135M, layers 3/15/27, K = in/2 at h1/h3/h4: relative output error of Top-K before -> after the
correction, fitted on 4 calibration sequences, measured on them ("calib") and on 2 held-out sequences ("eval").
  ls:   W <- W A, A = E[x x_s^T] (E[x_s x_s^T] + damp)^-1 for three dampings -- it overfits.
        Output: eval/results/experiments/ls_correction.log
  bias: the mean of the dropped entries folded into a bias -- too small to matter.
        Output: eval/results/experiments/bias_correction.log
Usage: python eval/experiments/correction_heldout.py ls|bias
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from rotsparse.adapters import get_adapter
from rotsparse.calibration import layerwise
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model
from rotsparse.topk import keep_topk
correction = sys.argv[1]
if correction not in ("ls", "bias"):
    raise SystemExit("usage: correction_heldout.py ls|bias")
torch.set_num_threads(2)
dense, tok = load_model("smollm2-135m")
cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
ev = calibration_batch(tok, load_texts("embedded", part="evaluation"), num_sequences=2, sequence_length=2048)
ids = torch.cat([cal, ev])
adapter = get_adapter(dense)
targets = {3, 15, 27}
with torch.no_grad():
    for step in layerwise(dense, adapter, ids, None, progress=False):
        if step.index not in targets: continue
        la = adapter.layer_adapter_class(step.layer)
        for site, lin in (("h1", la.site_modules()["h1"][0]), ("h3", la.site_modules()["h3"][0]), ("h4", la.site_modules()["h4"][0])):
            rows = []
            h = lin.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, m.in_features).double()))
            step.run(); h.remove()
            X = torch.cat(rows[:4]); Xe = torch.cat(rows[4:])
            k = lin.in_features // 2
            W = lin.weight.double()
            def err(X, A=None, b=None):
                Xs = keep_topk(X, k)
                Y = X @ W.T; Ys = (Xs if A is None else Xs @ A.T) @ W.T
                if b is not None:
                    Ys = Ys + b @ W.T
                e = ((Y - Ys).norm(dim=-1) / Y.norm(dim=-1)).pow(2)
                return e[1:].mean().item(), e.mean().item()   # skip first row (bos)
            Xs = keep_topk(X, k)
            if correction == "bias":
                mu = (X - Xs).mean(0)   # mean of the dropped part
                print(step.index, site, "calib", err(X)[0], "->", err(X, b=mu)[0], " eval", err(Xe)[0], "->", err(Xe, b=mu)[0], flush=True)
                continue
            css = Xs.T @ Xs; cxs = X.T @ Xs
            for damp in (1e-3, 1e-2, 1e-1):
                A = torch.linalg.solve(css + damp * css.diagonal().mean() * torch.eye(css.shape[0], dtype=css.dtype), cxs.T).T
                print(step.index, site, damp, "calib", err(X), "->", err(X, A), " eval", err(Xe), "->", err(Xe, A), flush=True)
