"""#7 (2026-11-23): residual bases shared by runs of consecutive layers (adopted in session 8 as `auto`'s
"run<G>" candidates, chosen by the real loss on held-out calibration sequences: check_loss_ranking.py).

seg<G>: layers in groups of G consecutive layers share one basis, the sink-preserving PCA (`pca_sink`) of the
group's summed normalised attention-input moments (4 calibration sequences), so residual adapters sit only at
group boundaries. Added as extra candidates by patching `rotsparse.methods` (prototype), then: `auto` with all
candidates, and each seg<G> against the identity, charged, at 40% / 50% on 4096 held-out tokens.
SmolLM2 (log: eval/results/experiments/segment_bases_smollm2-135m.log): seg5 everywhere (5 adapters, 1.6% extra
weights) 0.48 / 0.50 of the topk gap -- far better than the shared basis (0.64 / 0.61) -- but given the choice,
the calibrated chooser prefers seg10 in 20 layers (0.62 / 0.58), which is worse in reality: the error proxy does
not rank these bases right, so a group size would be a hand-set knob; not adopted.
With a third argument `first-token-dense` (log: segment_bases_first_token_dense_smollm2-135m.log): calibrate only
identity + the seg<G> candidates and evaluate each seg<G> with every window's first token computed densely:
seg5 0.48 / 0.49 (unchanged: its sink channels are kept), seg10 0.55 / 0.54 instead of 0.64 / 0.59: the
groups of 10 damage the sink token, which the 512 sampled error rows almost never contain -- why the proxy
mis-ranks them.
With `sink-rows` (log: segment_bases_sink_rows_smollm2-135m.log): candidates identity + seg<G>, and the error
rows always include each calibration sequence's first token, weighted by its share of tokens (sampled rows
/ tokens): the chooser then takes groups of 5 in layers 10-19 only, 0.55 / 0.54 -- better than 0.62 / 0.58,
short of groups of 5 everywhere (0.48 / 0.50). The proxy sees part of the sink damage, not all.
Usage: python eval/experiments/segment_bases.py MODEL 5,10 [first-token-dense | sink-rows]
"""
import contextlib, sys, copy, torch
from pathlib import Path
from first_token_dense import dense_first_token  # (this folder is on sys.path when run as a script)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rotsparse import methods
from rotsparse.api import sparsify, calibrate
from rotsparse.adapters import get_adapter
from rotsparse.calibration import normalized_rows
from rotsparse.config import SparsifyConfig
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model
from rotsparse.evaluation import perplexity
from rotsparse.methods import AutoOptions
from rotsparse.rotation import sink_preserving_rotation


def segment_bases(dense, cal, sizes) -> dict[str, list[torch.Tensor]]:
    """seg<G> for each G in `sizes`: per layer the basis of its run of G consecutive layers, the
    `sink_preserving_rotation` of the runs' summed normalised attention-input moments and sink rows over the
    first 4 calibration sequences `cal` (n, seq); the same tensor object for every layer of a run."""
    las = get_adapter(dense).layer_adapters(); L = len(las)
    mom = [0] * L; sink = [[] for _ in range(L)]
    def hook(l, eps):
        def h(m, args):
            r = normalized_rows(args[0][0], eps)
            mom[l] = mom[l] + r.T @ r / r.shape[0]; sink[l].append(r[:1])
        return h
    hs = [la.attn_input_norm.register_forward_pre_hook(hook(l, la.norm_eps(la.attn_input_norm))) for l, la in enumerate(las)]
    with torch.no_grad():
        for i in range(4):
            dense(input_ids=cal[i:i+1])
    for h in hs: h.remove()
    bases = {}
    for g in sizes:
        per = []
        for start in range(0, L, g):
            idx = range(start, min(L, start + g))
            q = sink_preserving_rotation(sum(mom[l] for l in idx), torch.cat([torch.cat(sink[l]) for l in idx]))
            per += [q] * len(idx)
        bases[f"seg{g}"] = per
    return bases


