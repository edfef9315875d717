"""Weight-only int8 / int4 Top-K linears: the packed layout, the quantizers' error bound, the C++ kernels against the
PyTorch reference (exact K, dropped channels never read), the quantized model's paths, save/load, refusals."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import rotsparse
from rotsparse.bench import structural_sparse_copy, weight_bytes
from rotsparse.cli import build_parser, config_from_args
from rotsparse.kernels import build_extension, topk_gemv_int4, topk_gemv_int8, topk_mask
from rotsparse.kernels.reference import (group_int8_activations, int4_positions, pack_int4, topk_gemv_int4_torch,
                                         topk_gemv_int8_torch, unpack_int4)
from rotsparse.quantize import dequantize, quantize_int4, quantize_int8
from rotsparse.runtime import QuantizedTopKLinear, set_kernels

from tiny_models import distinct_token, random_tokens, tiny_model

SHAPES = [(64, 144, 16), (128, 34, 32), (96, 48, 32)]  # (in, out, int4 group): out % 32 = 16, 2, 16


@pytest.mark.parametrize("out", [2, 34, 48, 64, 144])
def test_int4_packing_is_a_permutation_and_round_trips(out):
    assert sorted(int4_positions(out).tolist()) == list(range(out))
    nibbles = torch.randint(0, 16, (5, out), dtype=torch.uint8)
    packed = pack_int4(nibbles)
    assert packed.shape == (5, out // 2) and torch.equal(unpack_int4(packed, out), nibbles)
    assert (packed[:, 0] & 15).tolist() == nibbles[:, 0].tolist()  # byte 0: column 0 low, column w/2 high
    assert (packed[:, 0] >> 4).tolist() == nibbles[:, min(out, 32) // 2].tolist()


@pytest.mark.parametrize("n_in, n_out, group", SHAPES)
def test_quantization_error_is_at_most_half_a_step(n_in, n_out, group):
    weight_t = torch.randn(n_in, n_out)
    q, scale = quantize_int8(weight_t)
    assert q.dtype == torch.int8 and scale.shape == (n_out,) and q.abs().max() <= 127
    error = (dequantize(q, scale, 8, torch.float64) - weight_t.double()).abs()
    assert (error <= scale.double() / 2 + 1e-9).all()
    packed, scales = quantize_int4(weight_t, group)
    assert packed.shape == (n_in, n_out // 2) and scales.shape == (n_in // group, n_out)
    assert scales.dtype == torch.float16
    step = scales.double().repeat_interleave(group, dim=0)
    error = (dequantize(packed, scales, 4, torch.float64) - weight_t.double()).abs()
    assert (error <= step * (0.5 + 7.5 * 2 ** -11) + 1e-6).all()  # + the float16 rounding of absmax / 7.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_in, n_out, group", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpp_kernels_equal_the_reference_and_the_masked_dense_product(dtype, n_in, n_out, group, with_bias):
    assert build_extension() is not None
    weight_t = torch.randn(n_in, n_out)
    int8, int4 = quantize_int8(weight_t), quantize_int4(weight_t, group)
    x = distinct_token(n_in, dtype)
    bias = torch.randn(n_out).to(dtype) if with_bias else None
    tolerance = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    for keep_k in (0, 1, n_in // 3, n_in // 2, n_in - 1, n_in):
        expected_mask = topk_mask(x.float(), keep_k)
        for kernel, reference, (qweight, scales), bits in ((topk_gemv_int8, topk_gemv_int8_torch, int8, 8),
                                                           (topk_gemv_int4, topk_gemv_int4_torch, int4, 4)):
            actual = kernel(x, qweight, scales, bias, keep_k)
            assert actual.dtype == dtype and actual.shape == (n_out,)
            torch.testing.assert_close(actual.float(), reference(x, qweight, scales, bias, keep_k).float(),
                                       **tolerance)
            kept = group_int8_activations(expected_mask, group) if bits == 4 else expected_mask
            dense = kept @ dequantize(qweight, scales, bits, torch.float32)
            if bias is not None:
                dense = dense + bias.float()
            torch.testing.assert_close(actual.float(), dense, **tolerance)


def test_dropped_channels_and_their_groups_are_never_read():
    """Poison the weight rows of the dropped channels and the int4 scales of groups without a kept channel (NaN):
    the kernels' output equals the unpoisoned reference, so they read neither."""
    n_in, n_out, group = 128, 80, 32
    weight_t = torch.randn(n_in, n_out)
    x = torch.full((n_in,), 0.01)
    kept = torch.tensor([3, 7, 8, 31, 64, 65, 90])  # groups 0, 2 and 3 hold kept channels; group 1 does not
    x[kept] = torch.linspace(1, 2, len(kept))
    dropped = torch.ones(n_in, dtype=torch.bool)
    dropped[kept] = False
    q, scale = quantize_int8(weight_t)
    expected = topk_gemv_int8_torch(x, q, scale, None, len(kept))
    q[dropped] = 127
    torch.testing.assert_close(topk_gemv_int8(x, q, scale, None, len(kept)), expected)
    packed, scales = quantize_int4(weight_t, group)
    expected = topk_gemv_int4_torch(x, packed, scales, None, len(kept))
    packed[dropped] = 0xFF
    scales[1] = float("nan")
    torch.testing.assert_close(topk_gemv_int4(x, packed, scales, None, len(kept)), expected)


