"""Perplexity of a model dense, sparse (default method), and both with weight-only int8 / int4 Top-K linears.

One calibration (``auto``, `--num-sequences` x 2048 tokens of the default ``mixed`` text) serves every sparsity;
"int8 / int4 dense" is the dense model through the same quantized Top-K linears at K = in (``topk`` at sparsity 0).
Evaluation: the first `--max-tokens` held-out tokens of ``pydoc``. Prints one JSON record per model and a markdown
table; the quantization gap (int ppl - float ppl) of the sparse model is compared with the dense model's.

    taskset -c 1 env OMP_NUM_THREADS=1 python eval/quantized_quality.py --models smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys

import torch

import rotsparse
from rotsparse.data import DEFAULT_CALIBRATION, load_texts
from rotsparse.evaluation import perplexity
from rotsparse.models import load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--formats", nargs="+", default=["8", "4:32", "4:64"], help="BITS[:GROUP]")
    parser.add_argument("--num-sequences", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = [(int(f.split(":")[0]), int(f.split(":")[1]) if ":" in f else 32) for f in args.formats]
    names = [f"int{bits}" + (f" g{group}" if bits == 4 else "") for bits, group in formats]
    texts = load_texts("pydoc", part="evaluation")
    command = shlex.join(["python", "eval/quantized_quality.py", *(argv if argv is not None else sys.argv[1:])])
    table = [f"Command: `{command}`", "",
             "| model | sparsity | float | " + " | ".join(names) + " | " + " | ".join(f"{n} gap" for n in names) + " |",
             "|---|---|---|" + "---|" * (2 * len(names))]
    for name in args.models:
        dense, tokenizer = load_model(name, dtype=torch.float32)

        def ppl(model):
            return perplexity(model, tokenizer, texts, max_tokens=args.max_tokens, progress=False).ppl

        record = {"model": name, "eval_tokens": args.max_tokens, "dense": ppl(dense)}
        for (bits, group), label in zip(formats, names):
            model = rotsparse.sparsify(copy.deepcopy(dense), sparsity=0.0, method="topk", weight_bits=bits,
                                       group_size=group, progress=False)
            record[f"dense {label}"] = ppl(model)
        rows = {0.0: [record["dense"]] + [record[f"dense {label}"] for label in names]}
        config = rotsparse.SparsifyConfig(num_sequences=args.num_sequences)
        calibrated = rotsparse.calibrate(dense, tokenizer, DEFAULT_CALIBRATION, config=config, progress=False)
        for sparsity in args.sparsity:
            settings = dict(sparsity=sparsity, calibrated=calibrated, num_sequences=args.num_sequences,
                            progress=False)
            sparse = rotsparse.sparsify(copy.deepcopy(dense), tokenizer, **settings)
            record[f"sparse {sparsity}"] = ppl(sparse)
            record[f"effective_sparsity {sparsity}"] = sparse.rotsparse_plan.effective_sparsity
            rows[sparsity] = [record[f"sparse {sparsity}"]]
            for (bits, group), label in zip(formats, names):
                model = rotsparse.sparsify(copy.deepcopy(dense), tokenizer, weight_bits=bits, group_size=group,
                                           **settings)
                record[f"sparse {sparsity} {label}"] = ppl(model)
                rows[sparsity].append(record[f"sparse {sparsity} {label}"])
        print(json.dumps(record), flush=True)
        for sparsity, values in rows.items():
            gaps = [value - values[0] for value in values[1:]]
            table.append(f"| {name} | {'dense' if sparsity == 0 else f'{sparsity:.0%}'} | "
                         + " | ".join(f"{value:.3f}" for value in values) + " | "
                         + " | ".join(f"{gap:+.3f}" for gap in gaps) + " |")
    print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
