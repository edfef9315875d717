"""Calibration-domain x evaluation-domain matrix: perplexity gap of every method vs magnitude Top-K.

    PYTHONPATH=. python eval/domains.py --model smollm2-135m --calibration-domains mixed \\
        --eval-domains pydoc python-code licenses debian-docs translations --methods topk auto \\
        --sparsities 0.25 0.4 0.5 0.6 --calibration-sequences 4 --eval-tokens 4096 --threads 1

Domains are `rotsparse.data.DOMAINS` (named offline text sources, each split by document into disjoint
calibration / evaluation parts) or hub names (``wikitext2``, ``c4``, any `load_texts` source with parts).
For each calibration domain ``auto`` is calibrated once (cached under --cache as a torch file, keyed by model,
domain, sequences and --calibration-tag) on its calibration part; every method is sparsified once per sparsity
and evaluated on the evaluation part of every evaluation domain (the first --eval-tokens tokens, 2048-token
windows). Evaluation text is checked to share no paragraph with the calibration text (`check_disjoint`).
Dense perplexity per (model, evaluation domain, tokens) and ``topk`` (which needs no calibration) are computed
once and reused from --out.

Methods: ``topk``, ``larosa``, and every ``auto`` ablation of eval/quality.py's `VARIANTS` (they reuse the one
``auto`` calibration via `Calibration.restricted`), plus `EXTRA_VARIANTS` below. ``NAME@check=DOMAIN``: variant
NAME whose structure check scores the candidates on DOMAIN's calibration part instead of held-out sequences of
the calibration domain. ``NAME+res1`` / ``NAME+res2`` (also ``topk+res2``): the same with
``SparsifyConfig.residual_bits`` 1 / 2 (the dropped inputs through a low-bit weight copy, at the same bytes read);
``NAME+res2b0.1``: only the largest dropped inputs, a band of 0.1 of each linear's inputs, through the copy
(``residual_band``).

One JSON record per (method, sparsity, evaluation domain) is appended to --out (raw perplexities and gaps, the
Top-K gap and the ratio), and --markdown is re-rendered from all records in --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from quality import VARIANTS, adapter_overhead, git_commit  # eval/quality.py (same folder)
from rotsparse.api import calibrate, sparsify
from rotsparse.config import IN_DOMAIN_ROTATIONS, AutoOptions, SparsifyConfig

RESULTS = Path(__file__).parent / "results"
SELECTION = "ties-to-lowest-index"
"""The Top-K rule the records were measured with (`kernels.reference.topk_keep`); Top-K gaps and dense
perplexities are reused only from records of the same rule (earlier records, without the field, broke ties as
torch.topk does, which moves Top-K's gaps by up to about a tenth)."""

# every residual-basis candidate `auto` can be offered (the calibration that every variant here restricts)
FULL_ROTATIONS = IN_DOMAIN_ROTATIONS

# further ablations / candidate defaults (name -> (library method, AutoOptions restricting auto, coefficients))
EXTRA_VARIANTS: dict[str, tuple[str, AutoOptions | None, tuple | None]] = {
    "auto-rotations": ("auto", AutoOptions(rotations=FULL_ROTATIONS), None),  # the previous default
    "auto-rotations-no-check": ("auto", AutoOptions(rotations=FULL_ROTATIONS, structure_check=False), None),
    "auto-identity": ("auto", AutoOptions(rotations=("identity",)), None),
    "wina+alloc-no-vrot": ("auto", AutoOptions(rotations=("identity",), value_rotation=False), None),
    "wina+vrot": ("auto", AutoOptions(rotations=("identity",), allocation="uniform"), None),
    "wina-no-vrot": ("auto", AutoOptions(rotations=("identity",), allocation="uniform", value_rotation=False), None),
    "auto-uniform": ("auto", AutoOptions(allocation="uniform"), None),
    "auto-identity-per-site": ("auto", AutoOptions(rotations=("identity",), per_reader=False), None),
    "auto-per-layer": ("auto", AutoOptions(allocation="layer"), None),  # TEAL's budget: every layer at s
    "auto-identity-no-vrot-per-site": ("auto", AutoOptions(rotations=("identity",), per_reader=False,
                                                           value_rotation=False), None),
    "wina+larosa-coef": ("auto", AutoOptions(rotations=("identity",), allocation="uniform"), (0.8, 1.2, 0.8, 1.2)),
    "auto-no-check-no-runs": ("auto", AutoOptions(rotations=("identity", "global", "pca_sink", "pca_scaled"),
                                                  structure_check=False), None),
}
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS}


