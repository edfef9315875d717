"""Recovery training (Q-Sparse): straight-through Top-K, the training loop, and the option switches."""

import json

import pytest
import torch
import torch.nn.functional as F

import rotsparse
from rotsparse.config import SparsifyConfig
from rotsparse.recovery import (TRAINABLE_PRESETS, _learning_rate_factor, configure, recover, select_trainable,
                                training_windows)
from rotsparse.runtime import SquaredReLU, TopKLinear, apply_topk_options
from rotsparse.topk import block_keep, keep_topk, keep_topk_blocks, sparsify_activation

from tiny_models import random_tokens, tiny_model


def sparsified(family="llama", sparsity=0.5, method="topk", **fields):
    model = tiny_model(family)
    return rotsparse.sparsify(model, sparsity=sparsity, method=method, calibration=random_tokens(seed=3),
                              progress=False, **fields)


def topk_sites(model):
    return [m for m in model.modules() if isinstance(m, TopKLinear)]


def site_linear(keep_k=5, width=16, out=8, bias=True, seed=0):
    torch.manual_seed(seed)
    return TopKLinear.from_linear(torch.nn.Linear(width, out, bias=bias), keep_k, "h1")


# --- straight-through estimator -------------------------------------------------------------------------------

def test_straight_through_gradient_is_identity_and_without_it_masked():
    module = site_linear()
    x = torch.randn(3, 7, 16, requires_grad=True)
    captured = {}

    def run(training, straight_through):
        module.train(training)
        module.straight_through = straight_through
        x.grad = None
        site_input = x * 1.0  # the tensor entering the site
        site_input.retain_grad()
        sparse = sparsify_activation(site_input, module.keep_k,
                                     straight_through=module.training and module.straight_through)
        sparse.retain_grad()
        output = F.linear(sparse, module.weight, module.bias)
        assert torch.allclose(output, module(site_input))
        output.square().sum().backward()
        captured["in"], captured["out"] = site_input.grad.clone(), sparse.grad.clone()

    run(training=True, straight_through=True)
    assert torch.equal(captured["in"], captured["out"])  # identity: gradient leaving the Top-K == reaching its input
    run(training=True, straight_through=False)
    mask = keep_topk(x.detach(), module.keep_k) != 0
    assert torch.equal(captured["in"], captured["out"] * mask)
    assert (captured["in"][~mask] == 0).all() and (captured["out"][~mask] != 0).any()


def test_top_k_site_module_gradient_with_and_without_ste():
    """The same through the module itself: d(loss)/dx with STE equals W^T g for every entry."""
    module = site_linear()
    x = torch.randn(4, 16, requires_grad=True)
    grad_output = torch.randn(4, 8)
    module.train()
    module(x).backward(grad_output)
    assert torch.allclose(x.grad, grad_output @ module.weight, atol=1e-6)
    x.grad = None
    module.straight_through = False
    module(x).backward(grad_output)
    mask = keep_topk(x.detach(), module.keep_k) != 0
    assert torch.allclose(x.grad, (grad_output @ module.weight) * mask, atol=1e-6)
    module.eval()  # eval: no STE, even if switched on
    module.straight_through = True
    x.grad = None
    module(x).backward(grad_output)
    assert torch.allclose(x.grad, (grad_output @ module.weight) * mask, atol=1e-6)


