"""Recovery training benchmark: does Q-Sparse training close the training-free sparsity gap?

On one model (default SmolLM2-135M) at one sparsity (default 0.5):

1. ppl of the original dense model on held-out text (the embedded corpus' evaluation part);
2. `rotsparse.sparsify` (the library's default method unless --method) -> ppl, training-free;
3. `rotsparse.recovery.recover` on the calibration part -> ppl after recovery;
4. the same training (steps, data order, schedule, trainable preset) on the dense model -> ppl, so that
   adapting to the text's domain is not mistaken for recovery.

Gaps (perplexity points):
    gap vs original dense   : ppl(sparse) - ppl(dense, untrained), before and after recovery
    gap vs dense trained    : ppl(sparse) - ppl(dense, trained),   before and after recovery
    removed fraction        : 1 - gap_after / gap_before, both measured against the dense-trained model

Results are written after every stage to OUT.json, and a table to OUT.md.

    python eval/recovery.py --steps 40 --out eval/results/recovery
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import rotsparse
from rotsparse.data import load_texts
from rotsparse.evaluation import perplexity
from rotsparse.models import load_model
from rotsparse.recovery import recover
from rotsparse.runtime import TopKLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default=None, help="sparsify method (default: the library's default)")
    parser.add_argument("--calib-sequences", type=int, default=8)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--l2-rescale", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="eval/results/recovery")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python eval/recovery.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record: dict = {"command": command, "settings": vars(args), "torch_threads": torch.get_num_threads(),
                    "stages": {}}
    started = time.perf_counter()

    def stage(name: str, **values) -> None:
        values["elapsed_s"] = round(time.perf_counter() - started, 1)
        record["stages"][name] = values
        summarize(record)
        out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        out.with_suffix(".md").write_text(markdown(record))
        print(f"[{values['elapsed_s']:8.1f}s] {name}: {values}", flush=True)

    dense, tokenizer = load_model(args.model)
    dense.eval()
    calibration = load_texts("embedded", part="calibration")
    evaluation = load_texts("embedded", part="evaluation")

    def ppl(model) -> float:
        return perplexity(model, tokenizer, evaluation, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens,
                          progress=False).ppl

    stage("dense_untrained", ppl=ppl(dense))

    sparse = copy.deepcopy(dense)
    rotsparse.sparsify(sparse, tokenizer, sparsity=args.sparsity, method=args.method, calibration="embedded",
                       num_sequences=args.calib_sequences, sequence_length=args.calib_length, progress=False)
    plan = rotsparse.plan_of(sparse)
    stage("sparse_untrained", ppl=ppl(sparse), method=plan.config.method,
          effective_sparsity=plan.effective_sparsity)

    train = dict(steps=args.steps, lr=args.lr, seqlen=args.seqlen, batch_size=args.batch_size,
                 gradient_accumulation=args.accumulation, warmup=args.warmup, trainable=args.trainable,
                 precision=args.precision, seed=args.seed, progress=False, log_every=0)
    result = recover(sparse, tokenizer, calibration, l2_rescale=True if args.l2_rescale else None, **train)
    stage("sparse_trained", ppl=ppl(sparse), train_seconds=round(result.seconds, 1), tokens=result.tokens,
          trainable_parameters=result.trainable_parameters, losses=[round(x, 4) for x in result.losses],
          effective_sparsity=rotsparse.plan_of(sparse).effective_sparsity, checks=after_training_checks(sparse))
    del sparse

    result = recover(dense, tokenizer, calibration, **train)
    stage("dense_trained", ppl=ppl(dense), train_seconds=round(result.seconds, 1), tokens=result.tokens,
          trainable_parameters=result.trainable_parameters, losses=[round(x, 4) for x in result.losses])


@torch.no_grad()
def after_training_checks(model) -> dict:
    """The trained model is still a rotsparse model: layout, save/load, decode kernel == masked path."""
    layout = all(m.weight.t().is_contiguous() for m in model.modules() if isinstance(m, TopKLinear))
    tokens = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    with tempfile.TemporaryDirectory() as directory:
        rotsparse.save(model, directory)
        restored = rotsparse.load(directory)
        load_error = (restored(tokens).logits - expected).abs().max().item()
        del restored
    generated = model.generate(tokens[:, :8], max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
    rotsparse.set_kernels(model, False)
    masked = model.generate(tokens[:, :8], max_new_tokens=6, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
    rotsparse.set_kernels(model, True)
    kernel_error = max((a - b).abs().max().item() for a, b in zip(generated.logits, masked.logits))
    return {"input_major_layout": layout, "save_load_max_logit_diff": load_error,
            "kernel_vs_masked_max_logit_diff": kernel_error,
            "kernel_tokens_equal": bool(torch.equal(generated.sequences, masked.sequences))}


def summarize(record: dict) -> None:
    stages = record["stages"]
    ppl = {name: values["ppl"] for name, values in stages.items() if "ppl" in values}
    summary = {}
    if {"dense_untrained", "sparse_untrained"} <= ppl.keys():
        summary["gap_vs_dense_before"] = ppl["sparse_untrained"] - ppl["dense_untrained"]
    if {"dense_untrained", "sparse_trained"} <= ppl.keys():
        summary["gap_vs_dense_after"] = ppl["sparse_trained"] - ppl["dense_untrained"]
    if {"dense_trained", "sparse_untrained", "sparse_trained"} <= ppl.keys():
        before = ppl["sparse_untrained"] - ppl["dense_trained"]
        after = ppl["sparse_trained"] - ppl["dense_trained"]
        summary.update(gap_vs_dense_trained_before=before, gap_vs_dense_trained_after=after,
                       removed_fraction=1 - after / before if before else float("nan"),
                       target_met=bool(before > 0 and 1 - after / before >= 0.4))
    record["summary"] = summary


def markdown(record: dict) -> str:
    stages, summary, settings = record["stages"], record["summary"], record["settings"]
    method = stages.get("sparse_untrained", {}).get("method", "?")
    effective = stages.get("sparse_untrained", {}).get("effective_sparsity")
    lines = [
        "# Recovery training (Q-Sparse STE) on " + settings["model"],
        "",
        "Command (from the repository root):",
        "",
        "```",
        record["command"],
        "```",
        "",
        f"Sparsify method: `{method}` (the library default at the time of the run unless --method was given), "
        f"requested sparsity {settings['sparsity']}"
        + (f", effective {effective:.4f}" if effective is not None else "")
        + f"; calibration {settings['calib_sequences']} x {settings['calib_length']} tokens.",
        f"Training: {settings['steps']} AdamW steps x {settings['batch_size']} x {settings['accumulation']} windows of "
        f"{settings['seqlen']} tokens from the embedded corpus' calibration part, lr {settings['lr']} (warm-up "
        f"{settings['warmup']}, cosine), trainable `{settings['trainable']}`, precision {settings['precision']}, "
        f"seed {settings['seed']}; the dense baseline gets exactly the same. torch threads: "
        f"{record['torch_threads']}.",
        f"Perplexity: evaluation part, first {settings['eval_tokens']} tokens, windows of "
        f"{settings['eval_seqlen']}.",
        "",
        "| model | ppl | train s |",
        "|---|---|---|",
    ]
    names = {"dense_untrained": "dense, original", "sparse_untrained": "sparse, training-free",
             "sparse_trained": "sparse, recovered", "dense_trained": "dense, same training"}
    for key, label in names.items():
        if key in stages:
            lines.append(f"| {label} | {stages[key]['ppl']:.3f} | {stages[key].get('train_seconds', '')} |")
    lines += ["", "| gap (ppl points) | before recovery | after recovery |", "|---|---|---|"]
    if "gap_vs_dense_before" in summary:
        after = summary.get("gap_vs_dense_after")
        lines.append(f"| vs original dense | {summary['gap_vs_dense_before']:.3f} | "
                     f"{'' if after is None else f'{after:.3f}'} |")
    if "gap_vs_dense_trained_before" in summary:
        lines.append(f"| vs dense trained the same way | {summary['gap_vs_dense_trained_before']:.3f} | "
                     f"{summary['gap_vs_dense_trained_after']:.3f} |")
        lines += ["", f"Removed fraction of the gap (vs dense trained) = 1 - after/before = "
                      f"**{summary['removed_fraction']:.3f}** (target >= 0.40: "
                      f"{'met' if summary['target_met'] else 'NOT met'})."]
    checks = stages.get("sparse_trained", {}).get("checks")
    if checks:
        lines += ["", "After training: " + ", ".join(f"{k} = {v}" for k, v in checks.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
