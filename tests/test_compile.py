"""Compiled decode (`rotsparse.compile`): every custom op passes `torch.library.opcheck` (its fake included, dynamic
shapes too); a sparsified model of every family compiles with fullgraph and no graph break (prefill and a decode
step on a static KV cache), its decode graph calls the sparse kernels, and compiled outputs equal eager ones.

The tests that run inductor (a C++ compile per graph, tens of seconds) are marked slow; the others use dynamo's
``aot_eager`` backend, which traces the same graph through the fakes and functionalization without generating
code.
"""

import pytest
import torch
from transformers import StaticCache

import rotsparse
from rotsparse import kernels
from rotsparse.bench import benchmark_decode, structural_sparse_copy
from rotsparse.cli import build_parser
from rotsparse.compiled import MODES, compile_function, eager_forward, is_compiled
from rotsparse.config import SparsifyConfig
from rotsparse.families import get_family
from rotsparse.kernels.reference import RESIDUAL_GROUP
from rotsparse.quantize import quantize_int4, quantize_int8, quantize_residual
from rotsparse.runtime import ROTATION_BUFFER, TopKLinear

from tiny_models import FAMILIES, random_tokens, tiny_model

PROMPT = 6
STEPS = 3


def _weight(n_in: int, n_out: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_in, n_out, generator=generator).to(dtype).contiguous()


def _op_samples():
    """Arguments per custom op: every x layout a decode step passes, float32 and bfloat16, with and without
    bias, K = 0, in between and in."""
    samples = {"topk_gemv": [], "index_gemv": [], "topk_indices": [], "dense_gemv": [], "topk_gemv_int8": [],
               "topk_gemv_int4": [], "topk_residual_gemv": []}
    q8, scale8 = quantize_int8(_weight(96, 40))
    q4, scales4 = quantize_int4(_weight(96, 40), group_size=32)
    copies = {bits: quantize_residual(_weight(96, 40), bits, RESIDUAL_GROUP) for bits in (1, 2)}
    for dtype in (torch.float32, torch.bfloat16):
        weight_t = _weight(96, 40, dtype)
        bias = torch.randn(40).to(dtype)
        for shape in ((96,), (1, 96), (1, 1, 96)):
            x = torch.randn(shape).to(dtype)
            for keep_k, b in ((0, None), (37, bias), (96, None)):
                samples["topk_gemv"].append((x, weight_t, b, keep_k))
                samples["topk_indices"].append((x, keep_k))
                samples["topk_gemv_int8"].append((x, q8, scale8, b, keep_k))
                samples["topk_gemv_int4"].append((x, q4, scales4, b, keep_k))
                for bits, (codes, scales) in copies.items():
                    samples["topk_residual_gemv"].append((x, weight_t, codes, scales, b, keep_k, bits,
                                                          (96 - keep_k) // 2))
            indices = torch.randperm(96)[:29].sort().values
            samples["index_gemv"] += [(x, indices, weight_t, bias), (x, indices, weight_t, None)]
            weight = weight_t.t().contiguous()  # row-major (out, in), as an lm_head stores it
            samples["dense_gemv"] += [(x, weight, bias), (x, weight, None)]
    return samples


def test_every_custom_op_passes_opcheck():
    """Fake vs real shapes and strides, schema, autograd registration, and AOT dispatch with static and dynamic
    shapes, for every ``rotsparse::`` op the library registers."""
    samples = _op_samples()
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("rotsparse::")}
    assert registered == set(samples), f"ops without opcheck samples: {registered - set(samples)}"
    for name, cases in samples.items():
        op = getattr(torch.ops.rotsparse, name).default
        for args in cases:
            torch.library.opcheck(op, args)


def test_fakes_give_symbolic_shapes_under_dynamic_compile():
    """One dynamic graph serves every width: the fakes compute output shapes from symbolic sizes."""
    def f(x, weight_t, weight):
        indices = torch.ops.rotsparse.topk_indices(x, 8)
        return (torch.ops.rotsparse.topk_gemv(x, weight_t, None, 8)
                + torch.ops.rotsparse.index_gemv(x, indices, weight_t, None)
                + torch.ops.rotsparse.dense_gemv(x, weight, None))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for n_in, n_out in ((32, 24), (48, 40), (64, 17)):
        x, weight_t = torch.randn(1, n_in), _weight(n_in, n_out)
        args = (x, weight_t, weight_t.t().contiguous())
        torch.testing.assert_close(compiled(*args), f(*args))


def _rotated_sparse(family: str, **config) -> torch.nn.Module:
    """A 50%-sparse tiny model with the run-time structure of a rotating method: Top-K linears, the dense-kernel
    head and a residual rotation (a random orthogonal matrix, stored contiguous) after every layer but the last."""
    dense = tiny_model(family)
    sparse = structural_sparse_copy(dense, SparsifyConfig(sparsity=0.5, method="larosa", **config))
    generator = torch.Generator().manual_seed(3)
    for layer in get_family(sparse).layers:
        if hasattr(layer, ROTATION_BUFFER):
            rotation = getattr(layer, ROTATION_BUFFER)
            rotation.copy_(torch.linalg.qr(torch.randn(rotation.shape, generator=generator))[0].contiguous())
    return sparse


def _decode(call, model, tokens: torch.Tensor, steps: int = STEPS) -> list[torch.Tensor]:
    """Logits of a prefill of tokens[:, :PROMPT] and then one call per further token, on a static KV cache."""
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + steps + 2)
    outputs = []
    with torch.no_grad():
        outputs.append(call(input_ids=tokens[:, :PROMPT], past_key_values=cache, use_cache=True,
                            cache_position=torch.arange(PROMPT)).logits)
        for position in range(PROMPT, PROMPT + steps):
            outputs.append(call(input_ids=tokens[:, position:position + 1], past_key_values=cache, use_cache=True,
                                cache_position=torch.tensor([position])).logits)
    return outputs


