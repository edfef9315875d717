"""ms/token of llama.cpp (llama-cpp-python) batch-1 decode on a GGUF file, optionally requantized first.

Run with the interpreter that has llama-cpp-python (here /work/venv-llama), pinned like rotsparse's runs:

    taskset -c 1 /work/venv-llama/bin/python eval/llamacpp_decode.py MODEL.gguf --types Q8_0 Q4_0 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp

FTYPES = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def requantize(source: Path, target: Path, name: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FTYPES[name], True, threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize to {name} failed")


def decode_ms(path: Path, threads: int, tokens: int, repeats: int, prompt: int = 16) -> float:
    model = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                            verbose=False)
    means = []
    for _ in range(repeats + 1):  # the first repeat warms up
        model.reset()
        model.eval(list(range(1, prompt + 1)))
        start = time.perf_counter()
        for step in range(tokens):
            model.eval([100 + step])
        means.append((time.perf_counter() - start) * 1000 / tokens)
    return statistics.median(means[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--types", nargs="*", default=["Q8_0", "Q4_0"], help="requantize to these first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        files = {"as given": args.gguf}
        for name in args.types:
            files[name] = Path(folder) / f"{name}.gguf"
            requantize(args.gguf, files[name], name, args.threads)
        for name, path in files.items():
            print(json.dumps({"gguf": args.gguf.name, "type": name, "threads": args.threads,
                              "ms_per_token": decode_ms(path, args.threads, args.tokens, args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
