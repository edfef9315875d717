"""The ``rotsparse`` command: run, sparsify, eval, bench, recover.

MODEL may be an alias of a pip-shipped model (smollm2-135m, gemma3-270m), a hub id, a local directory
(plain or sparsified), or a .gguf file. DATA may be a named offline domain (``mixed``, ``pydoc``,
``python-code``, ``licenses``, ``debian-docs``, ``translations``; `rotsparse.data.DOMAINS`), ``embedded``, a
.txt/.jsonl/.parquet file, or a hub dataset name such as ``wikitext2``. Every subcommand takes the same model, calibration and `SparsifyConfig`
flags (generated from the config's fields, with their defaults) and --json, -v/-q.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoConfig

from . import __version__
from .api import sparsify
from .bench import SYNTHETIC_SHAPES, benchmark_decode, sparse_copy, structural_sparse_copy, synthetic_model
from .compiled import MODES
from .config import AutoOptions, SparsifyConfig
from .data import DEFAULT_CALIBRATION, load_texts, looks_local
from .evaluation import perplexity, zero_shot
from .families import get_family
from .io import check_save_target, save
from .models import check_model_spec, hub_offline, load_model
from .plan import plan_of
from .recovery import recover_pretrained
from .runtime import ROTATION_BUFFER

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_PREFIX = "auto_"
"""`AutoOptions` fields become --auto-<field> flags (ablations of ``auto``)."""


EVALUATION_TEXT = "pydoc"
"""Default evaluation DATA: the embedded corpus' held-out topics without paragraphs repeated in calibration ones."""


class UsageError(Exception):
    """A bad argument, path or setting: exit code 2 (runtime errors exit with 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors go through `main`'s one error path instead of exiting."""

    def error(self, message: str):
        raise UsageError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_arguments(group, cls, prefix: str = "") -> None:
    """One flag per field of the frozen dataclass `cls`, its help from the field's ``help`` metadata (or the
    class docstring) and its default shown; the parsed value is None when the flag is not given, so that the
    dataclass's own default applies."""
    for item in dataclasses.fields(cls):
        metadata = item.metadata
        if metadata.get("cli", "") is None:
            continue
        flag = metadata.get("cli") or _flag(prefix + item.name)
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        kwargs = dict(dest=prefix + item.name, default=None,
                      help=f"{metadata.get('help', cls.__name__ + '.' + item.name)} (default: {default})")
        if "metavar" in metadata:
            kwargs["metavar"] = metadata["metavar"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple) or metadata.get("nargs"):
            kwargs.update(nargs=metadata.get("nargs", "+"), type=metadata.get("type", str))
        elif "choices" in metadata:
            cast = metadata.get("type", str)
            kwargs.update(choices=[cast(choice) for choice in metadata["choices"]()], type=cast)
        else:
            kwargs["type"] = metadata.get("type") or (type(default) if default is not None else str)
        group.add_argument(flag, **kwargs)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand takes: model, dtype, device, calibration DATA, the `SparsifyConfig` fields,
    ``auto``'s switches, --json and -v/-q."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="alias (smollm2-135m, gemma3-270m), hub id, directory or .gguf; bench also takes "
                             "synthetic:llama2-7b / synthetic:llama3-8b (random weights) (default: smollm2-135m)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: float32; bench: bfloat16)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--calibration", default=None,
                        help="calibration DATA (its calibration part): a domain name, 'embedded', a "
                             ".txt/.jsonl/.parquet file or a hub name (default: the 'mixed' domain, pydoc prose and "
                             "Python source; recover: its --data)")
    _add_dataclass_arguments(parser.add_argument_group("sparsify settings (SparsifyConfig)"), SparsifyConfig)
    _add_dataclass_arguments(parser.add_argument_group("auto's switches (AutoOptions; ablations)"), AutoOptions,
                             prefix=AUTO_PREFIX)
    parser.add_argument("--json", action="store_true",
                        help="print one strict JSON object (NaN/Inf as null) on stdout; everything else to stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress lines")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")


