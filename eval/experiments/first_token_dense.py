"""Diagnostic for #7 (2026-11-23): do rotations fail because Top-K cuts the attention sink (each window's first token)?

Sparsify, then evaluate twice: every token sparse, and the first token of each window computed densely.
SmolLM2 at 50%: per-layer PCA bases (auto-uncharged) gap +4.07 -> +3.08 with the sink dense (the shared basis
and identity barely move): full PCAs spread the sink's massive activation. Gemma-3: no method changes much
(the forced shared basis stays catastrophic, +76 -> +65), so the sink is not why rotations fail there.
This led to `pca_sink` (sink channels left unrotated). Logs: eval/results/experiments/first_token_dense_*.log
(run with the calibration of `auto` as of commit 2a6b3f5, which had plain "pca"; here all candidates).
Usage: python eval/experiments/first_token_dense.py MODEL SPARSITY VARIANT[,VARIANT...]
"""
import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse import topk as topk_mod
from rotsparse.api import calibrate, sparsify
from rotsparse.config import SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.evaluation import perplexity
from rotsparse.methods import ROTATION_CANDIDATES, AutoOptions
from rotsparse.models import load_model


@contextlib.contextmanager
def dense_first_token():
    """While inside: every `TopKLinear` computes the first position of each multi-token input densely."""
    sparse_forward = topk_mod.TopKLinear.forward

    def forward(self, x):
        out = sparse_forward(self, x)
        if x.dim() == 3 and x.shape[1] > 1:
            out = out.clone(); out[:, :1] = F.linear(x[:, :1], self.weight, self.bias)
        return out

    topk_mod.TopKLinear.forward = forward
    try:
        yield
    finally:
        topk_mod.TopKLinear.forward = sparse_forward


def main():
    torch.set_num_threads(1)
    model_name, sp = sys.argv[1], float(sys.argv[2])
    variants = sys.argv[3].split(",")
    dense, tok = load_model(model_name)
    ev = load_texts("embedded", part="evaluation")
    cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
    c = calibrate(dense, calibration=cal, config=SparsifyConfig(num_sequences=4, error_tokens=512),
                  options=AutoOptions(rotations=ROTATION_CANDIDATES), progress=False)
    previous_auto = ("identity", "global", "pca", "pca_scaled")
    opts = {"auto": AutoOptions(rotations=previous_auto), "wina+global": AutoOptions(rotations=("global",)),
            "auto-uncharged": AutoOptions(rotations=previous_auto, charge_rotations=False),
            "wina+pca": AutoOptions(rotations=("pca",)), "wina+alloc": AutoOptions(rotations=("identity",))}
    dppl = perplexity(dense, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
    print("dense", dppl, flush=True)
    for name in variants:
        cfg = SparsifyConfig(sparsity=sp, method="topk" if name == "topk" else "auto", num_sequences=4,
                             error_tokens=512)
        m = sparsify(copy.deepcopy(dense), config=cfg, calibrated=None if name == "topk" else c.restricted(opts[name]),
                     progress=False)
        for sink in (False, True):
            with dense_first_token() if sink else contextlib.nullcontext():
                p = perplexity(m, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
            print(model_name, name, sp, "sink dense" if sink else "all sparse", f"ppl {p:.3f} gap {p - dppl:+.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