def split_residual(name: str) -> tuple[str, dict]:
    """(method name without a ``+res<B>`` or ``+res<B>b<F>`` suffix, the `SparsifyConfig` fields it sets:
    residual_bits B, residual_band F)."""
    base, separator, suffix = name.rpartition("+res")
    bits, _, band = suffix.partition("b")
    if not separator or not bits.isdigit():
        return name, {}
    return base, {"residual_bits": int(bits), **({"residual_band": float(band)} if band else {})}


def full_options(options: AutoOptions | None) -> AutoOptions | None:
    """The calibration a variant restricts: the default candidates plus any the variant needs."""
    if options is None:
        return None
    return AutoOptions(rotations=FULL_ROTATIONS + tuple(n for n in options.rotations if n not in FULL_ROTATIONS),
                       scaling=options.scaling, loss_weighted=options.loss_weighted,
                       value_rotation=options.loss_weighted or not options.scaling)


def load_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration-domains", nargs="+", required=True)
    parser.add_argument("--eval-domains", nargs="+",
                        default=["pydoc", "python-code", "licenses", "debian-docs", "translations"])
    parser.add_argument("--methods", nargs="+", default=["topk", "auto"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.4, 0.5, 0.6])
    parser.add_argument("--calibration-sequences", type=int, default=4)
    parser.add_argument("--calibration-tag", default="v1",
                        help="part of the calibration cache key: change it when the calibration code changes")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rotsparse_calibrations"))
    parser.add_argument("--out", type=Path, default=RESULTS / "domains.jsonl")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "domains.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods if split_residual(m)[0].split("@")[0] not in {*ALL_VARIANTS, "topk"}]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(ALL_VARIANTS)}")
    command = "PYTHONPATH=. python eval/domains.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from rotsparse.data import calibration_batch, check_disjoint, load_texts
    from rotsparse.evaluation import perplexity
    from rotsparse.models import load_model

    commit = git_commit()
    dense, tokenizer = load_model(args.model)
    eval_texts = {d: load_texts(d, part="evaluation") for d in args.eval_domains}

    def evaluate(model, domain: str) -> tuple[float, int]:
        result = perplexity(model, tokenizer, eval_texts[domain], seqlen=2048, max_tokens=args.eval_tokens,
                            progress=False)
        return result.ppl, result.tokens

    def write(record: dict) -> None:
        print(json.dumps(record), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        render(args.out, args.markdown)

    previous = [r for r in load_records(args.out) if r["model"] == args.model and r["eval_tokens_requested"]
                == args.eval_tokens and r.get("selection") == SELECTION]
    dense_ppl = {}
    for domain in args.eval_domains:
        earlier = [r for r in previous if r["eval_domain"] == domain]
        if earlier:
            dense_ppl[domain] = (earlier[-1]["dense_ppl"], earlier[-1]["eval_tokens"])
        else:
            started = time.perf_counter()
            dense_ppl[domain] = evaluate(dense, domain)
            print(f"{args.model} dense ppl on {domain}: {dense_ppl[domain][0]:.3f} over {dense_ppl[domain][1]} "
                  f"tokens ({time.perf_counter() - started:.0f} s)", flush=True)
    topk_gap = {(r["eval_domain"], r["sparsity"]): r["ppl_gap"] for r in previous if r["method"] == "topk"}

    def run(name: str, calibration_domain: str | None, calibrated, config: SparsifyConfig, extra: dict) -> None:
        for sparsity in args.sparsities:
            todo = [d for d in args.eval_domains if name != "topk" or (d, sparsity) not in topk_gap]
            if not todo:
                continue
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            sparsify(model, config=dataclasses.replace(config, sparsity=sparsity), calibrated=calibrated,
                     progress=False)
            sparsify_seconds = time.perf_counter() - started
            plan = model.rotsparse_plan
            for domain in todo:
                started = time.perf_counter()
                sparse_ppl, tokens = evaluate(model, domain)
                base, _ = dense_ppl[domain]
                gap = sparse_ppl - base
                if name == "topk":
                    topk_gap[(domain, sparsity)] = gap
                reference = topk_gap.get((domain, sparsity))
                write({"model": args.model, "method": name, "calibration_domain": calibration_domain,
                       "calibration_sequences": args.calibration_sequences if calibrated is not None else 0,
                       "calibration_tag": args.calibration_tag if calibrated is not None else None,
                       "eval_domain": domain, "sparsity": sparsity, "effective_sparsity": plan.effective_sparsity,
                       "dense_ppl": base, "sparse_ppl": sparse_ppl, "ppl_gap": gap, "topk_gap": reference,
                       "gap_ratio_vs_topk": gap / reference if reference else None,
                       "eval_tokens": tokens, "eval_tokens_requested": args.eval_tokens,
                       "adapter_overhead": adapter_overhead(model),
                       "residual_bases": list(plan.residual_bases), "check_losses": dict(plan.check_losses),
                       "calibration_seconds": None if calibrated is None else calibrated.seconds,
                       "sparsify_seconds": sparsify_seconds, "eval_seconds": time.perf_counter() - started,
                       "commit": commit, "command": command, "selection": SELECTION, **extra})
            del model

    for name in args.methods:
        base_name, residual = split_residual(name)
        if base_name == "topk":
            run(name, None, None, SparsifyConfig(method="topk", **residual), {})
    for calibration_domain in args.calibration_domains:
        calibration_texts = load_texts(calibration_domain, part="calibration")
        for domain in args.eval_domains:  # never evaluate on calibration text
            check_disjoint(calibration_texts, eval_texts[domain])
        ids = calibration_batch(tokenizer, calibration_texts,
                                num_sequences=args.calibration_sequences + SparsifyConfig.check_sequences,
                                sequence_length=2048)
        calibrations = {}
        for name in args.methods:
            variant, residual = split_residual(name)
            if variant == "topk":
                continue
            base_name, _, check_spec = variant.partition("@")
            method, options, coefficients = ALL_VARIANTS[base_name]
            config = SparsifyConfig(method=method, num_sequences=args.calibration_sequences,
                                    site_coefficients=coefficients, **residual)
            key = (method, full_options(options))
            if key not in calibrations:
                label = method if key[1] is None or key[1] == AutoOptions(rotations=FULL_ROTATIONS) else \
                    f"{method}-{hashlib.sha1(repr(key[1]).encode()).hexdigest()[:8]}"
                path = (args.cache / f"{args.model}__{calibration_domain.replace('/', '_')}__"
                        f"{args.calibration_sequences}__{label}__{args.calibration_tag}.pt")
                if path.exists():
                    calibrations[key] = torch.load(path, weights_only=False)
                else:
                    started = time.perf_counter()
                    calibrations[key] = calibrate(dense, calibration=ids if method == "auto" else
                                                  ids[: args.calibration_sequences], config=config,
                                                  options=key[1], progress=False)
                    print(f"calibrated {method} on {calibration_domain}: {time.perf_counter() - started:.0f} s",
                          flush=True)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(calibrations[key], path)
            calibrated = calibrations[key]
            if options is not None:
                calibrated = calibrated.restricted(options)
            extra = {}
            if check_spec:
                check_domain = check_spec.removeprefix("check=")
                check_ids = calibration_batch(tokenizer, load_texts(check_domain, part="calibration"),
                                              num_sequences=SparsifyConfig.check_sequences, sequence_length=2048)
                calibrated = dataclasses.replace(calibrated, check_input_ids=check_ids)
                extra["check_domain"] = check_domain
            run(name, calibration_domain, calibrated, config, extra)


def render(results: Path, markdown: Path) -> None:
    """Markdown matrices from every record in `results` (latest record per key): per model, rows = calibration
    domain x method, columns = evaluation domain x sparsity, cells = gap / Top-K gap (the `topk` row: its raw
    perplexity gap). In-domain cells are marked with *."""
    records = {}
    for r in load_records(results):
        records[(r["model"], r["eval_tokens_requested"], r["calibration_domain"], r["calibration_sequences"],
                 r.get("calibration_tag"), r["method"], r["eval_domain"], r["sparsity"], r.get("selection"))] = r
    from rotsparse.data import MIXED_DOMAINS

    def in_domain(domain: str, calibration: str) -> bool:
        return domain == calibration or (calibration == "mixed" and domain in MIXED_DOMAINS)

    lines = ["# Calibration domain x evaluation domain: gap ratio vs magnitude Top-K", "",
             "Cell: (sparse ppl - dense ppl) / (Top-K ppl - dense ppl) on the evaluation part of the column's domain,",
             "same sparsity; the `topk` rows give Top-K's own perplexity gap. `*`: the evaluation domain is (part of)",
             "the calibration domain (its held-out documents; `mixed` = pydoc + python-code). Generated by",
             "eval/domains.py from the JSONL beside this file; commands at the end of each model's section.",
             "Rows marked `(torch.topk ties)` were measured before Top-K ties went to the lowest index (their ratios",
             "are against Top-K measured the same way, and their Top-K row is marked alike).", ""]
    models = sorted({(k[0], k[1]) for k in records})
    for model, eval_tokens in models:
        rows = [r for k, r in records.items() if k[0] == model and k[1] == eval_tokens]
        domains = list(dict.fromkeys(r["eval_domain"] for r in rows))
        sparsities = sorted({r["sparsity"] for r in rows})
        dense = {r["eval_domain"]: r["dense_ppl"] for r in rows}
        dense.update({r["eval_domain"]: r["dense_ppl"] for r in rows if r.get("selection") == SELECTION})
        lines += [f"## {model} ({eval_tokens} evaluation tokens per domain)", "",
                  "Dense ppl: " + ", ".join(f"{d} {dense[d]:.3f}" for d in domains), ""]
        for sparsity in sparsities:
            lines += [f"### {sparsity:.0%} sparsity", "",
                      "| calibration | method | " + " | ".join(domains) + " | mean out of domain |",
                      "|---|---|" + "---|" * (len(domains) + 1)]
            keys = sorted({(r["calibration_domain"] or "-", r["calibration_sequences"], r.get("calibration_tag"),
                            r["method"], r.get("selection") or "") for r in rows if r["sparsity"] == sparsity},
                          key=lambda k: (k[0] != "-", k[0], k[1], str(k[2]), k[3] != "auto", k[3], k[4]))
            for cal, sequences, tag, method, selection in keys:
                cells, out_of_domain = [], []
                for domain in domains:
                    match = [r for r in rows if (r["calibration_domain"] or "-") == cal and r["method"] == method
                             and r["calibration_sequences"] == sequences and r.get("calibration_tag") == tag
                             and r["eval_domain"] == domain and r["sparsity"] == sparsity
                             and (r.get("selection") or "") == selection]
                    if not match:
                        cells.append("")
                        continue
                    r = match[-1]
                    if method == "topk":
                        cells.append(f"{r['ppl_gap']:+.2f}")
                        continue
                    ratio = r["ppl_gap"] / r["topk_gap"] if r["topk_gap"] else math.nan
                    cells.append(f"{ratio:.2f}" + ("*" if in_domain(domain, cal) else ""))
                    if not in_domain(domain, cal):
                        out_of_domain.append(ratio)
                label = cal if cal == "-" else f"{cal} ({sequences} seq, {tag})"
                mean = f"{sum(out_of_domain) / len(out_of_domain):.2f}" if out_of_domain else ""
                name = method if selection == SELECTION else f"{method} (torch.topk ties)"
                lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {mean} |")
            lines.append("")
        commands = sorted({r["command"] for r in rows})
        lines += ["Commands:", ""] + [f"- `{c}`" for c in commands] + [""]
    markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
