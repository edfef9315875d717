"""#7 (2026-11-23, session 7): how much does a PCA rotation of every value head lower h2's Top-K error?

Per layer: the o_proj input rows of 4 calibration sequences; per value head the PCA of its attention outputs
(all query heads reading it pooled) fitted on 4096 random rows, then the relative Top-K output error
||W_o (x - topk(x))||^2 / ||W_o x||^2 (WINA scales shared within GQA groups, as `auto` folds them) on 1024 other
rows, identity / rotated, at 30 / 50 / 70 / 80% sparsity of h2. SmolLM2 and Gemma-3: 2-10x lower in every layer
(logs: eval/results/experiments/value_rotation_error_*.log). This led to `AutoOptions.value_rotation`.
Usage: python eval/experiments/value_rotation_error.py MODEL
"""
import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse.models import load_model
from rotsparse.data import calibration_batch, load_texts
from rotsparse.adapters import get_adapter
from rotsparse.calibration import layerwise
from rotsparse.rotation import (column_scale, expand_head_scale, grouped_head_scale, head_block_rotation,
                                head_rotations, topk_error_curve)
from rotsparse.methods import _attention_heads
torch.set_num_threads(2)
name = sys.argv[1]
model, tok = load_model(name)
cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
adapter = get_adapter(model)
g = torch.Generator().manual_seed(0)
for step in layerwise(model, adapter, cal, None, progress=False):
    la = adapter.layer_adapter_class(step.layer)
    rows = []
    h = la.o_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    step.outputs = step.run(); h.remove()
    x = torch.cat(rows)
    n = x.shape[0]; perm = torch.randperm(n, generator=g)
    fit, test = x[perm[:4096]], x[perm[4096:4096+1024]]
    heads, kv = _attention_heads(la); hd = x.shape[1] // heads
    W = la.o_proj.weight.detach().double()
    def curve(R):
        if R is None:
            Wr, tr = W, test
        else:
            Rfull = head_block_rotation(R, heads)
            Wr, tr = W @ Rfull, test @ Rfull
        s = expand_head_scale(grouped_head_scale(column_scale([Wr]), heads, kv), heads, kv)
        return topk_error_curve(tr * s, Wr / s[None], relative=True)
    # per kv head PCA on fit rows (all q heads of the group), as `auto` computes it
    grouped = fit.view(fit.shape[0], kv, heads // kv, hd)
    Rs = head_rotations(torch.einsum("ngqi,ngqj->gij", grouped, grouped))
    ci, cr = curve(None), curve(Rs)
    w = x.shape[1]
    print(step.index, " ".join(f"{int(f*100)}%: {ci[int(w*(1-f))]:.4f}/{cr[int(w*(1-f))]:.4f}" for f in (0.3, 0.5, 0.7, 0.8)), flush=True)
