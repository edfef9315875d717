"""How many input rows a batched decode step reads: the share of each Top-K linear's input rows in the union of
B real tokens' kept rows (`topk` on SmolLM2-135M, B sequences of one evaluation domain at the same position, as
one batched decode step sees them), against independent tokens (1 - s^B).

    python eval/batch_union.py [--domain debian-docs] [--sequences 8] [--length 64] [--sparsities 0.4 0.5]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import rotsparse
from rotsparse.data import load_texts
from rotsparse.kernels.reference import topk_keep
from rotsparse.models import load_model
from rotsparse.runtime import TopKLinear


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="debian-docs")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.5])
    args = parser.parse_args(argv)
    batches = [b for b in (1, 2, 4, 8, 16) if b <= args.sequences]
    dense, tokenizer = load_model(args.model, dtype=torch.float32)
    ids = [tokenizer(text, return_tensors="pt").input_ids[0, :args.length]
           for text in load_texts(args.domain, part="evaluation")]
    batch = torch.stack([row for row in ids if len(row) == args.length][:args.sequences])
    print(f"| sparsity | {' | '.join(f'B={b}' for b in batches)} |\n|---|" + "---|" * len(batches))
    for sparsity in args.sparsities:
        model = copy.deepcopy(dense)
        rotsparse.sparsify(model, tokenizer, sparsity=sparsity, method="topk", progress=False)
        inputs = []
        hooks = [module.register_forward_hook(lambda module, args_, output: inputs.append((module.keep_k, args_[0])))
                 for module in model.modules() if isinstance(module, TopKLinear)]
        with torch.no_grad():
            model(batch)
        for hook in hooks:
            hook.remove()
        shares = {b: [] for b in batches}
        for keep_k, x in inputs:  # x (sequences, length, in): one position = one batched decode step
            keep = topk_keep(x, keep_k)
            for b in batches:
                shares[b] += [keep[:b, position].any(0).float().mean().item() for position in range(8, args.length)]
        cells = [f"{statistics.mean(shares[b]):.3f} (independent {1 - sparsity ** b:.3f})" for b in batches]
        print(f"| {sparsity:.0%} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
