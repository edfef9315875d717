"""The ``rotsparse`` command: run, sparsify, eval, bench, recover.

MODEL may be an alias of a pip-shipped model (smollm2-135m, gemma3-270m), a hub id, a local directory
(plain or sparsified), or a .gguf file. DATA may be ``embedded``, a .txt/.jsonl/.parquet file, or a hub
dataset name such as ``wikitext2``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_options(parser: argparse.ArgumentParser, sparsity_required: bool = True) -> None:
    from .config import METHODS

    parser.add_argument("--model", required=True, help="alias (smollm2-135m, gemma3-270m), hub id, directory or .gguf")
    parser.add_argument("--sparsity", type=float, required=sparsity_required,
                        help="parameter-weighted effective sparsity in [0, 1)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="sparsification method (default: the library default, see SparsifyConfig)")
    parser.add_argument("--calibration", default=None,
                        help="calibration DATA (calibration part): default the 'mixed' domain (pydoc prose + Python "
                             "source, rotsparse.data.DEFAULT_CALIBRATION); a domain name, 'embedded', a "
                             ".txt/.jsonl/.parquet file or a hub name")
    parser.add_argument("--num-sequences", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--calibration-seqlen", type=int, default=2048, help="calibration sequence length (default 2048)")
    parser.add_argument("--check-sequences", type=int, default=2,
                        help="further calibration sequences held out to choose auto's residual-basis structure by "
                             "their real loss (default 2; 0: the error proxy chooses)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _sparsify_settings(args) -> dict:
    settings = dict(sparsity=args.sparsity, calibration=args.calibration, num_sequences=args.num_sequences,
                    sequence_length=args.calibration_seqlen, check_sequences=args.check_sequences)
    if args.method is not None:
        settings["method"] = args.method
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotsparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the main job on the embedded default: SmolLM2-135M at 40%%, "
                                          "perplexity gap and decode speed-up, offline")
    run.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m)")
    run.add_argument("--sparsity", type=float, default=0.4, help="effective sparsity (default 0.4)")
    run.add_argument("--max-tokens", type=int, default=None, help="cap on evaluation tokens (default: all held-out text)")
    run.add_argument("--bench-tokens", type=int, default=32, help="decode steps per timing repeat (default 32)")
    run.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    sparsify = commands.add_parser("sparsify", help="sparsify a model and save it to a directory")
    _add_model_options(sparsify)
    sparsify.add_argument("--out", required=True, help="output directory (weights, tokenizer, rotsparse plan)")

    evaluate = commands.add_parser("eval", help="dense and sparse perplexity, gap, effective sparsity")
    _add_model_options(evaluate, sparsity_required=False)
    evaluate.add_argument("--data", default="embedded", help="evaluation DATA (default: embedded held-out part)")
    evaluate.add_argument("--seqlen", type=int, default=2048, help="evaluation window in tokens (default 2048)")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="use only the first N evaluation tokens")
    evaluate.add_argument("--tasks", default=None,
                          help="comma-separated lm-eval tasks for zero-shot accuracy (needs lm_eval)")
    evaluate.add_argument("--tasks-include-path", default=None, help="directory of extra lm-eval task YAMLs")
    evaluate.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    bench = commands.add_parser("bench", help="batch-1 decode latency, dense vs sparse, interleaved in one run")
    bench.add_argument("--model", required=True,
                       help="any MODEL eval takes, or synthetic:llama2-7b / synthetic:llama3-8b (random weights)")
    bench.add_argument("--layers", type=int, default=None, help="keep only N decoder layers (synthetic models)")
    bench.add_argument("--adapter-every", type=int, default=None,
                       help="synthetic models, rotating methods: a residual adapter after every G-th layer (default 1, "
                            "the worst case; G = the structure of auto's run<G> bases)")
    bench.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="weights dtype")
    bench.add_argument("--sparsity", type=float, required=True, help="effective sparsity in [0, 1)")
    bench.add_argument("--method", default=None, help="sparsification method (default: library default)")
    bench.add_argument("--tokens", type=int, default=64, help="decode steps per repeat (default 64)")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians reported (default 5)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    bench.add_argument("--device", default="cpu", help="where both models run, e.g. cpu or cuda (default cpu)")
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    recover = commands.add_parser("recover", help="Q-Sparse recovery training of a sparsified model")
    recover.add_argument("--model", required=True, help="alias, hub id, directory or .gguf of the dense model")
    recover.add_argument("--sparsity", type=float, required=True, help="effective sparsity in [0, 1)")
    recover.add_argument("--method", default=None, help="sparsification method (default: library default)")
    recover.add_argument("--steps", type=int, required=True, help="optimizer steps")
    recover.add_argument("--data", default="embedded",
                         help="DATA to calibrate and train on (default: embedded calibration part)")
    recover.add_argument("--lr", type=float, default=None, help="peak learning rate")
    recover.add_argument("--seqlen", type=int, default=None, help="training sequence length")
    recover.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    recover.add_argument("--out", required=True, help="output directory (model, tokenizer, recovery.json)")
    return parser


def _load(args):
    from .models import load_model

    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)


def evaluate_command(args) -> dict:
    """Dense and sparse perplexity of MODEL on DATA; the same numbers as the Python API gives."""
    from .api import sparsify
    from .data import load_texts
    from .evaluation import perplexity

    model, tokenizer = _load(args)
    texts = load_texts(args.data, part="evaluation")
    record = {"model": args.model, "data": args.data, "seqlen": args.seqlen}
    if hasattr(model, "rotsparse_plan"):
        if args.sparsity is not None:
            raise SystemExit("error: --model is already sparsified; drop --sparsity")
        sparse, dense_ppl = model, None
    else:
        if args.sparsity is None:
            raise SystemExit("error: --sparsity is required for a dense model")
        dense_ppl = perplexity(model, tokenizer, texts, seqlen=args.seqlen, max_tokens=args.max_tokens)
        sparse = sparsify(model, tokenizer, **_sparsify_settings(args))
    sparse_ppl = perplexity(sparse, tokenizer, texts, seqlen=args.seqlen, max_tokens=args.max_tokens)
    plan = sparse.rotsparse_plan
    record.update(
        method=plan.config.method, sparsity=plan.config.sparsity, effective_sparsity=plan.effective_sparsity,
        dense_ppl=None if dense_ppl is None else dense_ppl.ppl, sparse_ppl=sparse_ppl.ppl,
        ppl_gap=None if dense_ppl is None else sparse_ppl.ppl - dense_ppl.ppl,
        eval_tokens=sparse_ppl.tokens, calibration_tokens=plan.calibration_tokens,
    )
    if args.tasks:
        from .evaluation import zero_shot

        record["zero_shot"] = zero_shot(sparse, tokenizer, args.tasks.split(","), limit=args.limit,
                                        include_path=args.tasks_include_path)
    return record


def _print_record(record: dict, as_json: bool) -> None:
    for key, value in record.items():
        if key != "zero_shot":
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if "zero_shot" in record:
        print(json.dumps(record["zero_shot"], indent=2))
    if as_json:
        print(json.dumps(record))


def run_command(args) -> dict:
    """The main job: calibrate, sparsify, perplexity gap on held-out text, decode speed-up — one run."""
    from .bench import benchmark_decode, sparse_copy
    from .data import load_texts
    from .evaluation import perplexity
    from .models import load_model

    start = time.perf_counter()
    dense, tokenizer = load_model(args.model)
    texts = load_texts("embedded", part="evaluation")
    dense_ppl = perplexity(dense, tokenizer, texts, max_tokens=args.max_tokens)
    sparse = sparse_copy(dense, {"tokenizer": tokenizer, "sparsity": args.sparsity})
    sparse_ppl = perplexity(sparse, tokenizer, texts, max_tokens=args.max_tokens)
    speed = benchmark_decode(dense, sparse, tokens=args.bench_tokens, repeats=3)
    plan = sparse.rotsparse_plan
    return {
        "model": args.model, "method": plan.config.method, "sparsity": args.sparsity,
        "effective_sparsity": plan.effective_sparsity, "dense_ppl": dense_ppl.ppl, "sparse_ppl": sparse_ppl.ppl,
        "ppl_gap": sparse_ppl.ppl - dense_ppl.ppl, "eval_tokens": sparse_ppl.tokens,
        "calibration_tokens": plan.calibration_tokens,
        "dense_ms_per_token": speed.dense_ms_per_token, "sparse_ms_per_token": speed.sparse_ms_per_token,
        "decode_speedup": speed.speedup, "bytes_limit_speedup": speed.bytes_limit_speedup,
        "seconds": time.perf_counter() - start,
    }


def sparsify_command(args) -> dict:
    from .api import sparsify
    from .io import save

    model, tokenizer = _load(args)
    sparsify(model, tokenizer, **_sparsify_settings(args))
    save(model, args.out, tokenizer)
    plan = model.rotsparse_plan
    return {"model": args.model, "out": args.out, "method": plan.config.method,
            "effective_sparsity": plan.effective_sparsity}


def bench_command(args) -> dict:
    from .adapters import get_adapter
    from .bench import benchmark_decode, sparse_copy, structural_sparse_copy, synthetic_model
    from .config import SparsifyConfig
    from .topk import ROTATION_BUFFER

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    settings = {"sparsity": args.sparsity} | ({"method": args.method} if args.method else {})
    if args.model.startswith("synthetic:"):
        dense = synthetic_model(args.model.removeprefix("synthetic:"), num_layers=args.layers, dtype=dtype)
        dense.to(args.device)
        sparse = structural_sparse_copy(dense, SparsifyConfig(**settings), adapter_every=args.adapter_every or 1)
    else:
        if args.adapter_every is not None:
            raise ValueError("--adapter-every applies to synthetic models; a real model's adapters come from its "
                             "calibration")
        from .models import load_model

        dense, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        if args.layers is not None:
            del dense.model.layers[args.layers:]
            dense.config.num_hidden_layers = args.layers
        sparse = sparse_copy(dense, {"tokenizer": tokenizer, **settings})
    kernel_dense = structural_sparse_copy(dense, SparsifyConfig(sparsity=0.0, method="topk"))
    result = benchmark_decode(dense, sparse, tokens=args.tokens, repeats=args.repeats, kernel_dense=kernel_dense)
    adapters = sum(hasattr(layer, ROTATION_BUFFER) for layer in get_adapter(sparse).layers)
    return {"model": args.model, "layers": len(dense.model.layers), "residual_adapters": adapters,
            **result.to_dict()}


def recover_command(args) -> dict:
    from .recovery import recover_pretrained

    options = {key: value for key, value in
               (("lr", args.lr), ("seqlen", args.seqlen), ("batch_size", args.batch_size)) if value is not None}
    result = recover_pretrained(args.model, args.sparsity, args.steps, args.out, data=args.data, method=args.method,
                                **options)
    return {"model": args.model, "out": args.out, "steps": args.steps, "final_loss": result.final_loss}


COMMANDS = {"run": run_command, "sparsify": sparsify_command, "eval": evaluate_command, "bench": bench_command,
            "recover": recover_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError, FloatingPointError) as error:
        print(f"rotsparse {args.command}: error: {error}", file=sys.stderr)
        return 2
    _print_record(record, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
