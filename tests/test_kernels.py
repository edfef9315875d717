"""Tests for rotsparse.kernels (Top-K sparse GEMV).

The first test that needs the C++ kernel JIT-compiles it (~15-40 s on 2 cores,
cached by torch afterwards).
"""

import importlib.util
import shutil

import pytest
import torch

import rotsparse.kernels as K
from rotsparse.kernels.reference import topk_gemv_torch
from rotsparse.kernels import dense_gemv, index_gemv, kernel_backend, topk_gemv, topk_indices, topk_mask

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


def distinct_x(n: int, dtype: torch.dtype, seed: int = 0, batch: tuple = ()) -> torch.Tensor:
    """Activations whose |values| are pairwise distinct even in bfloat16 (no Top-K ties).

    Magnitudes are 2**e * (1 + m/128) for distinct (e, m), randomly permuted and signed.
    """
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64)
    octaves = (n + 127) // 128
    mag = torch.exp2(torch.div(i, 128, rounding_mode="floor") - octaves // 2) * (1 + (i % 128) / 128)
    out = []
    for _ in range(max(1, int(torch.tensor(batch).prod().item()) if batch else 1)):
        perm = torch.randperm(n, generator=g)
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        out.append(mag[perm] * sign)
    x = torch.stack(out).reshape(*batch, n) if batch else out[0]
    return x.to(dtype)


def make_weight(n_in: int, n_out: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_in, n_out, generator=g) / n_in**0.5).to(dtype).contiguous()


def reference(x, weight_t, bias, k):
    y = topk_mask(x.double(), k) @ weight_t.double()
    if bias is not None:
        y = y + bias.double()
    return y


def assert_close_to_ref(y, ref, dtype):
    scale = ref.abs().max().item() + 1e-12
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    err = (y.double() - ref).abs()
    assert (err <= tol * scale + tol * ref.abs()).all(), f"max err {err.max().item():.3g} (scale {scale:.3g})"