def _graph_ops(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    targets = [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]
    return {target: targets.count(target) for target in set(targets) if target.startswith("rotsparse.")}


def _explain(model, tokens: torch.Tensor, cache, position: int, length: int):
    def step(input_ids, cache_position):
        return model(input_ids=input_ids, past_key_values=cache, use_cache=True, cache_position=cache_position).logits

    with torch.no_grad():
        return torch._dynamo.explain(step)(tokens[:, position:position + length],
                                           torch.arange(position, position + length))


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsified_model_traces_without_graph_breaks_and_decodes_through_the_kernels(family):
    model = _rotated_sparse(family)
    long = kernels.KERNEL_MAX_TOKENS + 2
    tokens = random_tokens(num_sequences=1, length=long)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 4)
    torch._dynamo.reset()
    prefill = _explain(model, tokens, cache, 0, PROMPT)
    decode = _explain(model, tokens, cache, PROMPT, 1)
    long_prefill = _explain(model, tokens, StaticCache(config=model.config, max_cache_len=long), 0, long)
    for explained in (prefill, decode, long_prefill):
        assert explained.graph_break_count == 0, [str(reason) for reason in explained.break_reasons]
        assert explained.graph_count == 1
    sites = sum(isinstance(m, TopKLinear) for m in model.modules())
    rotations = sum(hasattr(layer, ROTATION_BUFFER) for layer in get_family(model).layers)
    assert rotations == len(get_family(model).layers) - 1 > 0
    assert _graph_ops(decode.graphs[0]) == {"rotsparse.topk_gemv": sites + rotations, "rotsparse.dense_gemv": 1}
    assert PROMPT <= kernels.KERNEL_MAX_TOKENS  # a short prompt: the kernels too (the head runs F.linear)
    assert _graph_ops(prefill.graphs[0]) == {"rotsparse.topk_gemv": sites + rotations}
    assert _graph_ops(long_prefill.graphs[0]) == {}  # more tokens: the dense-masked path


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decode_equals_eager(family):
    model = _rotated_sparse(family)
    tokens = random_tokens(num_sequences=1, length=PROMPT + STEPS)
    expected = _decode(model, model, tokens)
    torch._dynamo.reset()
    assert rotsparse.compile(model, backend="aot_eager") is model and is_compiled(model)
    actual = _decode(model, model, tokens)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_a_calibrated_model_compiles_and_generates_the_eager_tokens():
    """The user's recipe: `sparsify`, `rotsparse.compile`, `generate` with a static cache (greedy)."""
    model = tiny_model("llama")
    rotsparse.sparsify(model, sparsity=0.5, calibration=random_tokens(seed=7), progress=False)
    prompt = random_tokens(num_sequences=1, length=PROMPT)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    rotsparse.compile(model, backend="aot_eager")
    with torch.no_grad():
        actual = model.generate(prompt, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(actual, expected)


def test_qsparse_options_compile_without_graph_breaks():
    """Block (N:M) Top-K and L2 rescaling select in the graph (`index_gemv`), with no branch on values."""
    model = _rotated_sparse("llama", l2_rescale=True, block_size=16)
    assert all(m.block_size == 16 and m.l2_rescale for m in model.modules() if isinstance(m, TopKLinear))
    tokens = random_tokens(num_sequences=1, length=PROMPT + STEPS)
    expected = _decode(model, model, tokens)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 4)
    torch._dynamo.reset()
    _explain(model, tokens, cache, 0, PROMPT)
    decode = _explain(model, tokens, cache, PROMPT, 1)
    assert decode.graph_break_count == 0 and decode.graph_count == 1
    assert _graph_ops(decode.graphs[0])["rotsparse.index_gemv"] == sum(isinstance(m, TopKLinear)
                                                                      for m in model.modules())
    torch._dynamo.reset()
    rotsparse.compile(model, backend="aot_eager")
    for a, e in zip(_decode(model, model, tokens), expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_residual_copy_decodes_through_its_kernel_in_one_graph():
    model = tiny_model("llama")
    rotsparse.sparsify(model, sparsity=0.5, method="topk", residual_bits=2, progress=False)
    tokens = random_tokens(num_sequences=1, length=PROMPT + STEPS)
    expected = _decode(model, model, tokens)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 4)
    torch._dynamo.reset()
    decode = _explain(model, tokens, cache, PROMPT, 1)
    assert decode.graph_break_count == 0 and decode.graph_count == 1
    assert _graph_ops(decode.graphs[0]) == {"rotsparse.topk_residual_gemv": sum(isinstance(m, TopKLinear)
                                                                                for m in model.modules()),
                                            "rotsparse.dense_gemv": 1}
    torch._dynamo.reset()
    rotsparse.compile(model, backend="aot_eager")
    for a, e in zip(_decode(model, model, tokens), expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_dynamic_shapes_long_prompts_take_the_masked_path_and_small_batches_the_kernels():
    """dynamic=True: prompts of several lengths share one prefill graph; a batch-3 prompt (more than
    kernels.KERNEL_MAX_TOKENS tokens) runs the dense-masked path, a batch of three decodes through the kernels
    (three tokens per call), a batch of one too (the head as well); all equal eager."""
    model = _rotated_sparse("qwen2")
    batch = random_tokens(num_sequences=3, length=PROMPT + STEPS)
    expected = _decode(model, model, batch)
    sites = sum(isinstance(m, TopKLinear) for m in model.modules())
    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 4)
    assert 3 * PROMPT > kernels.KERNEL_MAX_TOKENS
    assert _graph_ops(_explain(model, batch, cache, 0, PROMPT).graphs[0]) == {}
    assert _graph_ops(_explain(model, batch, cache, PROMPT, 1).graphs[0]) == {"rotsparse.topk_gemv": sites + 1}
    graphs = []

    def recording_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    torch._dynamo.reset()
    rotsparse.compile(model, dynamic=True, backend=recording_aot_eager)
    for a, e in zip(_decode(model, model, batch), expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    batch_graphs = len(graphs)
    assert batch_graphs >= 2 and _graph_ops(graphs[0]) == {}  # the batch-3 prompt
    assert _graph_ops(graphs[-1]) == {"rotsparse.topk_gemv": sites + 1}  # batch-3 decode
    single = random_tokens(num_sequences=1, length=PROMPT + STEPS)
    for a, e in zip(_decode(model, model, single), _decode(eager_forward(model), model, single)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert len(graphs) > batch_graphs  # one token in all: a graph of its own (size 1 is specialised) ...
    assert _graph_ops(graphs[-1]) == {"rotsparse.topk_gemv": sites + 1, "rotsparse.dense_gemv": 1}  # ... on the kernels
    for length in (PROMPT, PROMPT + 2):
        tokens = random_tokens(num_sequences=1, length=length + 1, seed=length)
        cache = StaticCache(config=model.config, max_cache_len=length + 2)

        def prefill(call):
            cache.reset()
            with torch.no_grad():
                return call(input_ids=tokens, past_key_values=cache, use_cache=True,
                            cache_position=torch.arange(length + 1)).logits

        torch.testing.assert_close(prefill(model), prefill(eager_forward(model)), rtol=1e-4, atol=1e-4)


def test_compile_keeps_the_eager_forward_and_checks_the_mode():
    model = _rotated_sparse("llama")
    eager = model.forward
    rotsparse.compile(model, backend="aot_eager")
    compiled = model.forward
    rotsparse.compile(model, mode="default", backend="aot_eager")
    assert eager_forward(model) == eager and model.forward is not compiled
    with pytest.raises(ValueError, match="compile mode"):
        rotsparse.compile(model, mode="fast")
    with pytest.raises(ValueError, match="compile mode"):
        compile_function(model.forward, mode="fast")
    assert build_parser().parse_args(["bench", "--compile"]).compile == "reduce-overhead"
    assert build_parser().parse_args(["run", "--compile", "default"]).compile == "default"
    assert build_parser().parse_args(["bench"]).compile is None and "max-autotune-no-cudagraphs" in MODES


def test_benchmark_compiles_dense_and_sparse_alike():
    dense = tiny_model("llama")
    sparse = structural_sparse_copy(dense, SparsifyConfig(sparsity=0.5, method="larosa"))
    kernel_dense = structural_sparse_copy(dense, SparsifyConfig(sparsity=0.0, method="topk"))
    torch._dynamo.reset()
    result = benchmark_decode(dense, sparse, tokens=2, repeats=1, warmup_tokens=2, kernel_dense=kernel_dense,
                              compile_mode="default", compile_backend="aot_eager")
    assert result.compiled and result.compile_mode == "default"
    assert all(is_compiled(model) for model in (dense, sparse, kernel_dense))
    assert result.speedup > 0 and result.layers_speedup_vs_kernel_dense > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode,dynamic", [("reduce-overhead", None), ("default", True)])
def test_inductor_compiled_generate_equals_eager(mode, dynamic):
    """The user's recipe with inductor (C++ code generation on CPU): same greedy tokens, same logits."""
    model = _rotated_sparse("llama")
    tokens = random_tokens(num_sequences=1, length=PROMPT + STEPS)
    expected_logits = _decode(model, model, tokens)
    with torch.no_grad():
        expected = model.generate(tokens[:, :PROMPT], max_new_tokens=4, do_sample=False,
                                  cache_implementation="static")
    torch._dynamo.reset()
    rotsparse.compile(model, mode=mode, dynamic=dynamic)
    for a, e in zip(_decode(model, model, tokens), expected_logits):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        actual = model.generate(tokens[:, :PROMPT], max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(actual, expected)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_graph_replay_equals_eager():
    """mode="reduce-overhead" on CUDA records every decode step into a CUDA graph and replays it: the Triton
    kernels' results on replay equal eager decode."""
    model = _rotated_sparse("llama").cuda()
    tokens = random_tokens(num_sequences=1, length=PROMPT + 6).cuda()

    def decode(call):
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + 8)
        outputs = []
        with torch.no_grad():
            call(input_ids=tokens[:, :PROMPT], past_key_values=cache, use_cache=True,
                 cache_position=torch.arange(PROMPT, device="cuda"))
            for position in range(PROMPT, PROMPT + 6):  # warm-up, recording, then replays
                logits = call(input_ids=tokens[:, position:position + 1], past_key_values=cache, use_cache=True,
                              cache_position=torch.tensor([position], device="cuda")).logits
                outputs.append(logits.clone())
        return outputs

    expected = decode(model)
    torch._dynamo.reset()
    rotsparse.compile(model, mode="reduce-overhead")
    for _ in range(2):
        for a, e in zip(decode(model), expected):
            torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