def test_ops_have_fake_implementations():
    weight_t = torch.randn(64, 48)
    x = torch.randn(1, 64)
    torch.library.opcheck(torch.ops.rotsparse.topk_gemv_int8.default, (x, *quantize_int8(weight_t), None, 20))
    torch.library.opcheck(torch.ops.rotsparse.topk_gemv_int4.default,
                          (x, *quantize_int4(weight_t, 16), torch.randn(48), 20))


def test_bad_kernel_arguments_are_refused():
    packed, scales = quantize_int4(torch.randn(64, 48), 16)
    with pytest.raises(ValueError, match="features expected"):
        topk_gemv_int4(torch.randn(2, 63), packed, scales, None, 8)
    with pytest.raises(TypeError, match="float16 scales"):
        topk_gemv_int4(torch.randn(64), packed, scales.float(), None, 8)
    with pytest.raises(ValueError, match="keep_k"):
        topk_gemv_int8(torch.randn(64), *quantize_int8(torch.randn(64, 48)), None, 65)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int4(torch.randn(64, 48), 24)


def quantized(bits: int, method: str = "topk", sparsity: float = 0.5, model=None):
    model = model if model is not None else tiny_model("llama")
    return rotsparse.sparsify(model, sparsity=sparsity, method=method, calibration=random_tokens(seed=3),
                              weight_bits=bits, group_size=16, progress=False)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", ["topk", "auto"])