def add_candidates(bases: dict[str, list[torch.Tensor]]) -> tuple[str, ...]:
    """Patch `rotsparse.methods` (prototype) so that the names of `bases` are rotation candidates, layer by layer
    in calibration order; returns the names."""
    names = tuple(bases)
    methods.ROTATION_CANDIDATES = methods.ROTATION_CANDIDATES + names
    state = {"layer": 0}
    orig_cand, orig_cal = methods._candidate, methods._calibrate_layer
    def cand(name, *a):
        return bases[name][state["layer"]] if name in bases else orig_cand(name, *a)
    def cal_layer(*a, **k):
        out = orig_cal(*a, **k); state["layer"] += 1; return out
    methods._candidate, methods._calibrate_layer = cand, cal_layer
    return names


def main():
    torch.set_num_threads(1)
    model_name = sys.argv[1]
    sizes = [int(x) for x in sys.argv[2].split(",")]
    mode = sys.argv[3] if len(sys.argv) > 3 else "all"
    dense, tok = load_model(model_name)
    ev = load_texts("embedded", part="evaluation")
    cal = calibration_batch(tok, load_texts("embedded", part="calibration"), num_sequences=4, sequence_length=2048)
    names = add_candidates(segment_bases(dense, cal, sizes))
    cal_layer = methods._calibrate_layer  # (the counting wrapper add_candidates installed)
    if mode == "sink-rows":
        sample_positions, sink_rows = methods._sample_positions, {}

        def sample_with_sinks(token_mask, count, seed):
            masks = [mask.clone() for mask in sample_positions(token_mask, count, seed)]
            starts, start = [], 0
            for real, mask in zip(token_mask, masks):
                if real.any():
                    mask.view(-1)[int(real.reshape(-1).int().argmax())] = True
                    starts.append(start)
                start += int(mask.sum())
            tokens = sum(int(real.sum()) for real in token_mask)
            sink_rows.update(index=starts, weight=(start - len(starts)) / (tokens - len(starts)))
            return masks

        def weighted_rows(layer_adapter, attn_moment, rows, *args, **kwargs):
            scale = torch.ones(rows["h1"].shape[0], dtype=torch.float64)
            scale[sink_rows["index"]] = sink_rows["weight"] ** 0.5
            rows = {site: r if site == "sink" else r * scale[:, None] for site, r in rows.items()}
            return cal_layer(layer_adapter, attn_moment, rows, *args, **kwargs)
        methods._sample_positions, methods._calibrate_layer = sample_with_sinks, weighted_rows
    full = AutoOptions(rotations=("identity", "global", "pca_sink", "pca_scaled") + names)
    c = calibrate(dense, calibration=cal, config=SparsifyConfig(num_sequences=4, error_tokens=512),
                  options=full if mode == "all" else AutoOptions(rotations=("identity",) + names), progress=False)
    print("calibration s", c.seconds, flush=True)
    dppl = {"smollm2-135m": 11.55251647959292, "gemma3-270m": 12.963095807488683}[model_name]
    topk = {"smollm2-135m": {0.4: 2.74, 0.5: 7.323}, "gemma3-270m": {0.4: 2.67, 0.5: 7.731}}[model_name]
    from rotsparse.topk import ROTATION_BUFFER
    variants = {f"charged id+{n}": AutoOptions(rotations=("identity", n)) for n in names}
    if mode == "sink-rows":
        variants = {"sink rows in proxy, id+" + "+".join(names): AutoOptions(rotations=("identity",) + names)}
    elif mode == "first-token-dense":
        variants = {f"first token dense, {name}": options for name, options in variants.items()}
    else:
        variants = {"auto+segments": full, **variants}
    with dense_first_token() if mode == "first-token-dense" else contextlib.nullcontext():
        for vname, o in variants.items():
            for sp in (0.4, 0.5):
                m = sparsify(copy.deepcopy(dense), config=SparsifyConfig(sparsity=sp, num_sequences=4, error_tokens=512), calibrated=c.restricted(o), progress=False)
                choice, _ = methods.choose(c.restricted(o), m.rotsparse_plan.site_sizes, sp, m.rotsparse_plan.config.coefficients)
                p = perplexity(m, tok, ev, seqlen=2048, max_tokens=4096, progress=False).ppl
                extra = sum(getattr(x, ROTATION_BUFFER).numel() for x in m.modules() if hasattr(x, ROTATION_BUFFER))
                print(model_name, vname, sp, f"ppl {p:.3f} gap {p - dppl:+.3f} ratio {(p - dppl) / topk[sp]:.2f} rot-weights {extra} choice {''.join(map(str, choice))}", flush=True)


if __name__ == "__main__":
    main()
