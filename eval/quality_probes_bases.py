"""Probe: data-free residual bases from the readers' weights (not maintained: docs/quality.md, "Probes").

    PYTHONPATH=. taskset -c 0 env OMP_NUM_THREADS=1 python eval/quality_probes_bases.py smollm2-135m 0.5 auto,w,wh1,w-only

``weights``: eigenvectors of the trace-normalised Gram matrices of the (Fisher-weighted, norm-folded) h1 and h3
readers; ``weights_h1``: of the h1 readers only. In that basis the readers' columns are orthogonal, so Top-K of
the scaled input is the output-error-optimal selection for each token.
"""
import copy, sys, time, json
from pathlib import Path
import torch
from rotsparse.api import calibrate, sparsify
from rotsparse.config import AutoOptions, SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.evaluation import perplexity
from rotsparse.models import load_model
torch.set_num_threads(1)
MODEL = sys.argv[1]; SP = float(sys.argv[2])
VARS = {"auto": ("identity",), "w": ("identity", "weights"), "wh1": ("identity", "weights_h1"),
        "w-only": ("weights",), "wh1-only": ("weights_h1",)}
chosen = sys.argv[3].split(",")
DOMAINS = ["pydoc", "licenses", "debian-docs", "translations"]
dense, tok = load_model(MODEL)
evals = {d: load_texts(d, part="evaluation") for d in DOMAINS}
cache = Path(f"/tmp/exp/wcal_{MODEL}.pt")
ids = calibration_batch(tok, load_texts("mixed", part="calibration"), num_sequences=6, sequence_length=2048)
full = AutoOptions(rotations=("identity", "weights", "weights_h1"), structure_check=False)
if cache.exists(): cal = torch.load(cache, weights_only=False)
else:
    t = time.time(); cal = calibrate(dense, calibration=ids, config=SparsifyConfig(num_sequences=4), options=full, progress=False)
    torch.save(cal, cache); print("calibrated", time.time() - t, flush=True)
ppl = lambda m, d: perplexity(m, tok, evals[d], seqlen=2048, max_tokens=4096, progress=False).ppl
dense_ppl = {d: ppl(dense, d) for d in DOMAINS}
m = copy.deepcopy(dense); sparsify(m, method="topk", sparsity=SP, progress=False)
topk = {d: ppl(m, d) - dense_ppl[d] for d in DOMAINS}
print("topk", topk, flush=True)
for v in chosen:
    m = copy.deepcopy(dense)
    c = cal.restricted(AutoOptions(rotations=VARS[v], structure_check=False))
    sparsify(m, config=SparsifyConfig(sparsity=SP, num_sequences=4), calibrated=c, progress=False)
    gap = {d: ppl(m, d) - dense_ppl[d] for d in DOMAINS}
    rec = {"model": MODEL, "sp": SP, "variant": v, "ratio": {d: round(gap[d] / topk[d], 3) for d in DOMAINS},
           "bases": list(m.rotsparse_plan.residual_bases)[:40], "eff": m.rotsparse_plan.effective_sparsity}
    print(json.dumps(rec), flush=True); open(Path(__file__).parent / "results" / "quality_probes.jsonl", "a").write(json.dumps(rec) + "\n")