def config_from_args(args) -> SparsifyConfig:
    """The `SparsifyConfig` the flags describe (the config's defaults for flags not given)."""
    fields = {item.name: getattr(args, item.name) for item in dataclasses.fields(SparsifyConfig)
              if getattr(args, item.name, None) is not None}
    if fields.get("mlp_activation") == "None":
        fields["mlp_activation"] = None
    if "site_coefficients" in fields:
        fields["site_coefficients"] = tuple(fields["site_coefficients"])
    options = {item.name: getattr(args, AUTO_PREFIX + item.name) for item in dataclasses.fields(AutoOptions)
               if getattr(args, AUTO_PREFIX + item.name, None) is not None}
    if options:
        fields["options"] = AutoOptions(**options)
    return SparsifyConfig(**fields)


def _sparsify_settings(args) -> dict:
    """Keyword arguments of `sparsify` from the flags: the config's fields given, and the calibration DATA."""
    config = config_from_args(args)
    defaults = SparsifyConfig()
    settings = {item.name: getattr(config, item.name) for item in dataclasses.fields(SparsifyConfig)
                if getattr(config, item.name) != getattr(defaults, item.name)}
    return settings | {"calibration": args.calibration or DEFAULT_CALIBRATION}


def _add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, choices=MODES, metavar="MODE",
                        help="time compiled decode: dense and sparse alike through rotsparse.compile (torch.compile, "
                             "fullgraph) with a static KV cache; MODE: " + ", ".join(MODES)
                             + " (default without MODE: reduce-overhead)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rotsparse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rotsparse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        _add_common_options(sub)
        return sub

    run = command("run", "the main job on the embedded default: SmolLM2-135M at 40%%, calibrated on the 'mixed' "
                         "domain, perplexity gap on the held-out 'pydoc' text and decode speed-up, offline")
    run.add_argument("--max-tokens", type=int, default=None, help="cap on evaluation tokens (default: all held-out text)")
    run.add_argument("--bench-tokens", type=int, default=32, help="decode steps per timing repeat (default 32)")
    _add_compile_option(run)

    sparsify_parser = command("sparsify", "sparsify a model and save it to a directory")
    sparsify_parser.add_argument("--out", required=True, help="output directory (weights, tokenizer, rotsparse plan)")
    sparsify_parser.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")

    evaluate = command("eval", "dense and sparse perplexity, gap, effective sparsity")
    evaluate.add_argument("--data", default=EVALUATION_TEXT,
                          help=f"evaluation DATA (its evaluation part; default: {EVALUATION_TEXT})")
    evaluate.add_argument("--seqlen", type=int, default=2048, help="evaluation window in tokens (default 2048)")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="use only the first N evaluation tokens")
    evaluate.add_argument("--tasks", default=None,
                          help="comma-separated lm-eval tasks for zero-shot accuracy (needs lm_eval)")
    evaluate.add_argument("--tasks-include-path", default=None, help="directory of extra lm-eval task YAMLs")
    evaluate.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")

    bench = command("bench", "decode latency, dense vs sparse, interleaved in one run")
    bench.add_argument("--layers", type=int, default=None, help="keep only N decoder layers")
    bench.add_argument("--adapter-every", type=int, default=None,
                       help="synthetic models, rotating methods: a residual rotation after every G-th layer "
                            "(default 1, the worst case; G = the structure of auto's run<G> bases)")
    bench.add_argument("--tokens", type=int, default=64, help="decode steps per repeat (default 64)")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians reported (default 5)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    bench.add_argument("--batch-size", type=int, default=None,
                       help="sequences decoded together, one token each per step (default 1)")
    _add_compile_option(bench)

    recover = command("recover", "Q-Sparse recovery training of a sparsified model")
    recover.add_argument("--steps", type=int, required=True, help="optimizer steps")
    recover.add_argument("--data", default="embedded",
                         help="DATA to calibrate and train on (default: embedded calibration part)")
    recover.add_argument("--lr", type=float, default=None, help="peak learning rate")
    recover.add_argument("--seqlen", type=int, default=None, help="training sequence length")
    recover.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    recover.add_argument("--out", required=True, help="output directory (model, tokenizer, recovery.json)")
    return parser


def _load(args, default_dtype: str = "float32"):
    return load_model(args.model, dtype=DTYPES[args.dtype or default_dtype], device=args.device)


