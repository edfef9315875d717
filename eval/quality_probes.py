"""Probes of ideas to lower auto's perplexity gap out of domain (not maintained: docs/quality.md, "Probes").

    PYTHONPATH=. CAL=mixed taskset -c 0 env OMP_NUM_THREADS=1 python eval/quality_probes.py smollm2-135m 0.5 \
        topk,auto,topk+center,auto+center,auto+lr0.1,auto@0.57+lr0.05,auto@0.64+lr0.1,auto+alpha,auto+lsq,auto+sink,auto+xh12,auto+xh10.5

Variant syntax: METHOD[@SPARSITY]+MOD+MOD: ``center`` (Top-K of x - mean, mean added back: W (topk(x - m) + m)),
``lrF`` (low-rank compensation of the dropped part: W topk(x) + U_r S_r V_r^T (x - topk(x)), r = F * min(in, out),
SVD of each folded weight), ``alpha`` (per-output-row rescaling of W fitted on calibration text: the least-squares
scale of W topk(x) toward W x), ``lsq`` (W refitted to sparse inputs: argmin ||W x - W' topk(x)||^2 + ridge),
``sink`` (the first token of every window kept dense), ``xSITEF`` (auto's error curves of SITE scaled by F before
the allocation). CAL: calibration domain (default mixed); 4 x 2048 calibration tokens, 4,096 evaluation tokens.
"""
import os, copy, sys, time, json, types
from pathlib import Path
import torch, torch.nn.functional as F
from rotsparse.api import calibrate, sparsify
from rotsparse.config import AutoOptions, SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.evaluation import perplexity
from rotsparse.models import load_model
from rotsparse.runtime import TopKLinear
from rotsparse.topk import keep_topk

torch.set_num_threads(1)
MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
SP = [float(s) for s in (sys.argv[2].split(",") if len(sys.argv) > 2 else ["0.5"])]
VARIANTS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["topk", "auto", "topk+center", "auto+center"]
DOMAINS = ["pydoc", "licenses", "debian-docs", "translations"]
dense, tok = load_model(MODEL)
evals = {d: load_texts(d, part="evaluation") for d in DOMAINS}
cache = Path(f"/tmp/exp/cal_{MODEL}_{os.environ.get('CAL', 'mixed')}.pt"); cache.parent.mkdir(exist_ok=True)
ids = calibration_batch(tok, load_texts(os.environ.get("CAL", "mixed"), part="calibration"), num_sequences=6, sequence_length=2048)
if cache.exists():
    cal = torch.load(cache, weights_only=False)
else:
    t = time.time(); cal = calibrate(dense, calibration=ids, config=SparsifyConfig(num_sequences=4), progress=False)
    torch.save(cal, cache); print("calibrated", time.time() - t, flush=True)

def ppl(m, d):
    return perplexity(m, tok, evals[d], seqlen=2048, max_tokens=4096, progress=False).ppl

dense_ppl = {d: ppl(dense, d) for d in DOMAINS}
print("dense", dense_ppl, flush=True)

def collect_means(model, ids):
    sums, counts, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, TopKLinear):
            def hook(m, args, name=name):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])[1:]  # skip BOS/sink row of seq
                sums[name] = sums.get(name, 0) + x.sum(0); counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids[:4]:
            model(row[None])
    for h in hooks: h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}

def centred_forward(self, x):
    s = keep_topk(x - self.center, self.keep_k)
    return F.linear(s + self.center, self.weight, self.bias)

def lowrank_forward(self, x):
    s = keep_topk(x, self.keep_k)
    return F.linear(s, self.weight, self.bias) + (x - s) @ self.lr_v @ self.lr_u


def collect_pairs(model, ids, full):
    """Per TopKLinear: E[(Wx)_o (Ws)_o], E[(Ws)_o^2] (alpha) or E[x s^T], E[s s^T] (full)."""
    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, TopKLinear):
            def hook(m, args, name=name):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                s = keep_topk(x, m.keep_k)
                st = stats.setdefault(name, [0, 0])
                if full:
                    st[0] = st[0] + x.t() @ s; st[1] = st[1] + s.t() @ s
                else:
                    W = m.weight.detach().double(); yx = x @ W.t(); ys = s @ W.t()
                    st[0] = st[0] + (yx * ys).sum(0); st[1] = st[1] + (ys * ys).sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids[:4]:
            model(row[None])
    for h in hooks: h.remove()
    return stats

