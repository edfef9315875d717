"""#7 (2026-11-23): `pca_sink` (the layer's PCA leaving the sink channels unrotated) against the other candidates.

One calibration with identity / global / pca / pca_sink, then: `auto` with all four (charged), per-layer
identity-or-pca_sink uncharged, and charged identity / global / pca_sink, at 40% and 50%, 4096 held-out tokens.
Logs: eval/results/experiments/pca_sink_*.log (run before `pca_sink` fell back to the plain PCA in layers
whose sink is not concentrated: there it was the identity; SmolLM2 layers 0, 1, 10, 11).
"""
import os, sys, copy, math, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse.api import sparsify, calibrate
from rotsparse.config import SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model
from rotsparse.evaluation import perplexity
from rotsparse.methods import AutoOptions
torch.set_num_threads(1)
model_name = sys.argv[1]
dense, tok = load_model(model_name)
ev = load_texts("embedded", part="evaluation")
cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
full = AutoOptions(rotations=("identity", "global", "pca", "pca_sink"))
path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rotsparse_calib4_{model_name}.pt"
try:
    c = torch.load(path, weights_only=False)
except FileNotFoundError:
    c = calibrate(dense, calibration=cal, config=SparsifyConfig(num_sequences=4, error_tokens=512), options=full, progress=False)
    torch.save(c, path)
print("sink rotations:", ["-" if torch.equal(l.rotations[3], l.rotations[2]) else "S" for l in c.layers], flush=True)
# dense ppl and topk gaps at 4096 eval tokens: eval/results/quality_*.md
dppl = {"smollm2-135m": 11.55251647959292, "gemma3-270m": 12.963095807488683}[model_name]
topk = {"smollm2-135m": {0.4: 2.74, 0.5: 7.323}, "gemma3-270m": {0.4: 2.67, 0.5: 7.731}}[model_name]
variants = {
    "auto+sink": full,
    "uncharged id+sink": AutoOptions(rotations=("identity", "pca_sink"), charge_rotations=False),
    "charged id+global+sink": AutoOptions(rotations=("identity", "global", "pca_sink")),
}
for name, o in variants.items():
    for sp in (0.4, 0.5):
        m = sparsify(copy.deepcopy(dense), config=SparsifyConfig(sparsity=sp, num_sequences=4, error_tokens=512), calibrated=c.restricted(o), progress=False)
        p = perplexity(m, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
        from rotsparse.topk import ROTATION_BUFFER
        extra = sum(getattr(x, ROTATION_BUFFER).numel() for x in m.modules() if hasattr(x, ROTATION_BUFFER))
        print(model_name, name, sp, f"ppl {p:.3f} gap {p - dppl:+.3f} ratio {(p - dppl) / topk[sp]:.2f} rot-weights {extra}", flush=True)