def test_quantization_applies_to_the_folded_weights(bits, method):
    """The same calibration folded with and without weight_bits: every quantized Top-K linear dequantizes to
    the float model's (folded) weight within half a quantization step, with the same K."""
    dense = tiny_model("llama")
    calibrated = rotsparse.calibrate(dense, calibration=random_tokens(seed=3), progress=False,
                                     config=rotsparse.SparsifyConfig(method=method)) if method == "auto" else None
    settings = dict(sparsity=0.5, method=method, calibrated=calibrated, progress=False)
    floats = rotsparse.sparsify(copy.deepcopy(dense), **settings)
    ints = rotsparse.sparsify(copy.deepcopy(dense), weight_bits=bits, group_size=16, **settings)
    modules = dict(floats.named_modules())
    count = 0
    for name, module in ints.named_modules():
        if isinstance(module, QuantizedTopKLinear):
            reference = modules[name]
            assert module.keep_k == reference.keep_k and module.weight_bits == bits
            error = (module.dequantized_weight(torch.float64) - reference.weight.double()).abs().max()
            assert error <= module.scales.double().max() * 0.51
            count += 1
    assert count == 14 and ints.rotsparse_plan.config.weight_bits == bits


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_steps_through_the_kernels_equal_the_masked_path(bits):
    model = quantized(bits)
    tokens = random_tokens(num_sequences=1, length=12)
    with torch.no_grad():
        full = model(tokens).logits
        cache = model(tokens[:, :-1], use_cache=True).past_key_values
        step = model(tokens[:, -1:], past_key_values=cache).logits
        set_kernels(model, False)
        cache = model(tokens[:, :-1], use_cache=True).past_key_values
        masked = model(tokens[:, -1:], past_key_values=cache).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, masked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_and_from_pretrained_round_trip_is_identical(tmp_path, bits):
    model = quantized(bits, method="auto")
    tokens = random_tokens(num_sequences=2, length=16)
    rotsparse.save(model, tmp_path)
    for restored in (rotsparse.load(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        saved, reloaded = model.state_dict(), restored.state_dict()
        assert saved.keys() == reloaded.keys()
        assert all(torch.equal(saved[key], reloaded[key]) for key in saved)
        assert restored.rotsparse_plan == model.rotsparse_plan
        assert sum(isinstance(m, QuantizedTopKLinear) for m in restored.modules()) == 14
        with torch.no_grad():
            torch.testing.assert_close(restored(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)
    restored = rotsparse.load(tmp_path, dtype=torch.bfloat16)  # casting the model leaves the scales' bits alone
    assert torch.equal(restored.model.layers[0].mlp.down_proj.qscale, model.model.layers[0].mlp.down_proj.qscale)


def test_from_pretrained_topk_quantizes_while_loading(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=rotsparse.RotsparseConfig(method="topk", sparsity=0.4, weight_bits=4,
                                                                group_size=16))
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantizedTopKLinear)
    assert model.rotsparse_plan.config.weight_bits == 4


def test_bad_settings_are_refused_before_the_model_changes():
    model = tiny_model("llama")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="group_size 32 to divide"):  # intermediate width 144
        rotsparse.sparsify(model, sparsity=0.5, method="topk", weight_bits=4, group_size=32)
    with pytest.raises(ValueError, match="weight_bits"):
        rotsparse.SparsifyConfig(weight_bits=3)
    with pytest.raises(ValueError, match="group_size"):
        rotsparse.SparsifyConfig(weight_bits=4, group_size=0)
    assert not hasattr(model, "rotsparse_plan")
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_cli_flags_and_bench_bytes():
    for command in ("sparsify --out o", "eval", "bench", "run"):
        args = build_parser().parse_args([*command.split(), "--weight-bits", "4", "--group-size", "64"])
        assert config_from_args(args) == rotsparse.SparsifyConfig(weight_bits=4, group_size=64)
    dense = tiny_model("llama")
    shapes = [(m.in_features, m.out_features) for name, m in dense.model.layers.named_modules()
              if isinstance(m, torch.nn.Linear)]
    for bits, per_weight, per_scale in ((8, 1.0, 4 / 64), (4, 0.5, 2 / 16)):
        config = rotsparse.SparsifyConfig(sparsity=0.0, method="topk", weight_bits=bits, group_size=16)
        model = structural_sparse_copy(dense, config)
        expected = sum(n_in * n_out * per_weight + (4 * n_out if bits == 8 else n_in * n_out * per_scale)
                       for n_in, n_out in shapes)
        assert weight_bytes(model)["layers"] == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_several_tokens_equal_the_masked_product(dtype):
    """int8 weights, several tokens per call (passes over the union of up to 8 tokens' kept rows): every token's
    own Top-K, for K from 0 to in, with and without bias; the op traces (fake) for several tokens too."""
    qweight, scale = quantize_int8(torch.randn(200, 72))
    bias = torch.randn(72).to(dtype)
    for tokens in ((2,), (3, 3), (17,)):
        x = distinct_token(200, dtype, seed=len(tokens)).expand(*tokens, 200) * torch.linspace(
            0.5, 1.5, int(torch.tensor(tokens).prod())).reshape(*tokens, 1).to(dtype)
        x = x + torch.randn(*tokens, 200).to(dtype) * 0.1
        for keep_k in (0, 1, 66, 200):
            for b in (None, bias):
                expected = (topk_mask(x.double(), keep_k) @ qweight.double()) * scale.double()
                expected = expected if b is None else expected + b.double()
                got = topk_gemv_int8(x, qweight, scale, b, keep_k)
                assert got.shape == (*tokens, 72) and got.dtype == dtype
                tolerance = 1e-4 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * 10)
    torch.library.opcheck(torch.ops.rotsparse.topk_gemv_int8.default, (torch.randn(3, 200), qweight, scale, None, 50))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_in, n_out, group", [(256, 80, 32), (192, 528, 64)])  # out % 32 = 16 / 16