def test_mask_is_per_token_not_a_union():
    x = torch.zeros(2, 8)
    x[0, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    x[1, 4:] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    sparse = sparsify_activation(x, 2, straight_through=True)
    assert torch.equal(sparse[0], torch.tensor([5.0, 4.0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(sparse[1], torch.tensor([0, 0, 0, 0, 5.0, 4.0, 0, 0]))


# --- the training loop -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3_text", "olmo2", "phi3"])
@pytest.mark.parametrize("method", ["larosa", "topk"])
def test_a_few_steps_lower_the_loss_and_keep_the_model_a_rotsparse_model(family, method):
    model = sparsified(family, method=method)
    buffers = {name: b.clone() for name, b in model.named_buffers() if "rotsparse" in name}
    data = random_tokens(num_sequences=4, length=32, seed=5)
    with torch.no_grad():
        before = model(data, labels=data).loss.item()
    result = recover(model, texts=data, steps=12, lr=3e-3, batch_size=4, warmup=2, progress=False)
    with torch.no_grad():
        after = model(data, labels=data).loss.item()
    assert len(result.losses) == 12 and result.tokens == 12 * 4 * 32
    assert after < before - 0.1, (before, after)
    assert result.losses[-1] < result.losses[0]
    assert not model.training
    for module in topk_sites(model):  # input-major layout survives AdamW
        assert module.weight.t().is_contiguous(), module
    assert all(torch.equal(b, dict(model.named_buffers())[name]) for name, b in buffers.items())
    assert rotsparse.plan_of(model).effective_sparsity > 0.4
    with torch.no_grad():  # decode kernel == dense-masked path after training
        tokens = random_tokens(num_sequences=1, length=6)
        output = model.generate(tokens, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        rotsparse.set_kernels(model, False)
        masked = model.generate(tokens, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(output.sequences, masked.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(output.logits, masked.logits))


def test_recovered_model_survives_save_and_load(tmp_path):
    model = sparsified("llama", method="larosa")
    data = random_tokens(num_sequences=4, length=32, seed=5)
    recover(model, texts=data, steps=5, lr=3e-3, batch_size=2, progress=False)
    tokens = random_tokens(num_sequences=2, length=16)
    with torch.no_grad():
        expected = model(tokens).logits
    rotsparse.save(model, tmp_path)
    restored = rotsparse.load(tmp_path)
    with torch.no_grad():
        actual = restored(tokens).logits
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert all(m.weight.t().is_contiguous() for m in topk_sites(restored))


def test_training_is_deterministic_with_a_seed():
    runs = []
    for _ in range(2):
        model = sparsified("llama")
        result = recover(model, texts=random_tokens(num_sequences=6, length=16, seed=5), steps=4, lr=1e-3,
                         batch_size=2, gradient_accumulation=2, seed=3, progress=False)
        runs.append((result.losses, model.model.layers[0].mlp.down_proj.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_trainable_presets_freeze_the_rest_and_restore_requires_grad():
    model = sparsified("llama")
    embed_before = model.get_input_embeddings().weight.detach().clone()
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    recover(model, texts=random_tokens(num_sequences=4, length=16), steps=2, lr=1e-2, batch_size=2,
            trainable="mlp", progress=False)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert all(p.requires_grad for p in model.parameters())
    norms = select_trainable(model, "norms")
    assert norms and all(p.ndim == 1 for p in norms)
    assert sum(p.requires_grad for p in model.parameters()) == len(norms)
    with pytest.raises(ValueError, match="unknown trainable preset"):
        select_trainable(model, "everything")
    assert set(TRAINABLE_PRESETS) >= {"all", "sparse", "mlp", "norms"}


def test_checkpoints_are_loadable_rotsparse_models(tmp_path):
    model = sparsified("llama")
    result = recover(model, texts=random_tokens(num_sequences=4, length=16), steps=4, lr=1e-3, batch_size=2,
                     checkpoint_every=2, checkpoint_dir=tmp_path, progress=False)
    assert result.checkpoints == [str(tmp_path / "step-2"), str(tmp_path / "step-4")]
    restored = rotsparse.load(tmp_path / "step-4")
    tokens = random_tokens(num_sequences=1, length=8)
    with torch.no_grad():
        assert torch.allclose(restored(tokens).logits, model(tokens).logits, atol=1e-5)


def test_learning_rate_schedule_warms_up_then_decays():
    factors = [_learning_rate_factor(s, 20, 4, "cosine", 0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] > 0.1 - 1e-9
    assert _learning_rate_factor(10, 20, 0, "constant", 0.1) == 1.0


def test_text_windows_and_bad_arguments():
    windows = training_windows(None, random_tokens(num_sequences=3, length=10), seqlen=10)
    assert windows.shape == (3, 10)
    model = sparsified("llama")
    with pytest.raises(ValueError):
        recover(model, texts=windows, steps=0, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        recover(model, texts=windows, steps=1, checkpoint_every=1, progress=False)


# --- option switches -------------------------------------------------------------------------------------------

def test_l2_rescale_restores_each_tokens_norm():
    x = torch.randn(5, 3, 32)
    x[0, 0] = 0  # an all-zero token stays zero
    sparse = sparsify_activation(x, 8, l2_rescale=True)
    assert torch.equal((sparse != 0), (keep_topk(x, 8) != 0))
    assert torch.allclose(sparse.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    ratio = sparse / keep_topk(x, 8)  # one positive scalar per token on the kept entries
    kept = keep_topk(x, 8) != 0
    for token_ratio, token_kept in zip(ratio.view(-1, 32), kept.view(-1, 32)):
        if token_kept.any():
            values = token_ratio[token_kept]
            assert torch.allclose(values, values[0].expand_as(values)) and values[0] >= 1


@pytest.mark.parametrize("block_size", [0, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_path_equals_masked_path_with_options(block_size, bias):
    module = site_linear(keep_k=20, width=64, out=24, bias=bias).eval()
    module.l2_rescale, module.block_size = True, block_size
    for seed in range(5):
        x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            kernel = module(x)
            module.use_kernel = False
            masked = module(x)
            module.use_kernel = True
        expected = F.linear(sparsify_activation(x, 20, block_size=block_size, l2_rescale=True), module.weight,
                            module.bias)
        assert torch.allclose(kernel, masked, atol=1e-5), (kernel - masked).abs().max()
        assert torch.allclose(masked, expected, atol=1e-6)
        plain = F.linear(sparsify_activation(x, 20, block_size=block_size), module.weight)
        assert not torch.allclose(masked, plain + (module.bias if bias else 0), atol=1e-3)


@pytest.mark.parametrize("keep_n,block_size", [(2, 4), (4, 8), (1, 16), (0, 4), (4, 4)])
def test_block_topk_keeps_exactly_n_per_block_of_m(keep_n, block_size):
    x = torch.randn(3, 5, 64)
    sparse = keep_topk_blocks(x, keep_n, block_size)
    blocks, kept = x.view(3, 5, -1, block_size), sparse.view(3, 5, -1, block_size)
    assert ((kept != 0).sum(-1) == keep_n).all()
    if 0 < keep_n < block_size:  # the kept ones are the block's largest |x|
        threshold = blocks.abs().topk(keep_n, dim=-1).values[..., -1:]
        assert torch.equal(kept != 0, blocks.abs() >= threshold)
        assert torch.equal(kept[kept != 0], blocks[kept != 0])
    with pytest.raises(ValueError):
        keep_topk_blocks(x, 1, 5)
    assert block_keep(32, 64, 8) == 4 and block_keep(20, 64, 8) == 2


def test_block_topk_on_a_model_keeps_n_per_block_at_every_site_and_saves(tmp_path):
    model = sparsified("llama", block_size=8)  # SparsifyConfig field, as `sparsify` passes it
    apply_topk_options(model, model.rotsparse_plan.config)  # what install_topk does once integrated
    seen = []

    def check(module, args, output):
        n = block_keep(module.keep_k, module.in_features, 8)
        kept = (sparsify_activation(args[0], module.keep_k, block_size=8) != 0).unflatten(-1, (-1, 8)).sum(-1)
        assert (kept == n).all()
        seen.append(module.site)

    handles = [m.register_forward_hook(check) for m in topk_sites(model)]
    with torch.no_grad():
        model(random_tokens(length=12))
    for handle in handles:
        handle.remove()
    assert len(set(seen)) == 4
    assert all(m.block_size == 8 for m in topk_sites(model))
    rotsparse.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rotsparse"]["config"]["block_size"] == 8


def test_squared_relu_mlp_matches_the_formula():
    model = sparsified("llama", sparsity=0.0)
    configure(model, mlp_activation="relu2")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.act_fn, SquaredReLU)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = mlp.down_proj(F.relu(mlp.gate_proj(x)) ** 2 * mlp.up_proj(x))
        assert torch.allclose(mlp(x), expected, atol=1e-6)
        gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
        formula = F.linear(F.relu(gate) ** 2 * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)
        assert torch.allclose(mlp(x), formula, atol=1e-5)
    assert model.rotsparse_plan.config.mlp_activation == "relu2"
    with pytest.raises(ValueError, match="switched back"):
        configure(model, mlp_activation=None)


def test_configure_records_options_in_the_plan_and_rejects_bad_ones(tmp_path):
    model = sparsified("llama")
    configure(model, l2_rescale=True, block_size=4)
    config = model.rotsparse_plan.config
    assert config.l2_rescale and config.block_size == 4
    assert all(m.l2_rescale and m.block_size == 4 for m in topk_sites(model))
    assert model.config.rotsparse["config"]["l2_rescale"] is True
    with pytest.raises(ValueError, match="does not divide"):
        configure(model, block_size=7)
    with pytest.raises(ValueError):
        SparsifyConfig(block_size=-1)
    with pytest.raises(ValueError):
        SparsifyConfig(mlp_activation="gelu")
    assert SparsifyConfig.from_dict(json.loads(config.to_json())) == config


def test_training_with_every_option_lowers_the_loss():
    model = sparsified("llama")
    data = random_tokens(num_sequences=4, length=32, seed=5)
    result = recover(model, texts=data, steps=12, lr=3e-3, batch_size=4, warmup=2, l2_rescale=True, block_size=8,
                     mlp_activation="relu2", progress=False)
    assert result.losses[-1] < result.losses[0] - 0.1
    assert model.rotsparse_plan.config.block_size == 8


@pytest.mark.parametrize("options", [dict(l2_rescale=True), dict(block_size=8), dict(mlp_activation="relu2")])
def test_load_restores_the_options(tmp_path, options):
    model = sparsified("llama")
    configure(model, **options)
    tokens = random_tokens(num_sequences=2, length=16)
    with torch.no_grad():
        expected = model(tokens).logits
    rotsparse.save(model, tmp_path)
    restored = rotsparse.load(tmp_path)
    assert restored.rotsparse_plan.config == model.rotsparse_plan.config
    with torch.no_grad():
        assert torch.allclose(restored(tokens).logits, expected, atol=1e-5)