def sink_forward(self, x):
    if x.dim() >= 2 and x.shape[-2] > 1:
        s = keep_topk(x, self.keep_k)
        s = torch.cat([x[..., :1, :], s[..., 1:, :]], dim=-2)
        return F.linear(s, self.weight, self.bias)
    return F.linear(keep_topk(x, self.keep_k), self.weight, self.bias)

def build(variant, sparsity):
    base, *mods = variant.split("+")
    if "@" in base:
        base, sp = base.split("@"); sparsity = float(sp)
    model = copy.deepcopy(dense)
    cfg = SparsifyConfig(method=base, sparsity=sparsity, num_sequences=4)
    calibrated = cal
    if base == "auto" and any(m.startswith("x") for m in mods):
        calibrated = copy.deepcopy(cal)
        for m in [m for m in mods if m.startswith("x")]:
            site, factor = m[1:3], float(m[3:])
            for layer in calibrated.layers:
                layer.curves[site] = [c * factor for c in layer.curves[site]]
        mods = [m for m in mods if not m.startswith("x")]
    sparsify(model, config=cfg, calibrated=calibrated if base == "auto" else None, progress=False)
    plan = model.rotsparse_plan
    print("kept", [round(sum(plan.keep_k[l][s] for l in range(len(plan.keep_k))) / sum(plan.site_sizes[l][s][0] for l in range(len(plan.keep_k))), 3) for s in range(4)], flush=True)
    for mod in mods:
        if mod == "center":
            means = collect_means(model, ids)
            for name, m in model.named_modules():
                if isinstance(m, TopKLinear):
                    m.center = means[name]; m.forward = types.MethodType(centred_forward, m)
        elif mod in ("alpha", "lsq") or mod.startswith("lsq"):
            stats = collect_pairs(model, ids, full=mod != "alpha")
            for name, m in model.named_modules():
                if isinstance(m, TopKLinear) and m.keep_k < m.in_features:
                    W = m.weight.detach().double()
                    a, b = stats[name]
                    if mod == "alpha":
                        alpha = a / b.clamp_min(1e-12)
                        Wn = W * alpha[:, None]
                    else:
                        lam = float(mod[3:] or 0.01)
                        reg = lam * torch.diag(b).mean() * torch.eye(b.shape[0], dtype=b.dtype)
                        # W' = W A B^-1 shrunk toward W: minimise ||W x - W' s||^2 + lam ||(W'-W)||^2 scaled
                        Wn = torch.linalg.solve((b + reg).t(), (W @ a + W @ reg).t()).t()
                    with torch.no_grad():
                        m.weight.copy_(Wn.to(m.weight.dtype))
        elif mod == "sink":
            for name, m in model.named_modules():
                if isinstance(m, TopKLinear):
                    m.forward = types.MethodType(sink_forward, m)
        elif mod.startswith("lr"):
            frac = float(mod[2:])
            for name, m in model.named_modules():
                if isinstance(m, TopKLinear):
                    W = m.weight.detach().double()  # (out, in)
                    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                    r = max(1, int(frac * min(W.shape)))
                    m.lr_v = Vh[:r].t().float().contiguous(); m.lr_u = (U[:, :r] * S[:r]).t().float().contiguous()
                    m.forward = types.MethodType(lowrank_forward, m)
            extra = sum(m.lr_v.numel() + m.lr_u.numel() for m in model.modules() if isinstance(m, TopKLinear))
            total = sum(m.weight.numel() for m in model.modules() if isinstance(m, TopKLinear))
            print("lowrank bytes fraction", extra / total, "sparse eff", model.rotsparse_plan.effective_sparsity, flush=True)
    return model

out = Path(__file__).parent / "results" / "quality_probes.jsonl"
for sp in SP:
    topk_gap = {}
    for v in VARIANTS:
        t = time.time(); model = build(v, sp)
        row = {}
        for d in DOMAINS:
            row[d] = ppl(model, d) - dense_ppl[d]
        if v == "topk": topk_gap = row
        ratios = {d: round(row[d] / topk_gap[d], 3) for d in DOMAINS} if topk_gap else {}
        rec = {"model": MODEL, "sparsity": sp, "variant": v, "gap": row, "ratio": ratios, "s": round(time.time() - t)}
        print(json.dumps(rec), flush=True); out.open("a").write(json.dumps(rec) + "\n")
