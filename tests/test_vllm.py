"""Serving a saved folder with vLLM (`rotsparse.vllm_plugin`).

The plugin's pure parts (slice groups, plan lookup by vLLM layer name, what is refused, the sparse product) run
everywhere; the end-to-end checks need vLLM (``pip install "rotsparse[vllm]"`` in an environment of its own,
see .ci/run) and are skipped without it. Each vLLM run is a subprocess (vLLM's engine holds process-wide
state); the folders are tiny random Llamas with a byte-pair tokenizer, in float32 on the CPU.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

import rotsparse
from rotsparse.families import FAMILIES
from rotsparse.kernels import topk_mask
from rotsparse.plan import SparsityPlan
from rotsparse.vllm_plugin import LinearSparsity, check_servable, linear_sparsity, slice_groups, sparse_linear

from tiny_models import tiny_config, tiny_tokenizer

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
"""vLLM's ``LlamaForCausalLM.packed_modules_mapping``."""


def reader_plan(layers: int = 2, **fields) -> SparsityPlan:
    """A plan for a 64-wide Llama (q 64, k/v 32 outputs; MLP 128) with a different K for every reader."""
    sizes = (((64, 64 * 64), (64, 64 * 32), (64, 64 * 32)), ((64, 64 * 64),),
             ((64, 64 * 128), (64, 64 * 128)), ((128, 128 * 64),))
    keep = (((40, 20, 30), (33,), (50, 25), (70,)), ((10, 10, 60), (64,), (32, 32), (100,)))[:layers]
    return SparsityPlan.from_readers(keep, (sizes,) * layers, **{"rotated": False, **fields})


def test_slice_groups_merge_adjacent_slices_with_equal_k():
    assert slice_groups((40, 20, 30), (64, 32, 32)) == ((0, 64, 40), (64, 96, 20), (96, 128, 30))
    assert slice_groups((10, 10, 60), (64, 32, 32)) == ((0, 96, 10), (96, 128, 60))
    assert slice_groups((7, 7), (5, 5)) == ((0, 10, 7),)
    with pytest.raises(ValueError, match="2 K values for 3"):
        slice_groups((1, 2), (4, 4, 4))


def test_vllm_linear_names_map_to_the_plans_reader_k():
    plan, llama = reader_plan(), FAMILIES["llama"]
    qkv = linear_sparsity(plan, llama, "model.layers.0.self_attn.qkv_proj", LLAMA_PACKED)
    assert qkv == LinearSparsity(width=64, keep_k=(40, 20, 30))
    assert linear_sparsity(plan, llama, "model.layers.1.mlp.gate_up_proj", LLAMA_PACKED).keep_k == (32, 32)
    assert linear_sparsity(plan, llama, "model.layers.1.mlp.down_proj", LLAMA_PACKED) == LinearSparsity(128, (100,))
    assert linear_sparsity(plan, llama, "language_model.model.layers.0.self_attn.o_proj", {}).keep_k == (33,)
    assert linear_sparsity(plan, llama, "lm_head", LLAMA_PACKED) is None
    with pytest.raises(ValueError, match="not one site's reader"):
        linear_sparsity(plan, llama, "model.layers.0.self_attn.qkv_proj", {})  # vLLM's fused name, no mapping
    with pytest.raises(ValueError, match="layer 2, the plan has 2 layers"):
        linear_sparsity(plan, llama, "model.layers.2.mlp.down_proj", LLAMA_PACKED)
    site_plan = SparsityPlan(keep_k=((40, 33, 50, 70),), site_sizes=plan.site_sizes[:1], rotated=False)
    fused = linear_sparsity(site_plan, FAMILIES["phi3"], "model.layers.0.self_attn.qkv_proj",
                            {"qkv_proj": ["qkv_proj"]})  # Phi-3's checkpoint is fused: one reader
    assert fused.keep_k == (40,)


def test_what_vllm_cannot_run_is_refused_with_the_reason():
    identity = reader_plan(residual_bases=("identity", "identity"))
    assert check_servable(identity, "llama") is FAMILIES["llama"]
    assert check_servable(reader_plan(residual_bases=("global", "global"), rotated=True), "llama")  # folded only
    with pytest.raises(ValueError, match="rotates layer outputs at run time"):
        check_servable(reader_plan(residual_bases=("pca", "identity"), rotated=True), "llama")
    with pytest.raises(ValueError, match="rotates layer outputs at run time"):  # Gemma-3's post-norms rotate
        check_servable(reader_plan(residual_bases=("global", "global"), rotated=True), "gemma3_text")
    with pytest.raises(ValueError, match="saved before residual bases"):
        check_servable(reader_plan(rotated=True), "llama")
    with pytest.raises(ValueError, match="mlp_activation='relu2'"):
        check_servable(reader_plan(config=rotsparse.SparsifyConfig(method="topk", mlp_activation="relu2")), "llama")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        check_servable(reader_plan(), "qwen3_moe")
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'"):
        check_servable(reader_plan(), "gpt2")


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_keeps_each_slices_own_top_k(tokens, dtype):
    """Every output slice equals Top-K(x, its K) @ its weight rows: one token through the decode kernel, several
    through the masked product; K = width is the dense product."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(tokens, 64, dtype=dtype), torch.randn(128, 64, dtype=dtype), torch.randn(128,
                                                                                                           dtype=dtype)
    groups = slice_groups((10, 10, 64), (64, 32, 32))
    weights_t = [weight[start:end].t().contiguous() for start, end, _ in groups]
    biases = [bias[start:end] for start, end, _ in groups]
    with torch.inference_mode():
        actual = sparse_linear(x, weights_t, biases, groups, LinearSparsity(64, (10, 10, 64)))
    expected = torch.cat([torch.nn.functional.linear(topk_mask(x, 10), weight[:96], bias[:96]),
                          torch.nn.functional.linear(x, weight[96:], bias[96:])], dim=-1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert actual.shape == (tokens, 128)
    assert torch.allclose(actual.float(), expected.float(), atol=tolerance * 10, rtol=tolerance)


# end to end through vLLM ---------------------------------------------------------------------------

PROMPTS = ["the interpreter reads the file", "class attributes are", "a module is imported"]
NEW_TOKENS = 12

GENERATE = """
import json, sys
from vllm import LLM, SamplingParams, TokensPrompt
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
          distributed_executor_backend="uni")
prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(sys.argv[2])]
outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), ignore_eos=True))
print("TOKENS " + json.dumps([list(output.outputs[0].token_ids) for output in outputs]))
"""


def vllm_environment() -> dict:
    """vLLM on one thread, a small KV cache, the engine in this process's child (no further processes)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def vllm_generate(directory, prompt_ids: list[list[int]]) -> list[list[int]]:
    result = subprocess.run([sys.executable, "-c", GENERATE, str(directory), json.dumps(prompt_ids),
                             str(NEW_TOKENS)], capture_output=True, text=True, timeout=600, env=vllm_environment())
    lines = [line for line in result.stdout.splitlines() if line.startswith("TOKENS ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("TOKENS "):])


def greedy(model, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (no end-of-sequence stop)."""
    continuations = []
    for ids in prompt_ids:
        tokens = torch.tensor([ids])
        with torch.no_grad():
            output = model.generate(tokens, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        continuations.append(output[0, tokens.shape[1]:].tolist())
    return continuations


def tiny_llama():
    """A random 2-layer Llama that vLLM's CPU attention runs (head size 32), untied, with layers strong enough to
    move the residual stream and a head that sets the logits far apart, so that greedy decoding neither repeats
    the last token nor depends on float rounding."""
    config = tiny_config("llama", hidden_size=128, vocab_size=256)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand_like(parameter) + 0.5)
            elif name.endswith("proj.weight"):
                parameter.mul_(3.0)
        model.get_output_embeddings().weight.mul_(50.0)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved folders: 'dense', 'topk' and 'auto' (K per reader linear) at 50%, and the prompts' token ids."""
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = tiny_tokenizer(vocab_size=256)
    calibration = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(7))
    tiny_llama().save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    for method in ("topk", "auto"):
        model = rotsparse.sparsify(tiny_llama(), sparsity=0.5, method=method, calibration=calibration,
                                   progress=False)
        rotsparse.save(model, root / method, tokenizer)
    prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    return root, prompts


@needs_vllm
@pytest.mark.parametrize("method", ["topk", "auto"])
def test_vllm_greedy_tokens_equal_transformers(folders, method):
    root, prompts = folders
    plan = rotsparse.io.read_plan(root / method)
    if method == "auto":  # q, k, v keep different K somewhere: the fused qkv linear selects per slice
        assert any(len(set(layer[0])) > 1 for layer in plan.reader_keep_k)
    expected = greedy(rotsparse.load(root / method), prompts)
    dense = AutoModelForCausalLM.from_pretrained(root / "dense").eval()
    assert expected != greedy(dense, prompts)  # sparsity changes the tokens
    assert vllm_generate(root / method, prompts) == expected


@needs_vllm
def test_vllm_refuses_a_plan_with_run_time_rotations(folders, tmp_path):
    root, prompts = folders
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    for path in (root / "topk").iterdir():
        (rotated / path.name).symlink_to(path)
    config = json.loads((root / "topk" / "config.json").read_text())
    config["rotsparse"].update(rotated=True, residual_bases=["pca", "identity"])
    (rotated / "config.json").unlink()
    (rotated / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-c", GENERATE, str(rotated), json.dumps(prompts), "1"],
                            capture_output=True, text=True, timeout=600, env=vllm_environment())
    assert result.returncode != 0
    assert "rotates layer outputs at run time" in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_vllm
def test_vllm_serve_answers_a_completion_with_the_sparse_models_tokens(folders):
    """vLLM's OpenAI-compatible server (``vllm serve DIR``'s server; vllm-cpu 0.32's ``vllm`` command looks up
    the distribution "vllm" and fails, so it is started as a module), engine and worker in processes of their
    own as deployed, answers a completion request with the sparse model's greedy continuation."""
    root, prompts = folders
    directory = root / "auto"
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory),
               "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
               "--max-num-seqs", "4"]
    environment = {**vllm_environment(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=environment)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, server.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in 600 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        request = json.dumps({"model": str(directory), "prompt": prompts[0], "max_tokens": NEW_TOKENS,
                              "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", data=request,
                headers={"Content-Type": "application/json"}), timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    choice = answer["choices"][0]
    expected = greedy(rotsparse.load(directory), prompts[:1])[0]
    assert choice["token_ids"] == expected
    assert choice["text"] == tiny_tokenizer(vocab_size=256).decode(expected)
