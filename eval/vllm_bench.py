"""Decode throughput of saved folders served by vLLM (offline `vllm.LLM`), side by side in one run.

    taskset -c 1 env OMP_NUM_THREADS=1 python eval/vllm_bench.py DENSE_DIR SPARSE_DIR [...] [--dtype float32 bfloat16]
        [--batches 1 8] [--tokens 64] [--repeats 5] [--json OUT]

Per dtype, one subprocess (vLLM holds process-wide state) starts a vLLM engine for every folder, in process,
on the cores this process may use (pin it: ``taskset``), and the folders take turns: each repeat times, for
every batch size B and every folder in turn, ``generate`` of B copies of a short prompt with 1 new token and
with 1 + `tokens` new tokens (end of sequence ignored); decode throughput = B x tokens / (difference of the two
times). Printed: the best repeat's tokens/s per folder, dtype and batch, and the median over repeats of each
folder's ratio to the first (dense) folder in the same repeat (turns taken seconds apart, so load from other
processes on a shared core affects both sides alike). The engines run eagerly (``enforce_eager``: no
torch.compile), as the sparse plugin was tested.

    python eval/vllm_bench.py --linears SPARSE_DIR [--dtype ...] [--batches 1 8]

times only the decoder linears of one step (every layer's fused q/k/v, o, fused gate/up, down; random weights
of the folder's shapes): vLLM's dense CPU linear (the weight packed as `UnquantizedLinearMethod` packs it,
oneDNN here) against the plugin's (`rotsparse.vllm_plugin.sparse_linear` with the plan's K per slice),
interleaved, best of 5 per side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "The Python interpreter reads a module, compiles it to bytecode and"


def worker(folders: list[str], dtype: str, batches: list[int], tokens: int, repeats: int) -> dict:
    """Decode tokens/s of every folder per batch size and repeat (one vLLM engine per folder, in this process)."""
    from vllm import LLM, SamplingParams

    engines = [LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=512, max_num_seqs=max(batches),
                   distributed_executor_backend="uni") for folder in folders]
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=1 + tokens, ignore_eos=True)
    for llm in engines:
        llm.generate([PROMPT], full, use_tqdm=False)  # warm-up
    rates = {folder: {str(batch): [] for batch in batches} for folder in folders}
    for _ in range(repeats):
        for batch in batches:
            for folder, llm in zip(folders, engines):
                start = time.perf_counter()
                llm.generate([PROMPT] * batch, first, use_tqdm=False)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                outputs = llm.generate([PROMPT] * batch, full, use_tqdm=False)
                total = time.perf_counter() - start
                assert all(len(output.outputs[0].token_ids) == 1 + tokens for output in outputs)
                rates[folder][str(batch)].append(batch * tokens / (total - prefill))
    return rates


def linears(directory: str, dtype: str, batches: list[int]) -> dict:
    """Microseconds per step of all decoder linears, dense (vLLM's CPU linear) and sparse (the plugin's)."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from rotsparse.families import FAMILIES
    from rotsparse.plan import read_plan
    from rotsparse.vllm_plugin import linear_sparsity, slice_groups, sparse_linear

    config = json.load(open(os.path.join(directory, "config.json")))
    plan, spec = read_plan(directory), FAMILIES[config["model_type"]]
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    intermediate = config["intermediate_size"]
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    shapes = {"self_attn.qkv_proj": (hidden, (heads * head_dim, kv, kv)),  # vLLM's Llama names and shapes
              "self_attn.o_proj": (heads * head_dim, (hidden,)),
              "mlp.gate_up_proj": (hidden, (intermediate, intermediate)), "mlp.down_proj": (intermediate, (hidden,))}
    torch_dtype, generator = getattr(torch, dtype), torch.Generator().manual_seed(0)
    dense, sparse = [], []
    for layer in range(len(plan.keep_k)):
        for name, (width, sizes) in shapes.items():
            weight = torch.randn(sum(sizes), width, generator=generator).to(torch_dtype) / width ** 0.5
            module = torch.nn.Module()
            module.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
            dispatch_cpu_unquantized_gemm(module, remove_weight=True)
            dense.append(module)
            sparsity = linear_sparsity(plan, spec, f"{spec.layers}.{layer}.{name}", packed)
            keep_k = sparsity.keep_k * (len(sizes) if len(sparsity.keep_k) == 1 else 1)
            groups = slice_groups(keep_k, sizes)
            sparse.append((width, [weight[start:end].t().contiguous() for start, end, _ in groups], groups, sparsity))

    def step_dense(batch):
        for module, (width, *_) in zip(dense, sparse):
            module.cpu_linear(inputs[batch][width], module.weight, None)

    def step_sparse(batch):
        for width, weights_t, groups, sparsity in sparse:
            sparse_linear(inputs[batch][width], weights_t, [None] * len(groups), groups, sparsity)

    inputs = {batch: {width: torch.randn(batch, width, generator=generator).to(torch_dtype)
                      for width in {hidden, heads * head_dim, intermediate}} for batch in batches}
    results = {}
    with torch.inference_mode():
        for batch in batches:
            times = {"dense": [], "sparse": []}
            for _ in range(5):
                for side, step in (("dense", step_dense), ("sparse", step_sparse)):
                    step(batch)
                    start = time.perf_counter()
                    step(batch)
                    times[side].append((time.perf_counter() - start) * 1e6)
            results[str(batch)] = {side: min(values) for side, values in times.items()}
    return results


def run_worker(dtype: str, args) -> dict:
    command = [sys.executable, __file__, *args.folders, "--worker", "--dtype", dtype, "--batches",
               *map(str, args.batches), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"vLLM ({dtype}) failed (exit code {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", help="saved folders; the first is the baseline (dense)")
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens timed per request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--linears", help="time the decoder linears of this sparse folder (see above)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.linears:
        print(f"{'dtype':<9} {'batch':>5} {'dense us':>9} {'sparse us':>9} {'dense/sparse':>12}")
        for dtype in args.dtype:
            for batch, times in linears(args.linears, dtype, args.batches).items():
                print(f"{dtype:<9} {batch:>5} {times['dense']:>9.0f} {times['sparse']:>9.0f} "
                      f"{times['dense'] / times['sparse']:>11.2f}x")
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.folders, args.dtype[0], args.batches, args.tokens, args.repeats)),
              flush=True)
        os._exit(0)  # several in-process engines do not tear down cleanly at interpreter exit
    if len(args.folders) < 2:
        parser.error("give a baseline folder and at least one more")
    records = []
    print(f"{'folder':<24} {'dtype':<9} {'batch':>5} {'tokens/s':>9} {'vs first':>8}")
    for dtype in args.dtype:
        rates = run_worker(dtype, args)
        for batch in map(str, args.batches):
            baseline = rates[args.folders[0]][batch]
            for folder in args.folders:
                ratio = statistics.median(rate / base for rate, base in zip(rates[folder][batch], baseline))
                records.append({"folder": folder, "dtype": dtype, "batch": int(batch),
                                "tokens_per_s": max(rates[folder][batch]), "ratio": ratio,
                                "repeats": rates[folder][batch]})
                print(f"{os.path.basename(os.path.normpath(folder)):<24} {dtype:<9} {batch:>5} "
                      f"{max(rates[folder][batch]):>9.1f} {ratio:>7.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "tokens": args.tokens, "repeats": args.repeats, "records": records},
                      handle, indent=1)


if __name__ == "__main__":
    main()
