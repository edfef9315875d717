"""#7 (2026-11-23, session 7, proxy only, not adopted): would a K per reader linear (q, k, v; gate, up) instead
of one K per site lower the summed loss-weighted error of the allocation at the same budget?

Records every per-reader error curve of an identity-basis `auto` calibration (no value rotation), then allocates
with one K per site (as the library does) and with one K per reader linear. Gemma-3: the summed proxy error
drops by 8% at 40% / 50% (log: eval/results/experiments/split_readers_gemma3-270m.log) -- small next to what the
value rotation did, and it would change the plan format (K per linear); not pursued.
Usage: python eval/experiments/split_readers.py MODEL
"""
import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse import methods
from rotsparse.api import calibrate, site_sizes_for
from rotsparse.adapters import get_adapter
from rotsparse.config import SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.methods import AutoOptions, allocate_by_error
from rotsparse.models import load_model
torch.set_num_threads(1)
name = sys.argv[1]
model, tok = load_model(name)
cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
calls = []
orig = methods.topk_error_curve
def rec(*a, **k):
    r = orig(*a, **k); calls.append(r); return r
methods.topk_error_curve = rec
c = calibrate(model, calibration=cal, config=SparsifyConfig(num_sequences=4, error_tokens=512),
              options=AutoOptions(rotations=("identity",), value_rotation=False), progress=False)
adapter = get_adapter(model)
sizes = site_sizes_for(adapter)
assert len(calls) == 7 * len(sizes), len(calls)
joint_curves, split_curves, split_sizes = [], [], []
for i, la in enumerate(adapter.layer_adapters()):
    h2, h4, q, k, v, g, u = calls[7 * i: 7 * i + 7]
    joint_curves.append([q + k + v, h2, g + u, h4])
    mods = la.site_modules()
    split_curves.append([q, k, v, h2, g, u, h4])
    lin = mods["h1"] + mods["h2"] + mods["h3"] + mods["h4"]
    split_sizes.append(tuple((m.in_features, m.in_features * m.out_features) for m in lin))
for sp in (0.4, 0.5):
    kj, _ = allocate_by_error(joint_curves, sizes, sp)
    ks, _ = allocate_by_error(split_curves, split_sizes, sp)
    ej = sum(float(cv[k]) for lc, lk in zip(joint_curves, kj) for cv, k in zip(lc, lk))
    es = sum(float(cv[k]) for lc, lk in zip(split_curves, ks) for cv, k in zip(lc, lk))
    print(name, sp, f"joint {ej:.4g} split {es:.4g} ratio {es/ej:.3f}")
    print("  example layer K joint", kj[3], "split", ks[3])