def evaluate_command(args) -> dict:
    """Dense and sparse perplexity of MODEL on DATA; the same numbers as the Python API gives."""
    model, tokenizer = _load(args)
    texts = load_texts(args.data, part="evaluation")
    record = {"model": args.model, "data": args.data, "seqlen": args.seqlen}
    progress = not args.quiet
    if hasattr(model, "rotsparse_plan"):
        if args.sparsity is not None:
            raise UsageError("--model is already sparsified; drop --sparsity")
        sparse, dense_ppl = model, None
    else:
        if args.sparsity is None:
            raise UsageError("--sparsity is required for a dense model")
        dense_ppl = perplexity(model, tokenizer, texts, seqlen=args.seqlen, max_tokens=args.max_tokens,
                               progress=progress)
        sparse = sparsify(model, tokenizer, progress=progress, **_sparsify_settings(args))
    sparse_ppl = perplexity(sparse, tokenizer, texts, seqlen=args.seqlen, max_tokens=args.max_tokens,
                            progress=progress)
    plan = plan_of(sparse)
    record.update(
        method=plan.config.method, sparsity=plan.config.sparsity, effective_sparsity=plan.effective_sparsity,
        dense_ppl=None if dense_ppl is None else dense_ppl.ppl, sparse_ppl=sparse_ppl.ppl,
        ppl_gap=None if dense_ppl is None else sparse_ppl.ppl - dense_ppl.ppl,
        eval_tokens=sparse_ppl.tokens, calibration_tokens=plan.calibration_tokens,
    )
    if args.tasks:
        record["zero_shot"] = zero_shot(sparse, tokenizer, args.tasks.split(","), limit=args.limit,
                                        include_path=args.tasks_include_path)
    return record


def run_command(args) -> dict:
    """The main job: calibrate, sparsify, perplexity gap on held-out text, decode speed-up — one run."""
    start = time.perf_counter()
    progress = not args.quiet
    dense, tokenizer = _load(args)
    texts = load_texts(EVALUATION_TEXT, part="evaluation")
    dense_ppl = perplexity(dense, tokenizer, texts, max_tokens=args.max_tokens, progress=progress)
    sparse = sparse_copy(dense, {"tokenizer": tokenizer, "progress": progress, **_sparsify_settings(args)})
    sparse_ppl = perplexity(sparse, tokenizer, texts, max_tokens=args.max_tokens, progress=progress)
    speed = benchmark_decode(dense, sparse, tokens=args.bench_tokens, repeats=3, compile_mode=args.compile)
    plan = plan_of(sparse)
    return {
        "model": args.model, "method": plan.config.method, "sparsity": plan.config.sparsity,
        "calibration": args.calibration or DEFAULT_CALIBRATION, "evaluation": EVALUATION_TEXT,
        "effective_sparsity": plan.effective_sparsity, "dense_ppl": dense_ppl.ppl, "sparse_ppl": sparse_ppl.ppl,
        "ppl_gap": sparse_ppl.ppl - dense_ppl.ppl, "eval_tokens": sparse_ppl.tokens,
        "calibration_tokens": plan.calibration_tokens,
        "dense_ms_per_token": speed.dense_ms_per_token, "sparse_ms_per_token": speed.sparse_ms_per_token,
        "decode_speedup": speed.speedup, "bytes_limit_speedup": speed.bytes_limit_speedup, "compiled": speed.compiled,
        "seconds": time.perf_counter() - start,
    }


def sparsify_command(args) -> dict:
    model, tokenizer = _load(args)
    check_save_target(model, args.out, args.overwrite)  # before calibrating, not after
    sparsify(model, tokenizer, progress=not args.quiet, **_sparsify_settings(args))
    save(model, args.out, tokenizer, overwrite=args.overwrite)
    plan = plan_of(model)
    return {"model": args.model, "out": args.out, "method": plan.config.method,
            "effective_sparsity": plan.effective_sparsity}


