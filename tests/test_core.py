"""Mathematical facts of the core on tiny random models of every supported family."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import rotsparse
from rotsparse.budget import allocate_keep_k
from rotsparse.config import IN_DOMAIN_ROTATIONS, SITES, AutoOptions, SparsifyConfig
from rotsparse.plan import SparsityPlan
from rotsparse.rotation import fold_input, pca_rotation, residual_rotation, rotate_output, sink_preserving_rotation
from rotsparse.runtime import TopKLinear
from rotsparse.topk import keep_topk

from tiny_models import FAMILIES, invariance_error, random_tokens, relative_error, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["auto", "larosa", "topk"])
def test_sparsity_zero_is_invariant(family, method):
    model = tiny_model(family)
    assert invariance_error(model, method=method) < 1e-4
    assert model.rotsparse_plan.rotated == (method == "larosa") or method == "auto"
    assert model.rotsparse_plan.effective_sparsity == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_really_changes_the_weights(family):
    """Invariance must come from folding, not from rotations that happen to be the identity."""
    model = tiny_model(family)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    rotsparse.sparsify(model, sparsity=0.0, method="larosa", calibration=random_tokens(seed=7), progress=False)
    embed_after = model.get_input_embeddings().weight.detach()
    assert relative_error(embed_after, embed_before) > 0.1
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    adapters = [m for m in model.modules() if hasattr(m, "rotsparse_output_rotation")]
    assert adapters, "no residual adapters were attached"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_keeps_exactly_k(family):
    model = tiny_model(family)
    rotsparse.sparsify(model, sparsity=0.5, calibration=random_tokens(seed=7), progress=False)
    seen = {}

    def check(module, args, output):
        x = args[0]
        sparse = keep_topk(x, module.keep_k)
        nonzero = (sparse != 0).sum(-1)
        expected_count = (x != 0).sum(-1).clamp(max=module.keep_k)  # all-zero rows: Gemma's padding embedding
        assert bool((nonzero == expected_count).all()), f"{module.site}: kept {nonzero.unique().tolist()}"
        assert bool((expected_count == module.keep_k).float().mean() > 0.9)
        expected = torch.nn.functional.linear(sparse, module.weight, module.bias)
        assert torch.allclose(output, expected, atol=1e-5, rtol=1e-5)
        seen[module.site] = module.keep_k

    handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, TopKLinear)]
    with torch.no_grad():
        model(random_tokens(length=16))
    for handle in handles:
        handle.remove()
    assert set(seen) == set(SITES)
    assert all(0 < k for k in seen.values())


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.4, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("method", ["larosa", "topk"])
def test_effective_sparsity_matches_request_within_one_column_per_site(sparsity, method):
    model = tiny_model("llama", num_layers=3)
    rotsparse.sparsify(model, sparsity=sparsity, method=method, calibration=random_tokens(seed=7), progress=False)
    plan = model.rotsparse_plan
    total = sum(params for layer in plan.site_sizes for _, params in layer)
    one_column_per_site = sum(params / width for layer in plan.site_sizes for width, params in layer) / total
    assert abs(plan.effective_sparsity - sparsity) <= one_column_per_site
    coefficients = SparsifyConfig(method=method).coefficients
    if method == "larosa" and sparsity <= 0.6:
        h1, h2 = plan.keep_k[0][0] / plan.site_sizes[0][0][0], plan.keep_k[0][1] / plan.site_sizes[0][1][0]
        assert h2 < h1, "h2 must be sparser than h1 under LaRoSA's coefficients"
    assert coefficients == plan.config.coefficients


def test_keep_topk_exact_count_and_straight_through_gradient():
    x = torch.randn(3, 5, 40, requires_grad=True)
    sparse = keep_topk(x, 7)
    assert ((sparse != 0).sum(-1) == 7).all()
    kept_min = sparse.abs().masked_fill(sparse == 0, math.inf).amin(-1)
    dropped_max = (x.detach().abs() * (sparse == 0)).amax(-1)
    assert (kept_min >= dropped_max).all()
    upstream = torch.randn_like(x)
    (keep_topk(x, 7, straight_through=True) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
    x.grad = None
    (keep_topk(x, 7) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream * (sparse != 0))
    assert torch.equal(keep_topk(x, 40), x) and not keep_topk(x, 0).any()


def test_pca_rotation_is_orthogonal_sorted_and_deterministic():
    data = torch.randn(500, 12, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    moment = data.T @ data / 500
    rotation = pca_rotation(moment)
    assert torch.allclose(rotation.T @ rotation, torch.eye(12, dtype=torch.float64), atol=1e-12)
    diagonal = rotation.T @ moment @ rotation
    assert torch.allclose(diagonal, torch.diag(torch.diagonal(diagonal)), atol=1e-10)
    eigenvalues = torch.diagonal(diagonal)
    assert (eigenvalues[:-1] >= eigenvalues[1:]).all()
    pivots = rotation.abs().argmax(dim=0)
    assert (rotation[pivots, torch.arange(12)] > 0).all()
    assert torch.equal(pca_rotation(moment.clone()), rotation)
    with pytest.raises(ValueError, match="NaN"):
        pca_rotation(torch.full((3, 3), math.nan))


def test_sink_preserving_rotation_keeps_the_sink_channels_and_rotates_the_rest():
    width = 64
    data = torch.randn(400, width, dtype=torch.float64) @ torch.randn(width, width, dtype=torch.float64)
    moment = data.T @ data / 400
    sink = torch.randn(3, width, dtype=torch.float64) * 0.05
    sink[:, [5, 40]] = torch.tensor([30.0, -20.0], dtype=torch.float64)  # a massive activation in two channels
    rotation = sink_preserving_rotation(moment, sink)
    assert torch.allclose(rotation.T @ rotation, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert torch.equal(rotation[:, :2], torch.eye(width, dtype=torch.float64)[:, [5, 40]])  # kept, first
    rotated = sink @ rotation
    assert (rotated[:, :2].pow(2).sum(1) / rotated.pow(2).sum(1) > 0.99).all()  # still in two entries
    rest = [i for i in range(width) if i not in (5, 40)]
    block = rotation[rest][:, 2:]
    diagonal = block.T @ moment[rest][:, rest] @ block  # the PCA of the other channels
    assert torch.allclose(diagonal, torch.diag(torch.diagonal(diagonal)), atol=1e-9)
    spread = torch.randn(3, width, dtype=torch.float64)  # not concentrated: the plain PCA
    assert torch.equal(sink_preserving_rotation(moment, spread), pca_rotation(moment))


def random_rotation(width: int) -> torch.Tensor:
    matrix = torch.randn(width, width, dtype=torch.float64)
    return pca_rotation(matrix @ matrix.T)


def test_folding_functions_preserve_the_linear_map():
    torch.manual_seed(0)
    rotation = random_rotation(8)
    weight, scale, x = torch.randn(5, 8, dtype=torch.float64), torch.rand(8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.allclose((x @ rotation) @ fold_input(weight, scale, rotation).T, (scale * x) @ weight.T)
    out_weight, bias = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    rotated_weight, rotated_bias = rotate_output(out_weight, bias, rotation)
    h = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(h @ rotated_weight.T + rotated_bias, (h @ out_weight.T + bias) @ rotation)
    other = random_rotation(8)
    assert torch.allclose((x @ rotation) @ residual_rotation(rotation, other), x @ other)


def test_allocation_rebalances_coefficients_and_caps_at_full_sparsity():
    sizes = [((100, 10000), (50, 5000), (100, 20000), (200, 20000))] * 2
    keep = allocate_keep_k(sizes, 0.5, (0.8, 1.2, 0.8, 1.2))
    plan = SparsityPlan(keep_k=keep, site_sizes=tuple(tuple(s) for s in sizes), rotated=False)
    assert abs(plan.effective_sparsity - 0.5) < 0.01
    capped = allocate_keep_k(sizes, 0.5, (1.0, 100.0, 1.0, 100.0))
    assert capped[0][1] == 0 and capped[0][3] == 0 and 0 < capped[0][0] < 100
    capped_plan = SparsityPlan(keep_k=capped, site_sizes=tuple(tuple(s) for s in sizes), rotated=False)
    assert abs(capped_plan.effective_sparsity - 0.5) < 0.01
    with pytest.raises(ValueError, match="cannot reach"):
        allocate_keep_k(sizes, 0.9, (0.0, 1.0, 0.0, 0.0))


def test_config_and_plan_json_round_trip():
    config = SparsifyConfig(sparsity=0.45, method="topk", site_coefficients=(1, 2, 1, 2), num_sequences=3)
    assert SparsifyConfig.from_dict(json.loads(config.to_json())) == config
    model = tiny_model("qwen2")
    # every residual-basis candidate, so that the structure check runs and the plan records its losses
    config = SparsifyConfig(sparsity=0.3, options=AutoOptions(rotations=IN_DOMAIN_ROTATIONS))
    rotsparse.sparsify(model, config=config, calibration=random_tokens(), progress=False)
    plan = model.rotsparse_plan
    assert len(plan.residual_bases) == len(plan.value_rotated) == len(plan.keep_k) and plan.check_losses
    restored = SparsityPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan and plan.reader_keep_k
    old_format = {key: value for key, value in plan.to_dict().items() if not key.startswith("reader_")}
    assert SparsityPlan.from_dict(old_format).reader_keep_k == ()  # plans saved before per-reader K still load
    bad = plan.to_dict()
    bad["reader_params"][0][0][0] += 1
    with pytest.raises(ValueError, match="do not fit the site"):
        SparsityPlan.from_dict(bad)
    with pytest.raises(ValueError, match="format version"):
        SparsityPlan.from_dict({**plan.to_dict(), "format_version": 99})
    with pytest.raises(ValueError, match="unknown SparsifyConfig fields"):
        SparsifyConfig.from_dict({"sparsity": 0.4, "colour": "red"})


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_sparsity_out_of_range_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity must be"):
        rotsparse.sparsify(tiny_model("llama"), sparsity=sparsity, calibration=random_tokens())


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        SparsifyConfig(method="magic")
    with pytest.raises(ValueError, match="site_coefficients"):
        SparsifyConfig(site_coefficients=(1, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        rotsparse.sparsify(tiny_model("llama"), sparsity=0.3, config=SparsifyConfig())


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match=r"unsupported architecture: model_type='gpt2'.*llama"):
        rotsparse.sparsify(model, sparsity=0.4, calibration=random_tokens(vocab_size=64))


def test_sparsifying_twice_is_rejected():
    model = tiny_model("llama")
    rotsparse.sparsify(model, sparsity=0.4, calibration=random_tokens(), progress=False)
    with pytest.raises(RuntimeError, match="already sparsified"):
        rotsparse.sparsify(model, sparsity=0.4, calibration=random_tokens(), progress=False)


def test_nan_activations_are_reported_with_the_layer():
    model = tiny_model("llama", num_layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="decoder layer 1"):
        rotsparse.sparsify(model, sparsity=0.4, calibration=random_tokens(), progress=False)


def test_bad_calibration_tensors_are_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="integer tensor"):
        rotsparse.sparsify(model, sparsity=0.4, calibration=torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\(n, seq\)"):
        rotsparse.sparsify(tiny_model("llama"), sparsity=0.4, calibration=torch.zeros(0, 8, dtype=torch.long))


def test_padding_is_masked_out_of_the_calibration():
    """Right-padded sequences calibrate exactly like the unpadded ones: rotations, scales, error curves."""
    from rotsparse.families import get_family
    from rotsparse.measure import calibrate_model
    from rotsparse.api import calibrate

    model = tiny_model("llama")
    tokens = random_tokens(num_sequences=2, length=48)  # 96 tokens > width 64: second moments of full rank
    padded = torch.cat([tokens, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 48), torch.zeros(2, 5)], dim=1).long()
    config = SparsifyConfig(error_tokens=128)  # more than the real tokens: all of them are sampled
    plain = calibrate(model, calibration=tokens, config=config, progress=False)
    masked = calibrate_model(model, get_family(model), padded, mask, config, progress=False)
    assert masked.tokens == plain.tokens == 96
    for ours, theirs in zip(masked.layers, plain.layers):
        for a, b in zip(ours.rotations[1:], theirs.rotations[1:]):
            assert torch.allclose(a, b, atol=1e-6)
        for site in ours.curves:
            for a, b in zip(ours.curves[site] + ours.scales[site], theirs.curves[site] + theirs.scales[site]):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model
    from rotsparse.api import calibrate
    from rotsparse.config import SparsifyConfig
    torch.set_num_threads(1)
    model = tiny_model("llama", num_layers={layers}, hidden_size=128)
    tokens = torch.randint(0, 128, (32, 256))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calibrate(model, calibration=tokens, config=SparsifyConfig(error_tokens=64), progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline)
""")


