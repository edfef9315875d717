"""The residual weight copy (`SparsifyConfig.residual_bits`): the low-bit quantizer's facts, the Top-K linear's
function (kept inputs through the weight, dropped ones through the copy), the byte budget, save/load, refusals."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import rotsparse
from rotsparse import kernels
from rotsparse.bench import structural_sparse_copy, weight_bytes
from rotsparse.cli import build_parser, config_from_args
from rotsparse.kernels.reference import RESIDUAL_GROUP, residual_weight_torch, topk_residual_gemv_torch
from rotsparse.quantize import quantize_residual
from rotsparse.runtime import TopKLinear, set_kernels
from rotsparse.topk import keep_topk
from rotsparse.vllm_plugin import check_servable

from tiny_models import distinct_token, generated_and_stepwise, logits, random_tokens, tiny_model


@pytest.mark.parametrize("n_out", [64, 100, 192])
def test_one_bit_copy_is_signs_times_twice_the_mean_magnitude(n_out):
    weight_t = torch.randn(5, n_out, dtype=torch.float64)
    codes, scales = quantize_residual(weight_t, 1, 64)
    groups = -(-n_out // 64)
    assert codes.shape == (5, groups * 64 // 8) and codes.dtype == torch.uint8 and scales.shape == (5, groups)
    restored = residual_weight_torch(codes, scales, 1, n_out, torch.float64)
    assert torch.equal(torch.sign(restored), torch.sign(weight_t))
    for group in range(groups):
        part = weight_t[:, group * 64:(group + 1) * 64]
        torch.testing.assert_close(scales[:, group].double(), 2 * part.abs().mean(1), rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [1, 2])
def test_copy_is_a_least_squares_fit_and_requantizes_to_itself(bits):
    weight_t = torch.randn(6, 192, dtype=torch.float64)
    codes, scales = quantize_residual(weight_t, bits, 64)
    restored = residual_weight_torch(codes, scales, bits, 192, torch.float64)
    error = ((restored - weight_t) ** 2).sum() / (weight_t ** 2).sum()
    assert error < (0.4 if bits == 1 else 0.15)  # Gaussian weights: 1 - 2/pi ~ 0.36 (1 bit), ~0.12 (2 bits)
    again_codes, again_scales = quantize_residual(restored, bits, 64)
    assert torch.equal(again_codes, codes) and torch.equal(again_scales, scales)
    if bits == 2:  # four levels, all used: finer than the 1-bit copy
        one_bit = residual_weight_torch(*quantize_residual(weight_t, 1, 64), 1, 192, torch.float64)
        assert ((restored - weight_t) ** 2).sum() < ((one_bit - weight_t) ** 2).sum()


@pytest.mark.parametrize("bits", [1, 2])
def test_linear_adds_the_dropped_inputs_through_the_copy(bits):
    model = tiny_model("llama")
    rotsparse.sparsify(model, sparsity=0.5, method="topk", residual_bits=bits, progress=False)
    module = model.model.layers[0].mlp.down_proj
    assert isinstance(module, TopKLinear) and module.residual_bits == bits
    x = torch.randn(3, 7, module.in_features)
    kept = keep_topk(x, module.keep_k)
    copy_weight = residual_weight_torch(module.residual_codes, module.residual_scales.view(torch.float16), bits,
                                        module.out_features, torch.float32).t()
    expected = kept @ module.weight.t() + (x - kept) @ copy_weight.t()
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
        token = x[0, :1]
        assert module._is_decode_step(token)  # one token: the decode kernel, the same function
        torch.testing.assert_close(module(token), expected[0, :1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_in, n_out", [(64, 144), (130, 64), (96, 200), (48, 1100)])
@pytest.mark.parametrize("bits", [1, 2])
def test_kernel_equals_the_reference(dtype, n_in, n_out, bits):
    generator = torch.Generator().manual_seed(n_in + n_out)
    weight_t = torch.randn(n_in, n_out, generator=generator)
    codes, scales = quantize_residual(weight_t, bits, RESIDUAL_GROUP)
    weight_t, bias = weight_t.to(dtype), torch.randn(n_out, generator=generator).to(dtype)
    x = distinct_token(n_in, dtype)
    for keep_k in (0, 1, n_in // 3, n_in - 1, n_in):
        for copy_k in {n_in - keep_k, (n_in - keep_k) // 2, min(1, n_in - keep_k), 0}:  # all, a band, none
            expected = topk_residual_gemv_torch(x, weight_t, codes, scales, bias, keep_k, bits, copy_k)
            actual = kernels.topk_residual_gemv(x, weight_t, codes, scales, bias, keep_k, bits, copy_k)
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(actual.float(), expected.float(),
                                       atol=tolerance * expected.abs().max().item(), rtol=0)
        assert torch.equal(kernels.topk_residual_gemv(x, weight_t, codes, scales, bias, keep_k, bits),
                           kernels.topk_residual_gemv(x, weight_t, codes, scales, bias, keep_k, bits, n_in - keep_k))
    if kernels.kernel_backend("cpu", dtype) == "cpp":
        # only the copied rows of the copy and the kept rows of the weight are read: poison the others
        keep_k, copy_k = n_in // 3, n_in // 4
        kept, band = kernels.topk_indices(x, keep_k), kernels.topk_indices(x, keep_k + copy_k)
        poisoned_codes, poisoned_weight = codes.clone(), weight_t.clone()
        outside = torch.ones(n_in, dtype=torch.bool)
        outside[band] = False
        poisoned_codes[kept] = 255
        poisoned_codes[outside] = 255
        unkept = torch.ones(n_in, dtype=torch.bool)
        unkept[kept] = False
        poisoned_weight[unkept] = float("nan")
        torch.testing.assert_close(
            kernels.topk_residual_gemv(x, poisoned_weight, poisoned_codes, scales, bias, keep_k, bits, copy_k),
            kernels.topk_residual_gemv(x, weight_t, codes, scales, bias, keep_k, bits, copy_k))
    with pytest.raises(ValueError, match="residual copy"):
        kernels.topk_residual_gemv(x, weight_t, codes[:, 1:], scales, bias, 3, bits)
    with pytest.raises(ValueError, match="keep_k"):
        kernels.topk_residual_gemv(x, weight_t, codes, scales, bias, 3, bits, n_in - 2)


@pytest.mark.parametrize("band", [None, 0.2])
def test_generation_with_the_copy_matches_stepwise_decoding(band):
    model = tiny_model("llama")
    rotsparse.sparsify(model, sparsity=0.5, method="topk", residual_bits=2, residual_band=band, progress=False)
    generated, stepwise = generated_and_stepwise(model)
    assert torch.equal(generated, stepwise)


@pytest.mark.parametrize("band", [None, 0.2])
def test_batched_generation_takes_the_kernel_token_by_token_and_equals_the_masked_path(monkeypatch, band):
    model = tiny_model("llama")
    rotsparse.sparsify(model, sparsity=0.5, method="topk", residual_bits=2, residual_band=band, progress=False)
    calls = []
    real = rotsparse.kernels.topk_residual_gemv
    monkeypatch.setattr(rotsparse.kernels, "topk_residual_gemv",
                        lambda x, *rest: calls.append(x.shape) or real(x, *rest))
    tokens = random_tokens(num_sequences=3, length=6, seed=5)
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with_kernels = model.generate(tokens, **settings)
        assert any(len(shape) == 1 for shape in calls)  # batch-3 decode steps, one token at a time
        set_kernels(model, False)
        masked = model.generate(tokens, **settings)
    assert torch.equal(with_kernels.sequences, masked.sequences)
    for got, want in zip(with_kernels.logits, masked.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_band_copies_the_largest_dropped_inputs_within_the_byte_budget():
    model = tiny_model("llama")
    tokens = random_tokens()
    expected = logits(model, tokens)
    config = rotsparse.SparsifyConfig(sparsity=0.5, method="topk", residual_bits=2, residual_band=0.2)
    assert config.topk_sparsity == pytest.approx(0.5 + 0.2 * config.residual_cost)
    full, band, plain = (copy.deepcopy(model) for _ in range(3))
    rotsparse.sparsify(band, config=config, progress=False)
    rotsparse.sparsify(full, sparsity=0.5, method="topk", residual_bits=2, progress=False)
    rotsparse.sparsify(plain, sparsity=0.5, method="topk", progress=False)
    module = band.model.layers[0].mlp.down_proj
    width = module.in_features
    assert module.residual_copy_k == round(0.2 * width)
    assert plain.model.layers[0].mlp.down_proj.keep_k > module.keep_k > full.model.layers[0].mlp.down_proj.keep_k
    # the bytes read stay at the request: kept rows of the weight plus copied rows of the copy
    assert band.rotsparse_plan.effective_sparsity == pytest.approx(0.5, abs=0.01)
    read = sum((m.keep_k + config.residual_cost * m.residual_copy_k) * m.out_features
               for m in band.modules() if isinstance(m, TopKLinear))
    total = sum(m.in_features * m.out_features for m in band.modules() if isinstance(m, TopKLinear))
    assert band.rotsparse_plan.effective_sparsity == pytest.approx(1 - read / total)
    # the function: kept inputs through the weight, the next copy_k largest through the copy, the rest skipped
    x = torch.randn(3, 5, width)
    kept, copied = keep_topk(x, module.keep_k), keep_topk(x, module.keep_k + module.residual_copy_k)
    copy_weight = residual_weight_torch(module.residual_codes, module.residual_scales.view(torch.float16), 2,
                                        module.out_features, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), kept @ module.weight.t() + (copied - kept) @ copy_weight,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module(x[0, :1]), module(x[0:1, :1].expand(2, 1, width))[:1, 0],
                                   atol=1e-5, rtol=1e-5)  # decode kernel == masked path
    # closer to the dense model than plain Top-K at the same bytes
    assert (logits(band, tokens) - expected).norm() < (logits(plain, tokens) - expected).norm()
    # a band as wide as every input copies every dropped input: the full copy
    whole = copy.deepcopy(model)
    rotsparse.sparsify(whole, sparsity=0.5, method="topk", residual_bits=2, residual_band=1.0, progress=False)
    assert torch.equal(logits(whole, tokens), logits(full, tokens))


def test_sparsity_zero_is_exact_and_the_byte_budget_holds():
    model = tiny_model("llama")
    tokens = random_tokens()
    expected = logits(model, tokens)
    zero = copy.deepcopy(model)
    rotsparse.sparsify(zero, sparsity=0.0, method="topk", residual_bits=2, progress=False)
    torch.testing.assert_close(logits(zero, tokens), expected, atol=1e-6, rtol=1e-6)
    config = rotsparse.SparsifyConfig(sparsity=0.5, method="topk", residual_bits=2)
    assert config.residual_cost == pytest.approx((2 + 16 / RESIDUAL_GROUP) / 16)
    plain, carried = copy.deepcopy(model), copy.deepcopy(model)
    rotsparse.sparsify(plain, sparsity=0.5, method="topk", progress=False)
    rotsparse.sparsify(carried, config=config, progress=False)
    # more columns dropped than without the copy, and the bytes read stay at the request
    assert carried.model.layers[0].mlp.down_proj.keep_k < plain.model.layers[0].mlp.down_proj.keep_k
    assert carried.rotsparse_plan.effective_sparsity == pytest.approx(0.5, abs=0.01)
    skipped = 1 - sum(m.keep_k * m.out_features for m in carried.modules() if isinstance(m, TopKLinear)) / sum(
        m.in_features * m.out_features for m in carried.modules() if isinstance(m, TopKLinear))
    assert carried.rotsparse_plan.effective_sparsity == pytest.approx(skipped * (1 - config.residual_cost))
    # the copy carries what Top-K drops: closer to the dense model than plain Top-K at the same bytes
    assert (logits(carried, tokens) - expected).norm() < (logits(plain, tokens) - expected).norm()


def test_bench_counts_the_copy_rows_read():
    """Every output width a multiple of 64 (no padded copy columns): the bytes read are the requested fraction."""
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    dense = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    full = weight_bytes(structural_sparse_copy(dense, rotsparse.SparsifyConfig(sparsity=0.0, method="topk")))
    carried = structural_sparse_copy(dense, rotsparse.SparsifyConfig(sparsity=0.5, method="topk", residual_bits=2))
    ratio = weight_bytes(carried)["layers"] / full["layers"]
    assert ratio == pytest.approx(1 - carried.rotsparse_plan.effective_sparsity, abs=0.01)
    assert ratio == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("band", [None, 0.15])
def test_auto_with_a_copy_saves_and_loads_identically(tmp_path, band):
    model = tiny_model("llama")
    rotsparse.sparsify(model, sparsity=0.5, calibration=random_tokens(seed=7), residual_bits=2, residual_band=band,
                       progress=False)
    tokens = random_tokens(num_sequences=2, length=16)
    rotsparse.save(model, tmp_path)
    assert not any("residual" in key for key in model.state_dict())  # recomputed from the weight when loading
    for restored in (rotsparse.load(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert restored.rotsparse_plan == model.rotsparse_plan
        layer = restored.model.layers[1].self_attn.o_proj
        assert torch.equal(layer.residual_codes, model.model.layers[1].self_attn.o_proj.residual_codes)
        assert layer.residual_copy_k == model.model.layers[1].self_attn.o_proj.residual_copy_k
        with torch.no_grad():
            torch.testing.assert_close(restored(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)
    model.to(torch.bfloat16)  # casting the model leaves the copy's scale bits alone
    assert model.model.layers[0].mlp.up_proj.residual_scales.dtype == torch.int16
    halves = rotsparse.load(tmp_path, dtype=torch.bfloat16)  # loaded in bfloat16: the copy of the bfloat16 weight
    up = halves.model.layers[0].mlp.up_proj
    codes, scales = quantize_residual(up.weight.t(), 2, RESIDUAL_GROUP)
    assert torch.equal(up.residual_codes, codes) and torch.equal(up.residual_scales.view(torch.float16), scales)


def test_bad_settings_are_refused_before_the_model_changes():
    for settings, message in (({"residual_bits": 3}, "residual_bits must be one of"),
                              ({"residual_bits": True}, "residual_bits must be one of"),
                              ({"residual_bits": 2, "weight_bits": 4}, "cannot be combined with weight_bits"),
                              ({"residual_bits": 1, "l2_rescale": True}, "cannot be combined with l2_rescale"),
                              ({"residual_bits": 2, "sparsity": 0.9}, "cannot be reached with residual_bits=2"),
                              ({"residual_band": 0.1}, "set residual_bits"),
                              ({"residual_bits": 2, "residual_band": 0.0}, "residual_band must be"),
                              ({"residual_bits": 2, "residual_band": 1.5}, "residual_band must be"),
                              ({"residual_bits": 2, "residual_band": True}, "residual_band must be"),
                              ({"residual_bits": 2, "residual_band": 0.1, "block_size": 8}, "block_size"),
                              ({"residual_bits": 2, "residual_band": 0.5, "sparsity": 0.95},
                               "residual_band=0.5")):
        with pytest.raises(ValueError, match=message):
            rotsparse.SparsifyConfig(**settings)
    model = tiny_model("qwen3_moe")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="mixture-of-experts"):
        rotsparse.sparsify(model, sparsity=0.5, method="topk", residual_bits=2, progress=False)
    assert not hasattr(model, "rotsparse_plan")
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    dense = tiny_model("llama")
    rotsparse.sparsify(dense, sparsity=0.4, method="topk", residual_bits=1, progress=False)
    with pytest.raises(ValueError, match="residual weight copy"):
        rotsparse.recover(dense, texts=random_tokens(length=16), steps=1, seqlen=8)
    with pytest.raises(ValueError, match="residual weight copy"):
        check_servable(dense.rotsparse_plan, "llama")


def test_cli_flag():
    args = build_parser().parse_args(["sparsify", "--out", "o", "--residual-bits", "2"])
    assert config_from_args(args) == rotsparse.SparsifyConfig(residual_bits=2)
    args = build_parser().parse_args(["sparsify", "--out", "o", "--residual-bits", "2", "--residual-band", "0.1"])
    assert config_from_args(args) == rotsparse.SparsifyConfig(residual_bits=2, residual_band=0.1)