def bench_command(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    if args.model.startswith("synthetic:"):
        dense = synthetic_model(args.model.removeprefix("synthetic:"), num_layers=args.layers,
                                dtype=DTYPES[args.dtype or "bfloat16"])
        dense.to(args.device)
        sparse = structural_sparse_copy(dense, config, adapter_every=args.adapter_every or 1)
    else:
        if args.adapter_every is not None:
            raise UsageError("--adapter-every applies to synthetic models; a real model's residual rotations come "
                             "from its calibration")
        dense, tokenizer = _load(args, default_dtype="bfloat16")
        if args.layers is not None:
            get_family(dense).keep_layers(args.layers)
        sparse = sparse_copy(dense, {"tokenizer": tokenizer, "progress": not args.quiet, **_sparsify_settings(args)})
    kernel_dense = structural_sparse_copy(dense, SparsifyConfig(sparsity=0.0, method="topk"))
    if config.weight_bits is not None:  # the dense baseline quantized the same way, through the same kernels
        dense = structural_sparse_copy(dense, SparsifyConfig(sparsity=0.0, method="topk",
                                                             weight_bits=config.weight_bits,
                                                             group_size=config.group_size))
    result = benchmark_decode(dense, sparse, tokens=args.tokens, repeats=args.repeats, kernel_dense=kernel_dense,
                              compile_mode=args.compile, batch_size=args.batch_size or 1)
    family = get_family(sparse)
    rotations = sum(hasattr(layer, ROTATION_BUFFER) for layer in family.layers)
    return {"model": args.model, "method": config.method, "sparsity": config.sparsity, "layers": len(family.layers),
            "residual_adapters": rotations, "residual_bits": config.residual_bits,
            "residual_band": config.residual_band, "weight_bits": config.weight_bits,
            "group_size": config.group_size if config.weight_bits == 4 else None, **result.to_dict()}


def recover_command(args) -> dict:
    options = {key: value for key, value in
               (("lr", args.lr), ("seqlen", args.seqlen), ("batch_size", args.batch_size)) if value is not None}
    result = recover_pretrained(args.model, config_from_args(args), args.steps, args.out, data=args.data,
                                calibration=args.calibration, progress=not args.quiet, **options)
    return {"model": args.model, "out": args.out, "steps": args.steps, "final_loss": result.final_loss}


COMMANDS = {"run": run_command, "sparsify": sparsify_command, "eval": evaluate_command, "bench": bench_command,
            "recover": recover_command}


POSITIVE = ("max_tokens", "bench_tokens", "seqlen", "limit", "layers", "adapter_every", "tokens", "repeats",
            "threads", "steps", "batch_size")
"""Integer flags that must be >= 1 when given."""


def _config_error(error: Exception) -> UsageError:
    """A config error with the flag it is about named first."""
    message = str(error)
    fields = [(item, prefix) for cls, prefix in ((SparsifyConfig, ""), (AutoOptions, AUTO_PREFIX))
              for item in dataclasses.fields(cls)]
    for match in (lambda name: re.search(rf"\b{name}\b", message), lambda name: name.rstrip("s") in message):
        for item, prefix in fields:
            if match(item.name):
                flag = item.metadata.get("cli") or _flag(prefix + item.name)
                return UsageError(f"{flag}: {message}")
    return UsageError(message)


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name}: not a torch device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (no GPU, or torch was built without CUDA); "
                             f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {name}: unsupported device type {device.type!r}")


def _check_text_source(flag: str, source: str, part: str) -> None:
    """Read a local DATA file now (missing, empty, undecodable or malformed files are usage errors); with
    ``HF_HUB_OFFLINE`` a hub dataset too (from the cache, or a fast error)."""
    if source != "embedded" and (looks_local(source) or hub_offline()):
        try:
            load_texts(source, part=part)
        except (OSError, ValueError, TypeError, ImportError) as error:
            raise UsageError(f"{flag} {source}: {error}") from None