SHAPES = [(576, 1536), (1000, 37), (64, 20000), (2048, 4096), (13, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("frac", [0.0, "one", 0.5, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_gemv_matches_dense_reference(dtype, shape, frac, with_bias):
    n_in, n_out = shape
    k = 1 if frac == "one" else int(n_in * frac)
    x = distinct_x(n_in, dtype, seed=n_in + k)
    w = make_weight(n_in, n_out, dtype)
    b = torch.randn(n_out).to(dtype) if with_bias else None
    y = topk_gemv(x, w, b, k)
    assert y.shape == (n_out,) and y.dtype == dtype
    assert_close_to_ref(y, reference(x, w, b, k), dtype)


@pytest.mark.parametrize("xshape", [(1, 576), (1, 1, 576)])
def test_output_shape_follows_x(xshape):
    x = torch.randn(xshape)
    w = make_weight(576, 96, torch.float32)
    y = topk_gemv(x, w, None, 100)
    assert y.shape == (*xshape[:-1], 96)
    assert_close_to_ref(y, reference(x, w, None, 100), torch.float32)


def test_randn_float32_and_zero_activations():
    # randn has no ties; also a vector with many exact zeros (ties at 0)
    x = torch.randn(4096)
    w = make_weight(4096, 512, torch.float32)
    assert_close_to_ref(topk_gemv(x, w, None, 1234), reference(x, w, None, 1234), torch.float32)
    x[::3] = 0.0
    y = topk_gemv(x, w, None, 4000)  # more than the nonzeros: zero rows contribute nothing
    assert_close_to_ref(y, x.double() @ w.double(), torch.float32)


def test_k0_gives_bias_and_kin_gives_dense():
    x = torch.randn(300)
    w = make_weight(300, 70, torch.float32)
    b = torch.randn(70)
    y0 = topk_gemv(x, w, b, 0)
    assert torch.equal(y0, b) and y0.data_ptr() != b.data_ptr()
    assert torch.equal(topk_gemv(x, w, None, 0), torch.zeros(70))
    torch.testing.assert_close(topk_gemv(x, w, b, 300), x @ w + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_mask_exact_k_per_token(dtype):
    x = distinct_x(257, dtype, batch=(3, 5))
    for k in [0, 1, 100, 256, 257]:
        m = topk_mask(x, k)
        assert m.shape == x.shape and m.dtype == dtype
        assert ((m != 0).sum(-1) == k).all()
        # kept entries are unchanged and are the largest |x| of their own token
        kept = m != 0
        assert torch.equal(m[kept], x[kept])
        if 0 < k < 257:
            smallest_kept = torch.where(kept, x.abs(), torch.inf).amin(-1)
            largest_dropped = torch.where(kept, -torch.inf, x.abs()).amax(-1)
            assert (smallest_kept > largest_dropped).all()
    assert torch.equal(topk_mask(x, 0), torch.zeros_like(x))
    assert torch.equal(topk_mask(x, 257), x)


def test_topk_mask_is_per_token_not_union():
    x = torch.tensor([[10.0, 1.0, 2.0, 3.0], [1.0, 20.0, 3.0, 2.0]])
    m = topk_mask(x, 1)
    assert torch.equal(m, torch.tensor([[10.0, 0, 0, 0], [0, 20.0, 0, 0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_indices_sorted_and_exact(dtype):
    x = distinct_x(1000, dtype, seed=3)
    for k in [0, 1, 499, 1000]:
        idx = topk_indices(x, k)
        assert idx.dtype == torch.long and idx.shape == (k,)
        assert torch.equal(idx, idx.sort().values)
        ref = x.float().abs().topk(k).indices.sort().values if k else idx
        assert torch.equal(idx, ref)


def test_ties_still_select_exactly_k():
    x = torch.ones(100)
    w = make_weight(100, 16, torch.float32)
    y = topk_gemv(x, w, None, 37)
    # any 37 rows of w are a valid answer; verify the sum matches 37 distinct rows
    # by checking against the C++/torch index selection
    idx = topk_indices(x, 37)
    assert idx.numel() == 37 and idx.unique().numel() == 37
    torch.testing.assert_close(y, w[idx].sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_go_to_the_lowest_indices_on_every_path(dtype):
    """With ties and zeros at the threshold, the reference mask, the C++ selection, one token through the kernel
    and several tokens through the batched kernel all keep the same entries: the lowest indices among the tied."""
    from rotsparse.kernels.reference import topk_select

    generator = torch.Generator().manual_seed(4)
    x = (torch.randint(-4, 5, (6, 130), generator=generator) / 2).to(dtype)
    w = make_weight(130, 24, dtype)
    for k in (0, 1, 7, 64, 129, 130):
        lowest = [sorted(range(130), key=lambda i: (-abs(float(row[i])), i))[:k] for row in x]
        assert topk_select(x, k).tolist() == [sorted(indices) for indices in lowest]
        for row, indices in zip(x, lowest):
            assert topk_indices(row, k).tolist() == sorted(indices)
        mask = torch.zeros(6, 130, dtype=torch.bool)
        for row, indices in enumerate(lowest):
            mask[row, indices] = True
        expected = (x.double() * mask) @ w.double()
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for tokens in (x, x[:1]):
            got = topk_gemv(tokens, w, None, k).double()
            torch.testing.assert_close(got, expected[: len(tokens)], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(topk_mask(x, k), torch.where(mask, x, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_gemv(dtype):
    x = distinct_x(700, dtype, seed=5)
    w = make_weight(700, 300, dtype)
    b = torch.randn(300).to(dtype)
    idx = topk_indices(x, 350)
    assert_close_to_ref(index_gemv(x, idx, w, b), reference(x, w, b, 350), dtype)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_equals_cpp(dtype):
    assert kernel_backend("cpu", dtype) == "cpp"
    x = distinct_x(1536, dtype, seed=7)
    w = make_weight(1536, 576, dtype)
    b = torch.randn(576).to(dtype)
    for k in [0, 1, 768, 1536]:
        y_cpp = topk_gemv(x, w, b, k)
        y_torch = topk_gemv_torch(x, w, b, k)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        scale = y_torch.float().abs().max().item()
        torch.testing.assert_close(y_cpp.float(), y_torch.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 13), (1000, 576), (20000, 64), (5, 1), (64, 2048)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_gemv_matches_linear(dtype, shape, with_bias):
    """dense_gemv: one token through a row-major (out, in) weight == F.linear (float32 accumulation)."""
    n_out, n_in = shape
    weight = make_weight(n_in, n_out, dtype).t().contiguous()
    bias = torch.randn(n_out).to(dtype) if with_bias else None
    for xshape in [(n_in,), (1, n_in), (1, 1, n_in)]:
        x = distinct_x(n_in, dtype, seed=3).reshape(xshape)
        y = dense_gemv(x, weight, bias)
        assert y.shape == (*xshape[:-1], n_out) and y.dtype == dtype
        ref = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
        assert_close_to_ref(y, ref, torch.bfloat16 if dtype != torch.float32 else dtype)


def test_dense_gemv_fallbacks_and_errors():
    w = make_weight(48, 16, torch.float64).t().contiguous()
    x = torch.randn(48, dtype=torch.float64)
    torch.testing.assert_close(dense_gemv(x, w), x @ w.t())  # float64: F.linear
    w32 = w.float().requires_grad_()
    y = dense_gemv(x.float(), w32)  # autograd records: F.linear, differentiable
    y.sum().backward()
    torch.testing.assert_close(w32.grad, x.float().expand(16, 48))
    with pytest.raises(ValueError, match="contiguous"):
        dense_gemv(x.float(), torch.randn(48, 16).t())
    with pytest.raises(TypeError, match="dtype mismatch"):
        dense_gemv(x.float(), w.bfloat16())
    with pytest.raises(ValueError, match="one token"):
        dense_gemv(torch.randn(2, 48), w.float())
    with pytest.raises(ValueError, match="shape mismatch"):
        dense_gemv(torch.randn(47), w.float())
    torch.library.opcheck(torch.ops.rotsparse.dense_gemv.default, (x.float().reshape(1, 48), w.float(), None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_topk_gemv_equals_topk_gemv(dtype):
    x = distinct_x(640, dtype, seed=9).reshape(1, 1, 640)
    w = make_weight(640, 96, dtype)
    b = torch.randn(96).to(dtype)
    for k in [0, 1, 320, 640]:
        torch.testing.assert_close(K.decode_topk_gemv(x, w, b, k), topk_gemv(x, w, b, k), rtol=0, atol=0)
    x64, w64 = x.double(), w.double()  # not a native dtype: goes through topk_gemv's fallback
    torch.testing.assert_close(K.decode_topk_gemv(x64, w64, None, 100), reference(x64, w64, None, 100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(576, 1536), (1000, 37), (13, 5), (96, 40), (300, 1030)], ids=str)
@pytest.mark.parametrize("tokens", [(2,), (3,), (2, 4), (9,), (17,)], ids=str)
def test_several_tokens_equal_the_masked_product(dtype, shape, tokens):
    """Several tokens (one pass over the union of up to 8 tokens' kept rows, then the next): every
    token's own Top-K, exactly, for K from 0 to in, with and without bias, in the input's shape."""
    n_in, n_out = shape
    x = distinct_x(n_in, dtype, seed=13, batch=tokens)
    w = make_weight(n_in, n_out, dtype)
    b = torch.randn(n_out).to(dtype)
    for k in sorted({0, 1, n_in // 3, n_in - 1, n_in}):
        for bias in (None, b):
            y = topk_gemv(x, w, bias, k)
            assert y.shape == (*tokens, n_out) and y.dtype == dtype
            assert_close_to_ref(y, reference(x, w, bias, k), torch.bfloat16 if dtype != torch.float32 else dtype)
            torch.testing.assert_close(K.decode_topk_gemv(x, w, bias, k), y, rtol=0, atol=0)


def test_several_tokens_read_only_their_kept_rows():
    """A row no token of the batch keeps is never read: poisoning it (NaN) leaves the output finite and equal."""
    x = torch.zeros(3, 64)
    x[0, [1, 5, 9]] = torch.tensor([3.0, -2.0, 1.0])
    x[1, [5, 20, 40]] = torch.tensor([1.0, 4.0, -1.5])
    x[2, [9, 40, 63]] = torch.tensor([-2.5, 2.0, 0.5])
    w = make_weight(64, 70, torch.float32)
    poisoned = w.clone()
    poisoned[[i for i in range(64) if i not in (1, 5, 9, 20, 40, 63)]] = float("nan")
    y = topk_gemv(x, poisoned, None, 3)
    torch.testing.assert_close(y, topk_gemv(x, w, None, 3))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x @ w)


def test_several_tokens_compile_and_autograd():
    w = make_weight(128, 40, torch.float32)
    b = torch.randn(40)
    x = torch.randn(4, 128)
    torch.library.opcheck(torch.ops.rotsparse.topk_gemv.default, (x, w, b, 50))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: topk_gemv(t, w, b, 50), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x, w, b, 50).float())
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    topk_gemv(xg, wg, bg, 50).square().sum().backward()
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    mask = (topk_mask(x, 50) != 0).float()
    ((x2 * mask) @ w2 + b2).square().sum().backward()
    for got, want in ((xg.grad, x2.grad), (wg.grad, w2.grad), (bg.grad, b2.grad)):
        torch.testing.assert_close(got, want)


def test_kernel_backend_values():
    assert kernel_backend("cpu") in ("cpp", "torch")
    if HAS_COMPILER:
        assert kernel_backend(torch.device("cpu")) == "cpp"
    assert kernel_backend("cpu", torch.float64) == "torch"


def test_float64_uses_torch_fallback():
    x = torch.randn(100, dtype=torch.float64)
    w = torch.randn(100, 20, dtype=torch.float64)
    torch.testing.assert_close(topk_gemv(x, w, None, 30), reference(x, w, None, 30))


def test_torch_compile_traces_op():
    w = make_weight(256, 64, torch.float32)
    b = torch.randn(64)

    def f(x):
        return torch.relu(topk_gemv(x, w, b, 100)) * 2

    x = torch.randn(1, 256)
    expected = f(x)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    x2 = torch.randn(1, 256)
    torch.testing.assert_close(compiled(x2), f(x2))


def test_torch_compile_traces_index_ops():
    w = make_weight(256, 64, torch.float32)

    def f(x):
        idx = topk_indices(x, 50)
        return index_gemv(x, idx, w) + 1

    x = torch.randn(1, 1, 256)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(f(x), reference(x, w, None, 50).float() + 1)


def test_opcheck():
    x = torch.randn(1, 128)
    w = make_weight(128, 40, torch.float32)
    b = torch.randn(40)
    torch.library.opcheck(torch.ops.rotsparse.topk_gemv.default, (x, w, b, 64))
    torch.library.opcheck(torch.ops.rotsparse.topk_gemv.default, (x, w, None, 0))
    idx = topk_indices(x, 64)
    torch.library.opcheck(torch.ops.rotsparse.index_gemv.default, (x, idx, w, b))
    torch.library.opcheck(torch.ops.rotsparse.topk_indices.default, (x, 64))


def test_autograd_matches_masked_dense():
    x = distinct_x(64, torch.float64, seed=11).float().requires_grad_()
    w = make_weight(64, 8, torch.float32).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    topk_gemv(x, w, b, 20).square().sum().backward()
    gx, gw, gb = x.grad, w.grad, b.grad
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    mask = (topk_mask(x2.detach(), 20) != 0).float()
    ((x2 * mask) @ w2 + b2).square().sum().backward()
    torch.testing.assert_close(gx, x2.grad)
    torch.testing.assert_close(gw, w2.grad)
    torch.testing.assert_close(gb, b2.grad)


def test_bad_inputs_raise_clear_errors():
    w = make_weight(32, 8, torch.float32)
    x = torch.randn(32)
    with pytest.raises(TypeError, match="dtype mismatch"):
        topk_gemv(x.bfloat16(), w, None, 4)
    with pytest.raises(TypeError, match="dtype mismatch"):
        topk_gemv(x, w, torch.zeros(8, dtype=torch.bfloat16), 4)
    with pytest.raises(ValueError, match="contiguous"):
        topk_gemv(x, torch.randn(8, 32).t(), None, 4)
    with pytest.raises(ValueError, match="out of range"):
        topk_gemv(x, w, None, 33)
    with pytest.raises(ValueError, match="out of range"):
        topk_gemv(x, w, None, -1)
    with pytest.raises(TypeError, match="keep_k"):
        topk_gemv(x, w, None, 4.0)
    with pytest.raises(ValueError, match="one token"):
        index_gemv(torch.randn(2, 32), torch.tensor([0]), w)
    with pytest.raises(ValueError, match="shape mismatch"):
        topk_gemv(torch.randn(31), w, None, 4)
    with pytest.raises(ValueError, match="bias"):
        topk_gemv(x, w, torch.zeros(9), 4)
    with pytest.raises(ValueError, match="2-D"):
        topk_gemv(x, w.reshape(32, 8, 1), None, 4)
    with pytest.raises(ValueError, match="out of range"):
        topk_mask(x, 33)
    with pytest.raises((RuntimeError, ValueError), match="out of range"):
        index_gemv(x, torch.tensor([0, 40]), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 1536), (1000, 37), (13, 5), (4096, 11008), (11008, 4096)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_path(dtype, shape, with_bias):
    n_in, n_out = shape
    x = distinct_x(n_in, dtype, seed=2).cuda()
    w = make_weight(n_in, n_out, dtype).cuda()
    b = torch.randn(n_out).to(dtype).cuda() if with_bias else None
    for k in [0, 1, n_in // 3, n_in // 2, n_in - 1, n_in]:
        y = topk_gemv(x, w, b, k)
        assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (n_out,)
        assert_close_to_ref(y.cpu(), reference(x.cpu(), w.cpu(), None if b is None else b.cpu(), k), dtype)
        indices = topk_indices(x, k)
        assert torch.equal(indices.cpu(), topk_indices(x.cpu(), k)), k  # distinct |x|: one right answer
        y = index_gemv(x, indices, w, b)
        assert y.dtype == dtype and y.shape == (n_out,)
        assert_close_to_ref(y.cpu(), reference(x.cpu(), w.cpu(), None if b is None else b.cpu(), k), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_selection_keeps_exactly_k_with_ties_and_zeros(dtype):
    x = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, -2.0, 0.0, 0.0, -0.0], dtype=dtype).cuda()
    for k in range(x.numel() + 1):
        indices = topk_indices(x, k).cpu()
        assert indices.numel() == k and torch.equal(indices, indices.sort().values)
        assert indices.unique().numel() == k
        kept = x.cpu().abs()[indices]
        dropped = x.cpu().abs()[[i for i in range(x.numel()) if i not in set(indices.tolist())]]
        assert kept.numel() == 0 or dropped.numel() == 0 or kept.min() >= dropped.max(), k
    x = torch.randn(4096).to(dtype).cuda().round()  # many ties in the 4096 entries
    for k in [1, 100, 2048, 4095]:
        indices = topk_indices(x, k).cpu()
        assert indices.numel() == k and indices.unique().numel() == k
        torch.testing.assert_close(x.cpu().abs()[indices].sort().values,
                                   x.cpu().abs().topk(k).values.sort().values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ties_go_to_the_lowest_indices(dtype):
    """The fused selection + gather keeps exactly the entries a stable descending sort of |x| puts first."""
    g = torch.Generator().manual_seed(3)
    # 4096: radix select on resident keys; 11008: binary search on resident keys; 20000: radix passes over x in
    # blocks (too wide to keep in registers)
    for n_in, n_out in [(4096, 4096), (11008, 512), (700, 50), (20000, 64)]:
        x = (torch.randn(n_in, generator=g) * 4).round().to(dtype)  # ~25 distinct magnitudes: many ties
        w = make_weight(n_in, n_out, dtype)
        b = torch.randn(n_out, generator=g).to(dtype)
        for k in [1, n_in // 10, n_in // 2, n_in - 1]:
            idx = torch.sort(-x.float().abs(), stable=True).indices[:k].sort().values
            assert torch.equal(topk_indices(x.cuda(), k).cpu(), idx), k
            ref = x.double()[idx] @ w.double()[idx] + b.double()
            assert_close_to_ref(topk_gemv(x.cuda(), w.cuda(), b.cuda(), k).cpu(), ref, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_repeated_calls_and_graph_replay():
    """The one-launch kernel leaves its scratch row at zero after every call: repeated eager calls and replays of
    a captured CUDA graph with new inputs give fresh results."""
    dtype, n_in, n_out, k = torch.bfloat16, 4096, 4096, 2048
    w = make_weight(n_in, n_out, dtype).cuda()
    b = torch.randn(n_out).to(dtype).cuda()
    xs = [distinct_x(n_in, dtype, seed=s).cuda() for s in range(3)]
    refs = [reference(x.cpu(), w.cpu(), b.cpu(), k) for x in xs]
    with torch.inference_mode():
        for _ in range(2):
            for x, ref in zip(xs, refs):
                assert_close_to_ref(topk_gemv(x, w, b, k).cpu(), ref, dtype)
                assert_close_to_ref(index_gemv(x, topk_indices(x, k), w, b).cpu(), ref, dtype)
        static_x = xs[0].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = topk_gemv(static_x, w, b, k)
            static_z = index_gemv(static_x, topk_indices(static_x, k), w, b)
        for x, ref in zip(xs[::-1], refs[::-1]):
            static_x.copy_(x)
            graph.replay()
            assert_close_to_ref(static_y.cpu(), ref, dtype)
            assert_close_to_ref(static_z.cpu(), ref, dtype)
        assert_close_to_ref(topk_gemv(xs[1], w, b, k).cpu(), refs[1], dtype)


def _triton_version() -> tuple:
    if importlib.util.find_spec("triton") is None:
        return ()
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


@pytest.mark.skipif(_triton_version() < (3, 9), reason="needs Triton >= 3.9: older interpreters cannot run loops "
                    "whose bounds come from program ids (the compiled kernels are tested on CUDA)")
def test_triton_kernels_in_the_interpreter():
    """The Triton selection + gather kernels on CPU tensors through Triton's interpreter (no GPU needed)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch
        from rotsparse.kernels import topk_mask
        from rotsparse.kernels.triton_gemv import index_gemv_triton, topk_gemv_triton, topk_indices_triton
        g = torch.Generator().manual_seed(0)
        for n_in, n_out in [(300, 200), (1000, 37), (64, 5)]:
            x = torch.randn(n_in, generator=g)
            w = torch.randn(n_in, n_out, generator=g) / n_in**0.5
            b = torch.randn(n_out, generator=g)
            for k in [0, 1, n_in // 3, n_in - 1, n_in]:
                for bias in (None, b):
                    y = topk_gemv_triton(x, w, bias, k)
                    ref = topk_mask(x.double(), k) @ w.double() + (0 if bias is None else bias.double())
                    assert (y.double() - ref).abs().max() < 1e-4, (n_in, n_out, k)
                if 0 < k < n_in:
                    indices = topk_indices_triton(x, k)
                    assert torch.equal(indices, x.abs().topk(k).indices.sort().values)
                    y = index_gemv_triton(x, indices, w, b)
                    assert (y.double() - ref).abs().max() < 1e-4, (n_in, n_out, k)
        for dtype in (torch.bfloat16, torch.float16):  # radix search over the bits the dtype has
            x = (torch.randn(4096, generator=g) * torch.exp(3 * torch.randn(4096, generator=g))).to(dtype)
            for k in [1, 1365, 2048, 4095]:
                kept = x.float().abs()[topk_indices_triton(x, k)]
                assert torch.equal(kept.sort().values, x.float().abs().topk(k).values.sort().values), (dtype, k)
        x = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, -2.0, 0.0, 0.0, -0.0])
        assert topk_indices_triton(x, 3).tolist() == [1, 2, 4]  # ties kept in index order
        assert topk_indices_triton(x, 7).tolist() == [0, 1, 2, 3, 4, 5, 6]
        x = torch.randn(700, generator=g).round().to(torch.bfloat16)  # many ties: the lowest indices are kept
        w = (torch.randn(700, 50, generator=g) / 30).to(torch.bfloat16)
        for k in [1, 100, 350, 699]:
            idx = torch.sort(-x.float().abs(), stable=True).indices[:k].sort().values
            assert torch.equal(topk_indices_triton(x, k), idx), k
            ref = x.double()[idx] @ w.double()[idx]
            assert (topk_gemv_triton(x, w, None, k).double() - ref).abs().max() < 1e-2 * ref.abs().max(), k
        print("OK")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_build_failure_warns_once_and_falls_back(tmp_path):
    """With a broken compiler the op warns ONCE (naming the reason) and uses PyTorch."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import warnings, torch
        import rotsparse.kernels as K
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            x = torch.randn(50); w = torch.randn(50, 7)
            y1 = K.topk_gemv(x, w, None, 10)
            y2 = K.topk_gemv(x, w, None, 10)
            backend = K.kernel_backend("cpu")
        msgs = [str(r.message) for r in rec if "rotsparse" in str(r.message)]
        assert len(msgs) == 1, msgs
        assert "falling back" in msgs[0] and "Reason" in msgs[0], msgs[0]
        assert backend == "torch", backend
        torch.testing.assert_close(y1, K.topk_mask(x, 10) @ w)
        print("OK")
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
