"""Render perplexity gap vs effective sparsity (one line per method, one panel per model) as a PNG.

    python eval/plot.py eval/results/quality.jsonl eval/results/quality.png

Reads the JSON records written by eval/quality.py (keys: model, method, effective_sparsity, ppl_gap);
when a (model, method, sparsity) was run more than once, the last record wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_records(path: Path) -> list[dict]:
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[(record["model"], record["method"], round(record["sparsity"], 4))] = record
    return list(records.values())


def plot(records: list[dict], out: Path, methods: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for axis, model in zip(axes[0], models):
        rows = [r for r in records if r["model"] == model]
        for method in methods or sorted({r["method"] for r in rows}):
            points = sorted((r["effective_sparsity"], r["ppl_gap"]) for r in rows if r["method"] == method)
            if points:
                axis.plot(*zip(*points), marker="o", label=method)
        axis.set_title(model)
        axis.set_xlabel("effective sparsity (parameter-weighted)")
        axis.set_ylabel("perplexity gap (sparse - dense)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--methods", nargs="+", default=None, help="methods to draw (default: all)")
    args = parser.parse_args(argv)
    plot(load_records(args.records), args.out, args.methods)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