def test_calibration_memory_grows_with_one_layer_not_with_depth():
    """Peak extra RSS while calibrating 4 vs 32 layers: holding every layer's activations would be 8x."""
    def peak_kib(layers: int) -> int:
        code = MEMORY_PROBE.format(tests=str(Path(__file__).parent), layers=layers)
        # A fixed mmap threshold makes glibc return freed activation buffers, so RSS tracks live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return int(run.stdout)

    one_layer_activations_kib = 32 * 256 * 128 * 4 / 1024
    # the loss-sensitivity pass keeps every layer's input, but only for its first 4 sequences
    sensitivity_inputs_kib = 28 * 4 * 256 * 128 * 4 / 1024
    # the results: every layer keeps its own candidate bases (pca_sink, pca_scaled; d x d float64)
    layer_results_kib = 28 * 2 * 128 * 128 * 8 / 1024
    shallow, deep = peak_kib(4), peak_kib(32)
    assert deep - shallow < 4 * one_layer_activations_kib + sensitivity_inputs_kib + layer_results_kib, (shallow, deep)
    assert deep - shallow < 28 * one_layer_activations_kib / 3, "must not hold every layer's activations"


def test_a_few_tokens_take_the_kernel_and_equal_the_masked_path(monkeypatch):
    """Up to kernels.KERNEL_MAX_TOKENS tokens in inference (a batched decode step, a short prompt) go through the
    sparse kernel, more through the masked product; both compute every token's own Top-K."""
    from rotsparse import kernels

    module = TopKLinear.from_linear(torch.nn.Linear(64, 40), 20, "h1").eval()
    calls = []
    real = kernels.decode_topk_gemv
    monkeypatch.setattr(kernels, "decode_topk_gemv", lambda x, *rest: calls.append(x.shape) or real(x, *rest))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for shape in [(1, 1, 64), (2, 1, 64), (9, 64), (2, 8, 64), (17, 64), (3, 6, 64)]:
            x = torch.randn(shape, generator=generator)
            calls.clear()
            output = module(x)
            tokens = x.numel() // 64
            assert calls == ([torch.Size(shape)] if tokens <= kernels.KERNEL_MAX_TOKENS else [])
            expected = torch.nn.functional.linear(keep_topk(x, 20), module.weight, module.bias)
            torch.testing.assert_close(output, expected)
    module.train()
    calls.clear()
    module(torch.randn(2, 64))  # training: the masked path (straight-through backward)
    assert calls == []


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_batched_generation_equals_the_masked_path(family):
    """A batch of 3 sequences decoded with the kernels (every step 3 tokens through the batched kernel) gives the
    logits of the dense-masked path."""
    model = tiny_model(family)
    rotsparse.sparsify(model, sparsity=0.5, method="topk", progress=False)
    tokens = random_tokens(num_sequences=3, length=6, seed=5)
    with torch.no_grad():
        with_kernels = model.generate(tokens, max_new_tokens=5, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
        rotsparse.runtime.set_kernels(model, False)
        masked = model.generate(tokens, max_new_tokens=5, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    assert torch.equal(with_kernels.sequences, masked.sequences)
    for got, want in zip(with_kernels.logits, masked.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
