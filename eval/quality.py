"""Perplexity of every method x sparsity on real models: dense vs sparse, gap ratio against magnitude Top-K.

    python eval/quality.py --models smollm2-135m gemma3-270m --methods topk auto --sparsities 0.25 0.4 0.5 0.6

Each model is loaded once and kept dense in memory; every run sparsifies a deep copy. Calibrated methods
calibrate once per model (timed) and reuse that calibration for every sparsity (``sparsify(calibrated=)``).
Calibration: the embedded corpus' calibration part (or `--calibration-text`); evaluation: the embedded corpus'
held-out part, 2048-token windows.
One JSON record per run is appended to --out, and --markdown is re-rendered from all records in --out.

Methods: the library's (``topk``, ``larosa``, ``auto``) and ablations of ``auto`` (`VARIANTS`), which reuse
the ``auto`` calibration with fewer rotation candidates or another K allocation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from rotsparse import AutoOptions, SparsifyConfig, calibrate, sparsify
from rotsparse.config import METHODS, SITES
from rotsparse.runtime import ROTATION_BUFFER

RESULTS = Path(__file__).parent / "results"
ARTIFACTS = Path(__file__).resolve().parents[1] / "calibration"
LAROSA_COEFFICIENTS = METHODS["larosa"].site_coefficients

# name -> (library method, AutoOptions restricting the auto calibration, explicit site coefficients)
VARIANTS: dict[str, tuple[str, AutoOptions | None, tuple | None]] = {
    "topk": ("topk", None, None),
    "larosa": ("larosa", None, None),
    "larosa-uniform": ("larosa", None, (1.0, 1.0, 1.0, 1.0)),
    "auto": ("auto", AutoOptions(), None),
    "alloc": ("auto", AutoOptions(rotations=("identity",), scaling=False), None),
    "wina": ("auto", AutoOptions(rotations=("identity",), allocation="uniform"), None),
    "wina+rot": ("auto", AutoOptions(allocation="uniform"), None),
    "wina+alloc": ("auto", AutoOptions(rotations=("identity",)), None),
    "wina+rot+larosa-coef": ("auto", AutoOptions(allocation="uniform"), LAROSA_COEFFICIENTS),
    "auto-pca-only": ("auto", AutoOptions(rotations=("identity", "pca")), None),
    "auto-no-global": ("auto", AutoOptions(rotations=("identity", "pca", "pca_scaled")), None),
    "wina+global": ("auto", AutoOptions(rotations=("global",)), None),
    "auto-unweighted": ("auto", AutoOptions(loss_weighted=False, value_rotation=False), None),
    "auto-uncharged": ("auto", AutoOptions(charge_rotations=False), None),
    "auto-no-value-rotation": ("auto", AutoOptions(value_rotation=False), None),
    "auto-no-check": ("auto", AutoOptions(structure_check=False), None),
    "auto-per-site": ("auto", AutoOptions(per_reader=False), None),
    "auto-no-runs": ("auto", AutoOptions(rotations=("identity", "global", "pca_sink", "pca_scaled")), None),
    "wina-unweighted": ("auto", AutoOptions(rotations=("identity",), allocation="uniform", loss_weighted=False,
                                            value_rotation=False), None),
    "wina+alloc-unweighted": ("auto", AutoOptions(rotations=("identity",), loss_weighted=False, value_rotation=False),
                              None),
}


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "rotsparse"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def adapter_overhead(model: torch.nn.Module) -> float:
    """Multiply-adds of the residual adapters / output rotations per token, relative to the dense site linears."""
    extra = sum(getattr(m, ROTATION_BUFFER).numel() for m in model.modules() if hasattr(m, ROTATION_BUFFER))
    total = sum(params for layer in model.rotsparse_plan.site_sizes for _, params in layer)
    return extra / total


def chosen_plan(model) -> dict:
    """What `auto` chose for one sparsity: K per site (and per reader linear) per layer, residual basis and
    value rotation per layer, and the check loss of every residual-basis structure compared."""
    plan = model.rotsparse_plan
    return {"sparsity": plan.config.sparsity, "effective_sparsity": plan.effective_sparsity,
            "adapter_overhead": adapter_overhead(model),
            "sites": list(SITES), "keep_k": [list(layer_k) for layer_k in plan.keep_k],
            "reader_keep_k": [[list(site_k) for site_k in layer_k] for layer_k in plan.reader_keep_k],
            "widths": [[width for width, _ in layer] for layer in plan.site_sizes],
            "residual_basis": list(plan.residual_bases), "value_rotation": list(plan.value_rotated),
            "check_losses": dict(plan.check_losses)}


def write_artifact(path: Path, calibrated, config: SparsifyConfig, plans: list[dict], command: str,
                   commit: str, text: str = "embedded") -> None:
    """The calibration recipe and the per-layer choices of `auto` at every sparsity run, as JSON data."""
    text = "embedded (pydoc_data.topics), calibration part" if text == "embedded" else text
    recipe = {"text": text, "num_sequences": config.num_sequences,
              "sequence_length": config.sequence_length, "tokens": calibrated.tokens,
              "check_sequences": 0 if calibrated.check_input_ids is None else calibrated.check_input_ids.shape[0],
              "error_tokens": config.error_tokens, "loss_sensitivity_sequences": min(4, config.num_sequences),
              "seed": config.seed, "options": dataclasses.asdict(calibrated.options),
              "calibration_seconds": calibrated.seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"recipe": recipe, "command": command, "commit": commit}
    lines = ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in head.items())
    path.write_text("{\n" + lines + ',\n "plans": [\n  ' + ",\n  ".join(map(json.dumps, plans)) + "\n ]\n}\n")


def evaluate(model, tokenizer, texts, eval_tokens: int | None) -> tuple[float, int]:
    from rotsparse.evaluation import perplexity

    result = perplexity(model, tokenizer, texts, seqlen=2048, max_tokens=eval_tokens, progress=False)
    return result.ppl, result.tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--methods", nargs="+", default=["topk", "auto"], choices=sorted(VARIANTS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.4, 0.5, 0.6])
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--error-tokens", type=int, default=SparsifyConfig.error_tokens)
    parser.add_argument("--calibration-text", default="embedded",
                        help="calibration source (`rotsparse.data.load_texts`): default the embedded corpus' "
                             "calibration part; evaluation is always on its held-out part")
    parser.add_argument("--eval-tokens", type=int, default=None, help="default: the whole held-out part")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reuse-dense", action="store_true",
                        help="take the dense ppl from the latest record in --out with the same model and --eval-tokens")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.jsonl")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "quality.md")
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS,
                        help="where the default method's recipe and per-layer choices are written (MODEL/auto.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python eval/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from rotsparse.data import calibration_batch, load_texts
    from rotsparse.models import load_model

    eval_texts = load_texts("embedded", part="evaluation")
    commit = git_commit()
    for model_name in args.models:
        dense, tokenizer = load_model(model_name)
        previous = [r for r in map(json.loads, args.out.read_text().splitlines()) if r["model"] == model_name
                    and r.get("eval_tokens_requested") == args.eval_tokens] if args.reuse_dense else []
        if previous:
            dense_ppl, eval_tokens = previous[-1]["dense_ppl"], previous[-1]["eval_tokens"]
        else:
            dense_ppl, eval_tokens = evaluate(dense, tokenizer, eval_texts, args.eval_tokens)
        print(f"{model_name}: dense ppl {dense_ppl:.4f} over {eval_tokens} tokens", flush=True)
        # auto holds the last check_sequences rows out of calibration, for its structure check
        calibration_ids = calibration_batch(tokenizer, load_texts(args.calibration_text, part="calibration"),
                                            num_sequences=args.calibration_sequences + SparsifyConfig.check_sequences,
                                            sequence_length=2048)
        calibrations = {}
        topk_gaps: dict[float, float] = {}
        for name in args.methods:
            method, options, coefficients = VARIANTS[name]
            base_config = SparsifyConfig(method=method, num_sequences=args.calibration_sequences,
                                         error_tokens=args.error_tokens, site_coefficients=coefficients)
            calibrated = None
            if METHODS[method].calibrated:
                # the default candidates, plus any the variant needs (e.g. plain "pca"): its own calibration
                default = AutoOptions().rotations
                full = None if options is None else AutoOptions(
                    rotations=default + tuple(name for name in options.rotations if name not in default),
                    scaling=options.scaling, loss_weighted=options.loss_weighted,
                    value_rotation=options.loss_weighted or not options.scaling)
                key = (method, full)
                if key not in calibrations:
                    ids = (calibration_ids if METHODS[method].check_held_out
                           else calibration_ids[: args.calibration_sequences])
                    calibrations[key] = calibrate(dense, calibration=ids, config=base_config, options=full,
                                                  progress=False)
                calibrated = calibrations[key]
                if options is not None:
                    calibrated = calibrated.restricted(options)
            plans = []
            for sparsity in args.sparsities:
                model = copy.deepcopy(dense)
                config = dataclasses.replace(base_config, sparsity=sparsity)
                started = time.perf_counter()
                sparsify(model, config=config, calibrated=calibrated, progress=False)
                sparsify_seconds = time.perf_counter() - started
                if name == "auto":
                    plans.append(chosen_plan(model))
                started = time.perf_counter()
                sparse_ppl, _ = evaluate(model, tokenizer, eval_texts, args.eval_tokens)
                gap = sparse_ppl - dense_ppl
                if name == "topk":
                    topk_gaps[sparsity] = gap
                record = {
                    "model": model_name, "method": name, "sparsity": sparsity,
                    "effective_sparsity": model.rotsparse_plan.effective_sparsity,
                    "dense_ppl": dense_ppl, "sparse_ppl": sparse_ppl, "ppl_gap": gap,
                    "gap_ratio_vs_topk": gap / topk_gaps[sparsity] if sparsity in topk_gaps else None,
                    "adapter_overhead": adapter_overhead(model),
                    "calibration_seconds": None if calibrated is None else calibrated.seconds,
                    "error_seconds": None if calibrated is None else calibrated.error_seconds,
                    "calibration_tokens": 0 if calibrated is None else calibrated.tokens,
                    "error_tokens": args.error_tokens, "calibration_text": args.calibration_text,
                    "eval_tokens": eval_tokens,
                    "eval_tokens_requested": args.eval_tokens,
                    "eval_seconds": time.perf_counter() - started, "sparsify_seconds": sparsify_seconds,
                    "residual_bases": list(model.rotsparse_plan.residual_bases),
                    "check_losses": dict(model.rotsparse_plan.check_losses), "commit": commit, "command": command,
                }
                print(json.dumps(record), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                render(args.out, args.markdown)
                del model
            if name == "auto":
                write_artifact(args.artifacts / model_name / "auto.json", calibrated, base_config, plans, command,
                               commit, args.calibration_text)


def render(results: Path, markdown: Path) -> None:
    """Markdown tables from every record in `results`: the latest record per (model, method, sparsity,
    settings); gap ratios recomputed against the topk run with the same settings."""
    records = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        r.setdefault("calibration_text", "embedded")  # records written before the option existed
        records[(r["model"], r["eval_tokens"], r["calibration_text"], r["method"], r["sparsity"],
                 r["calibration_tokens"])] = r
    lines = ["# Perplexity: sparse methods vs magnitude Top-K", "",
             "Calibration text: named per table (`embedded`: the embedded corpus' calibration part); evaluation: the",
             "embedded corpus' held-out part (2048-token windows).",
             "gap = sparse ppl - dense ppl; ratio = gap / gap of `topk` at the same sparsity (target <= 0.5).",
             "Effective sparsity is parameter-weighted (`SparsityPlan.effective_sparsity`); adapters = extra",
             "multiply-adds of residual adapters / output rotations relative to the dense site linears.", ""]
    groups = {}
    for r in records.values():
        groups.setdefault((r["model"], r["eval_tokens"], r["calibration_text"]), []).append(r)
    for (model, eval_tokens, calibration_text), rows in sorted(groups.items()):
        dense = rows[0]["dense_ppl"]
        sparsities = sorted({r["sparsity"] for r in rows})
        topk = {r["sparsity"]: r["ppl_gap"] for r in rows if r["method"] == "topk"}
        calibration_tokens = sorted({r["calibration_tokens"] for r in rows if r["calibration_tokens"]})
        lines += [(f"## {model} (dense ppl {dense:.3f}, {eval_tokens} eval tokens, "
                   f"calibration text {calibration_text}, calibration tokens {calibration_tokens or '-'})"), "",
                  "| method | " + " | ".join(f"{s:.0%}: ppl (gap, ratio)" for s in sparsities)
                  + " | eff. sparsity | adapters | calib. s | commit |",
                  "|---|" + "---|" * len(sparsities) + "---|---|---|---|"]
        methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "topk", m != "auto", m))
        for method in methods:
            by_sparsity = {r["sparsity"]: r for r in rows if r["method"] == method}
            cells = []
            for s in sparsities:
                r = by_sparsity.get(s)
                if r is None:
                    cells.append("")
                    continue
                ratio = r["ppl_gap"] / topk[s] if s in topk and topk[s] > 0 else math.nan
                cells.append(f"{r['sparse_ppl']:.2f} ({r['ppl_gap']:+.2f}, {ratio:.2f})")
            effective = ", ".join(f"{r['effective_sparsity']:.3f}" for _, r in sorted(by_sparsity.items()))
            overhead = max(r["adapter_overhead"] for r in by_sparsity.values())
            seconds = next(iter(by_sparsity.values()))["calibration_seconds"]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {effective} | {overhead:.3f} | "
                         + ("-" if seconds is None else f"{seconds:.0f}") + " | "
                         + ", ".join(sorted({r.get("commit", "?") for r in by_sparsity.values()})) + " |")
        commands = sorted({r["command"] for r in rows})
        lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
