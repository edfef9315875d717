"""Discarded for #7 (2026-11-23): bias correction (the mean of the dropped entries folded into a bias),
same setting as ls_correction_heldout.py. Output: eval/results/experiments/bias_correction.log
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from rotsparse.adapters import get_adapter
from rotsparse.calibration import layerwise
from rotsparse.data import calibration_batch, load_texts, token_stream
from rotsparse.models import load_model
from rotsparse.topk import keep_topk
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
            def err(X, A=None):
                Xs = keep_topk(X, k)
                Y = X @ W.T; Ys = (Xs if A is None else Xs @ A.T) @ W.T
                e = ((Y - Ys).norm(dim=-1) / Y.norm(dim=-1)).pow(2)
                return e[1:].mean().item(), e.mean().item()   # skip first row (bos)
            Xs = keep_topk(X, k)
            mu = (X - Xs).mean(0)   # mean of the dropped part
            def errb(X, b):
                Xs = keep_topk(X, k)
                Y = X @ W.T; Ys = Xs @ W.T + b @ W.T
                e = ((Y - Ys).norm(dim=-1) / Y.norm(dim=-1)).pow(2)
                return e[1:].mean().item()
            print(step.index, site, "calib", err(X)[0], "->", errb(X, mu), " eval", err(Xe)[0], "->", errb(Xe, mu), flush=True)
