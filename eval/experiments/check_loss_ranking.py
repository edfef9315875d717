"""#7 (2026-11-23, session 7): does the real loss on calibration text rank residual-basis structures as the
evaluation perplexity does (where the loss-weighted error proxy does not)?

Calibrates `auto` (with value rotations) on calibration sequences 0-3 with two extra candidates, bases shared
by runs of 5 / 10 consecutive layers (``seg5`` / ``seg10``: `sink_preserving_rotation` of the run's summed
moments, from segment_bases.py), then for each structure -- `auto` (the chooser: shared basis everywhere),
identity + seg5, identity + seg10 (both charged), `auto-uncharged` (per-layer bases, adapters not counted),
identity only -- measures the loss on calibration sequences 4-5 (4096 tokens of the calibration part, not used
to calibrate) and the perplexity gap on 4096 held-out tokens. SmolLM2 (log: check_loss_ranking_smollm2-135m.log):
the check loss ranks them as the evaluation does (50%: uncharged < seg5 < seg10 < auto ~ identity), and with
value rotations seg5 reaches 0.45 / 0.43 of the Top-K gap at 50% / 40% (1.6% adapter weights).
Adopted in session 8: `auto`'s "run<G>" candidates and its structure check (`AutoOptions.structure_check`).
Usage: python eval/experiments/check_loss_ranking.py MODEL [THREADS]
"""
import sys, copy, math, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from segment_bases import add_candidates, segment_bases  # (this folder is on sys.path when run as a script)
from rotsparse import methods
from rotsparse.api import sparsify, calibrate
from rotsparse.config import SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model
from rotsparse.evaluation import perplexity
from rotsparse.methods import AutoOptions
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
model_name = sys.argv[1]
dense, tok = load_model(model_name)
ev = load_texts("embedded", part="evaluation")
cal_all = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=8, sequence_length=2048)
cal, check = cal_all[:4], cal_all[4:6]
names = add_candidates(segment_bases(dense, cal, (5, 10)))
full = AutoOptions(rotations=("identity", "global", "pca_sink", "pca_scaled") + names)
c = calibrate(dense, calibration=cal, config=SparsifyConfig(num_sequences=4, error_tokens=512), options=full, progress=False)
print("calibration s", round(c.seconds), flush=True)
def check_loss(m):
    with torch.no_grad():
        losses = [m(input_ids=check[i:i+1], labels=check[i:i+1]).loss.item() for i in range(check.shape[0])]
    return sum(losses) / len(losses)
dense_check = check_loss(dense)
dppl = perplexity(dense, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
variants = {"auto": AutoOptions(), "seg5": AutoOptions(rotations=("identity", "seg5")), "seg10": AutoOptions(rotations=("identity", "seg10")),
            "uncharged": AutoOptions(charge_rotations=False), "identity": AutoOptions(rotations=("identity",))}
for sp in (0.5, 0.4):
    for vname, o in variants.items():
        m = sparsify(copy.deepcopy(dense), config=SparsifyConfig(sparsity=sp, num_sequences=4, error_tokens=512), calibrated=c.restricted(o), progress=False)
        choice, _ = methods.choose(c.restricted(o), m.rotsparse_plan.site_sizes, sp, m.rotsparse_plan.config.coefficients)
        cl = check_loss(m)
        p = perplexity(m, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
        print(model_name, sp, vname, f"check-loss gap {cl - dense_check:+.4f} (ppl ratio {math.exp(cl - dense_check):.3f}) eval gap {p - dppl:+.3f} choice {''.join(map(str, choice))}", flush=True)
