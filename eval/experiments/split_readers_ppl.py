"""#7 (session 8): what a K per reader linear (q, k, v; gate, up) instead of one K per site does to perplexity.

split_readers.py showed, on the proxy only, 8% lower summed error on Gemma-3. Here: an `auto` calibration with
the identity residual basis (what `auto` picks on Gemma-3) and value rotations, every reader's error curve
recorded; K allocated per site (as the library does) and per reader linear (same parameter-weighted budget);
the per-reader K written into the sparsified model's TopKLinears; perplexity gap on the first 4,096 held-out
tokens as a ratio to the `topk` gap in eval/results/quality_<short>.jsonl.
Usage: python eval/experiments/split_readers_ppl.py MODEL SPARSITY[,SPARSITY...]
Ran at commit 1232849, when `auto` allocated K per site; since session 9 `auto` allocates K per reader itself
(`AutoOptions.per_reader`), so this script's per-site comparison needs `AutoOptions(per_reader=False)` now.
"""
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse import methods
from rotsparse.adapters import get_adapter
from rotsparse.api import calibrate, site_sizes_for, sparsify
from rotsparse.config import SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.evaluation import perplexity
from rotsparse.methods import AutoOptions, allocate_by_error
from rotsparse.models import load_model

torch.set_num_threads(1)
model_name = sys.argv[1]
sparsities = [float(s) for s in sys.argv[2].split(",")]
short = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma"}[model_name]
records = [json.loads(line) for line in (Path(__file__).parents[1] / f"results/quality_{short}.jsonl").open()]
dense_ppl = records[-1]["dense_ppl"]
topk_gap = {r["sparsity"]: r["ppl_gap"] for r in records if r["method"] == "topk" and r["eval_tokens"] == 4094}
calls = []
original_curve = methods.topk_error_curve


def recording_curve(*args, **kwargs):
    calls.append(original_curve(*args, **kwargs))
    return calls[-1]


methods.topk_error_curve = recording_curve
dense, tokenizer = load_model(model_name)
ids = calibration_batch(tokenizer, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
config = SparsifyConfig(num_sequences=4, error_tokens=512, check_sequences=0)
calibrated = calibrate(dense, calibration=ids, config=config,
                       options=AutoOptions(rotations=("identity",), per_reader=False), progress=False)
adapter = get_adapter(dense)
sizes = site_sizes_for(adapter)
per_layer = len(calls) // len(sizes)
assert per_layer == 8, per_layer  # h2 (plain, value-rotated), h4, q, k, v, gate, up
joint_curves, split_curves, split_sizes = [], [], []
for index, layer_adapter in enumerate(adapter.layer_adapters()):
    h2, h2_rotated, h4, q, k, v, gate, up = calls[8 * index : 8 * index + 8]
    value = torch.minimum(h2, h2_rotated)
    joint_curves.append([q + k + v, value, gate + up, h4])
    split_curves.append([q, k, v, value, gate, up, h4])
    modules = layer_adapter.site_modules()
    linears = modules["h1"] + modules["h2"] + modules["h3"] + modules["h4"]
    split_sizes.append(tuple((m.in_features, m.in_features * m.out_features) for m in linears))
eval_texts = load_texts("embedded", part="evaluation")
for sparsity in sparsities:
    joint_k, _ = allocate_by_error(joint_curves, sizes, sparsity)
    split_k, _ = allocate_by_error(split_curves, split_sizes, sparsity)
    model = sparsify(copy.deepcopy(dense), config=SparsifyConfig(**{**config.to_dict(), "sparsity": sparsity}),
                     calibrated=calibrated, progress=False)
    assert model.rotsparse_plan.keep_k == joint_k, "the library's allocation differs from the recorded curves'"
    for layer_adapter, layer_k in zip(get_adapter(model).layer_adapters(), split_k):
        modules = layer_adapter.site_modules()
        for module, keep_k in zip(modules["h1"] + modules["h2"] + modules["h3"] + modules["h4"], layer_k):
            module.keep_k = int(keep_k)
    kept = sum(k * p // w for layer_k, layer in zip(split_k, split_sizes) for k, (w, p) in zip(layer_k, layer))
    total = sum(p for layer in split_sizes for _, p in layer)
    ppl = perplexity(model, tokenizer, eval_texts, seqlen=2048, max_tokens=4096, progress=False).ppl
    gap = ppl - dense_ppl
    print(model_name, sparsity, f"per-reader K: effective sparsity {1 - kept / total:.4f} gap {gap:+.3f} "
          f"ratio {gap / topk_gap[sparsity]:.2f}; layer 3 K per site {joint_k[3]} per reader {split_k[3]}", flush=True)