def test_int4_several_tokens_equal_the_reference_and_one_token_at_a_time(dtype, n_in, n_out, group):
    """int4 weights, several tokens per call (passes of up to 8 tokens over the union of their kept rows): every
    token's own Top-K and its own int8 rounding per group, so each token's output is the one-token kernel's and the
    reference's; K from 0 to in, with and without bias; the op traces (fake) for several tokens too."""
    packed, scales = quantize_int4(torch.randn(n_in, n_out), group)
    bias = torch.randn(n_out).to(dtype)
    for tokens in ((2,), (3, 3), (5,), (17,)):  # passes of 2; 8 + 1; 5; 8 + 8 + 1 tokens
        count = int(torch.tensor(tokens).prod())
        x = (torch.randn(*tokens, n_in) * torch.linspace(0.5, 1.5, count).reshape(*tokens, 1)).to(dtype)
        for keep_k in (0, 1, n_in // 3, n_in):
            for b in (None, bias):
                got = topk_gemv_int4(x, packed, scales, b, keep_k)
                assert got.shape == (*tokens, n_out) and got.dtype == dtype
                one_at_a_time = torch.stack([topk_gemv_int4(t, packed, scales, b, keep_k)
                                             for t in x.reshape(-1, n_in)]).reshape(got.shape)
                weight = dequantize(packed, scales, 4, torch.float64)
                expected = group_int8_activations(topk_mask(x.double(), keep_k), group).double() @ weight
                expected = expected if b is None else expected + b.double()
                tolerance = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.1)
                torch.testing.assert_close(got.double(), expected, **tolerance)
                torch.testing.assert_close(got.double(), one_at_a_time.double(), **tolerance)
                torch.testing.assert_close(got, topk_gemv_int4_torch(x, packed, scales, b, keep_k), **tolerance)
    torch.library.opcheck(torch.ops.rotsparse.topk_gemv_int4.default, (torch.randn(3, n_in), packed, scales, None, 50))


def test_int4_several_tokens_read_only_the_union_of_their_kept_rows():
    """Poison every row no token keeps and the scales of groups where no token keeps a row: the output is finite
    and equals the unpoisoned reference."""
    n_in, n_out, group = 128, 96, 32
    packed, scales = quantize_int4(torch.randn(n_in, n_out), group)
    x = torch.full((3, n_in), 0.01)
    kept = [torch.tensor([3, 8, 40]), torch.tensor([8, 41, 100]), torch.tensor([5, 44, 127])]  # group 2 unused
    for token, rows in zip(x, kept):
        token[rows] = torch.linspace(1, 2, len(rows))
    expected = topk_gemv_int4_torch(x, packed, scales, None, 3)
    union = torch.zeros(n_in, dtype=torch.bool)
    union[torch.cat(kept)] = True
    packed[~union] = 0xFF
    scales[2] = float("nan")
    torch.testing.assert_close(topk_gemv_int4(x, packed, scales, None, 3), expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_batched_generation_takes_the_quantized_kernel_and_equals_the_masked_path(monkeypatch, bits):
    model = quantized(bits)
    calls = []
    name = f"topk_gemv_int{bits}"
    real = getattr(rotsparse.kernels, name)
    monkeypatch.setattr(rotsparse.kernels, name, lambda x, *rest: calls.append(x.shape) or real(x, *rest))
    tokens = random_tokens(num_sequences=3, length=6, seed=5)
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with_kernels = model.generate(tokens, **settings)
        assert any(shape[:2] == (3, 6) for shape in calls)  # the prompts
        assert any(shape[:2] == (3, 1) for shape in calls)  # batch-3 decode steps
        set_kernels(model, False)
        masked = model.generate(tokens, **settings)
    assert torch.equal(with_kernels.sequences, masked.sequences)
    # int4: both paths round the activations to int8 per group, so an activation that upstream float32 rounding
    # moves across a rounding boundary changes by a whole step in one path only
    tolerance = 1e-4 if bits == 8 else 2e-3
    for got, want in zip(with_kernels.logits, masked.logits):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