def _check_output_dir(flag: str, out: str, overwrite: bool, model: str) -> None:
    """--out must be a directory that can be created or written: not a file, not under a file, writable; and,
    unless `overwrite`, empty and not the --model folder (`rotsparse.io.save` refuses those too)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir() and not overwrite:
        raise UsageError(f"{flag} {out}: is a file; pass --overwrite to replace it")
    if path.is_dir() and not overwrite:
        if path.resolve() == Path(model).expanduser().resolve():
            raise UsageError(f"{flag} {out}: is the --model folder; save elsewhere or pass --overwrite")
        if any(path.iterdir()):
            raise UsageError(f"{flag} {out}: is not empty; pass --overwrite to replace it")
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {out}: {ancestor} is a file, not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".rotsparse-probe-", dir=ancestor)
    except OSError as error:
        raise UsageError(f"{flag} {out}: {ancestor} is not writable ({error.strerror})") from None
    shutil.rmtree(probe, ignore_errors=True)


def _check_block_size(args) -> None:
    """--block-size against the site widths in a local model folder's config.json (before loading weights;
    other models are checked by `sparsify` itself before it changes anything)."""
    block_size = getattr(args, "block_size", None)
    path = Path(args.model).expanduser()
    if not block_size or not (path / "config.json").is_file():
        return
    try:
        config = AutoConfig.from_pretrained(path).get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        widths = sorted({config.hidden_size, heads * head_dim, config.intermediate_size})
    except (OSError, ValueError, AttributeError, TypeError):
        return  # `load_model` names an unreadable config
    bad = [width for width in widths if width % block_size]
    if bad:
        raise UsageError(f"--block-size {block_size} does not divide the Top-K input widths {bad} of {args.model} "
                         f"(all widths: {widths})")


def check_args(args) -> None:
    """Every check of the parsed flags that needs no model: settings, numbers, device, paths, DATA files.
    Raises `UsageError` naming the flag."""
    try:
        config_from_args(args)
    except (ValueError, TypeError) as error:
        raise _config_error(error) from None
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {value}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {lr}")
    _check_device(args.device)
    if args.command == "bench" and args.model.startswith("synthetic:"):
        name = args.model.removeprefix("synthetic:")
        if name not in SYNTHETIC_SHAPES:
            raise UsageError(f"--model {args.model}: unknown synthetic model; choose one of "
                             f"{['synthetic:' + key for key in sorted(SYNTHETIC_SHAPES)]}")
    else:
        try:
            check_model_spec(args.model)
        except (OSError, ValueError, TypeError) as error:
            raise UsageError(f"--model {args.model}: {error}") from None
    _check_block_size(args)
    if args.calibration is not None:
        _check_text_source("--calibration", args.calibration, "calibration")
    data = getattr(args, "data", None)
    if data is not None:
        _check_text_source("--data", data, "evaluation" if args.command == "eval" else "calibration")
    if getattr(args, "out", None) is not None:
        _check_output_dir("--out", args.out, getattr(args, "overwrite", False), args.model)
    include = getattr(args, "tasks_include_path", None)
    if include is not None and not Path(include).expanduser().is_dir():
        raise UsageError(f"--tasks-include-path {include}: not a directory")


def json_safe(value):
    """`value` with NaN/Inf as None, tuples as lists and tensors as numbers, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _print_record(record: dict, file) -> None:
    for key, value in record.items():
        if key != "zero_shot":
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}", file=file)
    if "zero_shot" in record:
        print(json.dumps(json_safe(record["zero_shot"]), indent=2, allow_nan=False), file=file)


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Errors only with -q; else rotsparse's INFO lines (progress with ETA, results) and other libraries'
    warnings, -v their INFO lines too, -vv everything."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("rotsparse").setLevel(level if quiet else min(level, logging.INFO))


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    if not message:
        return type(error).__name__
    return message if isinstance(error, (UsageError, ValueError, FileNotFoundError)) else \
        f"{type(error).__name__}: {message}"


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error is one line on stderr (the traceback too with --debug): exit code 2 for
    usage errors (arguments, paths, settings, DATA files: all checked before a model loads), 1 for runtime
    errors, 130 when interrupted. With --json, stdout holds only the strict JSON record."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, command = "--debug" in argv, None
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("rotsparse").level)
    code = 0
    try:
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            check_args(args)
        except UsageError:
            code = 2
            raise
        _configure_logging(args.verbose, args.quiet)
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            record = COMMANDS[args.command](args)
            _print_record(record, sys.stdout)
        if args.json:
            print(json.dumps(json_safe(record), allow_nan=False), file=stdout)
        return 0
    except (Exception, KeyboardInterrupt) as error:
        if isinstance(error, KeyboardInterrupt):
            code, message = 130, "interrupted"
        else:
            code = 2 if code == 2 or isinstance(error, (UsageError, FileExistsError)) else 1
            message = _one_line(error)
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"rotsparse{' ' + command if command else ''}: error: {message}", file=sys.stderr)
        return code
    finally:
        root.setLevel(saved[0])
        for handler in [handler for handler in root.handlers if handler not in saved[1]]:
            root.removeHandler(handler)
        logging.getLogger("rotsparse").setLevel(saved[2])


if __name__ == "__main__":
    sys.exit(main())
