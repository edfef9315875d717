"""ms/token of llama.cpp (llama-cpp-python) batch-1 decode on a GGUF file, optionally requantized first.

Run with the interpreter that has llama-cpp-python (here /work/venv-llama), pinned like rotsparse's runs:

    taskset -c 1 /work/venv-llama/bin/python eval/llamacpp_decode.py MODEL.gguf --types Q8_0 Q4_0 --threads 1

`--serve` turns it into the llama.cpp side of `eval/anchor_bench.py`: one JSON request per stdin line, one JSON
answer per stdout line, so that a torch process can interleave llama.cpp timings with its own:

    {"op": "quantize", "source": S, "target": T, "type": "Q8_0", "threads": N}  -> {"ok": true}
    {"op": "load", "name": NAME, "path": P, "threads": N, "n_ctx": C}           -> {"ok": true}
    {"op": "time", "name": NAME, "tokens": T, "prompt": P}                       -> {"ms_per_token": MS}
    {"op": "unload", "name": NAME}                                               -> {"ok": true}
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp

FTYPES = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def requantize(source: Path, target: Path, name: str, threads: int) -> None:
    """`llama_model_quantize` of `source` to type `name` (Q8_0 / Q4_0), allowing an already quantized source."""
    if name not in FTYPES:
        raise ValueError(f"unknown llama.cpp type {name!r}; choose one of {sorted(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FTYPES[name], True, threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize of {source} to {name} failed")


def load(path: Path, threads: int, n_ctx: int = 512) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           verbose=False)


def time_decode(model: llama_cpp.Llama, tokens: int, prompt: int = 16) -> float:
    """Mean ms per single-token decode step over `tokens` steps after a fresh prefill of `prompt` tokens."""
    model.reset()
    model.eval(list(range(1, prompt + 1)))
    start = time.perf_counter()
    for step in range(tokens):
        model.eval([100 + step])
    return (time.perf_counter() - start) * 1000 / tokens


def serve() -> None:
    """Answer the JSON requests of the module docstring, one per line, until stdin closes."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol's own copy of stdout; anything else
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())       # written to stdout (llama.cpp's C logs) goes to stderr
    models: dict[str, llama_cpp.Llama] = {}
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "quantize":
                requantize(Path(request["source"]), Path(request["target"]), request["type"], request["threads"])
                answer = {"ok": True}
            elif op == "load":
                models[request["name"]] = load(Path(request["path"]), request["threads"], request["n_ctx"])
                answer = {"ok": True}
            elif op == "time":
                answer = {"ms_per_token": time_decode(models[request["name"]], request["tokens"], request["prompt"])}
            elif op == "unload":
                models.pop(request["name"]).close()
                answer = {"ok": True}
            else:
                answer = {"error": f"unknown op {op!r}"}
        except (KeyError, OSError, RuntimeError, ValueError) as error:  # answered, so the client raises it with the request that caused it
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), file=answers, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path, nargs="?")
    parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (see above)")
    parser.add_argument("--types", nargs="*", default=["Q8_0", "Q4_0"], help="requantize to these first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        return serve()
    if args.gguf is None:
        parser.error("give a GGUF file, or --serve")
    with tempfile.TemporaryDirectory() as folder:
        files = {"as given": args.gguf}
        for name in args.types:
            files[name] = Path(folder) / f"{name}.gguf"
            requantize(args.gguf, files[name], name, args.threads)
        for name, path in files.items():
            model = load(path, args.threads)
            time_decode(model, args.tokens)  # warm-up
            means = [time_decode(model, args.tokens) for _ in range(args.repeats)]
            print(json.dumps({"gguf": args.gguf.name, "type": name, "threads": args.threads,
                              "ms_per_token": statistics.median(means)}), flush=True)
            model.close()


if __name__ == "__main__":
    main()
