"""Per-family facts: every fold is exact on every family (fused projections and missing pre-norms included), what
each family maps its sites to, and the refusal of models the family mapping cannot read."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import rotsparse
from rotsparse.bench import weight_bytes
from rotsparse.config import AutoOptions, SparsifyConfig
from rotsparse.families import FusedLayer, RowSlice, get_family
from rotsparse.fold import fold_choices, fold_rotations, fold_scales, fold_value_rotation
from rotsparse.measure import calibrate_model
from rotsparse.io import load, save
from rotsparse.runtime import TopKExperts, TopKLinear, TopKSite, set_kernels
from rotsparse.topk import keep_topk

from tiny_models import (FAMILIES, MOE_FAMILIES, generated_and_stepwise, logits, random_tokens, relative_error,
                         tiny_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_fold_at_once_is_exact(family):
    """A distinct PCA basis per layer (residual rotations between layers, output rotations after post-norms),
    every value-head rotation and the WINA scales measured for them, folded together: the same function."""
    model = tiny_model(family, num_layers=3)
    tokens = random_tokens()
    expected = logits(model, tokens)
    config = SparsifyConfig(options=AutoOptions(rotations=("pca",), structure_check=False))
    calibration = calibrate_model(model, get_family(model), random_tokens(seed=7), None, config, progress=False)
    layers = len(calibration.layers)
    assert all(layer.value_rotations[1] is not None for layer in calibration.layers)
    fold_choices(get_family(model), calibration, [0] * layers, [1] * layers)
    assert relative_error(logits(model, tokens), expected) < 1e-4
    rotated = [m for m in model.modules() if hasattr(m, "rotsparse_output_rotation")]
    assert rotated, "no residual or output rotation was attached"


def test_phi3_sites_are_fused_linears_with_one_reader_each():
    model = tiny_model("phi3")
    layer = get_family(model).layer_views()[0]
    assert isinstance(layer, FusedLayer)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert layer.site_modules() == {"h1": [attention.qkv_proj], "h2": [attention.o_proj],
                                    "h3": [mlp.gate_up_proj], "h4": [mlp.down_proj]}
    assert layer.attention_heads() == (4, 2)
    assert isinstance(layer.v_proj, RowSlice) and layer.v_proj.out_features == 2 * 16
    assert layer.up_proj.out_features == mlp.down_proj.in_features
    rotsparse.sparsify(model, sparsity=0.5, method="topk", progress=False)
    sites = [m.site for m in model.model.layers[0].modules() if isinstance(m, TopKLinear)]
    assert sorted(sites) == ["h1", "h2", "h3", "h4"]


def test_phi3_value_rotation_and_producer_scales_touch_only_their_rows():
    model = tiny_model("phi3")
    tokens = random_tokens()
    expected = logits(model, tokens)
    family = get_family(model)
    fold_rotations(family, [None] * len(family.layers))  # pre-norm scales into the linears: unit pre-norms
    layer = family.layer_views()[0]
    qkv, gate_up = model.model.layers[0].self_attn.qkv_proj, model.model.layers[0].mlp.gate_up_proj
    qkv_before, gate_up_before = qkv.weight.detach().clone(), gate_up.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    rotations = torch.linalg.qr(torch.randn(2, 16, 16, generator=generator, dtype=torch.float64))[0]
    intermediate = model.config.intermediate_size
    scales = {"h1": torch.ones(64, dtype=torch.float64), "h3": torch.ones(64, dtype=torch.float64),
              "h2": torch.rand(2 * 16, generator=generator, dtype=torch.float64) + 0.5,
              "h4": torch.rand(intermediate, generator=generator, dtype=torch.float64) + 0.5}
    fold_value_rotation(layer, rotations)
    fold_scales(layer, scales)
    v_rows = slice(64 + 32, 128)
    assert torch.equal(qkv.weight[: 64 + 32], qkv_before[: 64 + 32])
    assert not torch.allclose(qkv.weight[v_rows], qkv_before[v_rows])
    assert torch.equal(gate_up.weight[:intermediate], gate_up_before[:intermediate])
    assert not torch.allclose(gate_up.weight[intermediate:], gate_up_before[intermediate:])
    assert relative_error(logits(model, tokens), expected) < 1e-4


def test_olmo2_has_no_pre_norms_so_no_h1_h3_scales():
    """OLMo-2's q/k/v and gate/up read the raw residual stream: no pre-norm carries a WINA scale, so ``auto``
    measures and folds none at h1/h3 (h2/h4 scales, residual and value rotations are folded as elsewhere)."""
    model = tiny_model("olmo2")
    layer = get_family(model).layer_views()[0]
    assert layer.attn_input_norm is None and layer.mlp_input_norm is None
    assert layer.attn_output_norm is not None and layer.mlp_output_norm is not None
    calibration = calibrate_model(model, get_family(model), random_tokens(seed=7), None, SparsifyConfig(),
                                  progress=False)
    for layer_calibration in calibration.layers:
        for site in ("h1", "h3"):
            assert all(torch.equal(scale, torch.ones_like(scale)) for scale in layer_calibration.scales[site])
        assert any(not torch.equal(scale, torch.ones_like(scale)) for scale in layer_calibration.scales["h4"])


@pytest.mark.parametrize("family", ["qwen3", "smollm3", "olmo2", "phi3"])
def test_generate_equals_step_by_step_decoding_without_cache(family):
    """Greedy `generate` (KV cache, decode kernels) equals the same sparse model run step by step on the whole
    sequence without a cache."""
    model = rotsparse.sparsify(tiny_model(family), sparsity=0.5, calibration=random_tokens(seed=3),
                               progress=False)
    generated, stepwise = generated_and_stepwise(model)
    assert torch.equal(generated, stepwise)


def test_a_model_the_family_mapping_cannot_read_is_refused_with_what_is_missing(monkeypatch):
    from rotsparse import families

    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    model = tiny_model("phi3")
    families.register_family(families.FamilySpec(model_types=("phi3",)))  # Llama paths: q_proj, gate_proj, ...
    with pytest.raises(NotImplementedError, match=r"q linear 'self_attn.q_proj' \(no such module\)") as error:
        rotsparse.sparsify(model, sparsity=0.5, method="topk", progress=False)
    assert "gate linear 'mlp.gate_proj'" in str(error.value)


# --------------------------------------------------------------------------
# mixtures of experts: Top-K at the attention's and every expert's inputs (``topk`` only)
# --------------------------------------------------------------------------


def moe_sparsified(family: str, sparsity: float = 0.5):
    return rotsparse.sparsify(tiny_model(family), sparsity=sparsity, method="topk", progress=False)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_sparsity_zero_is_invariant(family):
    model = tiny_model(family)
    tokens = random_tokens()
    expected = logits(model, tokens)
    rotsparse.sparsify(model, sparsity=0.0, method="topk", progress=False)
    assert any(isinstance(m, TopKExperts) for m in model.modules())
    assert relative_error(logits(model, tokens), expected) < 1e-4


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_every_site_and_every_expert_input_keeps_exactly_k(family):
    model = moe_sparsified(family)
    plan = model.rotsparse_plan
    assert abs(plan.effective_sparsity - 0.5) < 0.05
    seen = []

    def check(module, args, output):
        kept = (output != 0).sum(-1) if isinstance(module, TopKSite) else (keep_topk(args[0], module.keep_k) != 0).sum(-1)
        expected = (args[0] != 0).sum(-1).clamp(max=module.keep_k)  # all-zero rows: the padding embedding
        assert bool((kept == expected).all()), f"{module.site}: kept {kept.unique().tolist()}"
        assert bool((expected == module.keep_k).float().mean() > 0.9)
        assert 0 < module.keep_k < module.in_features
        seen.append((type(module).__name__, module.site))

    handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, (TopKLinear, TopKSite))]
    logits(model, random_tokens(length=16))
    for handle in handles:
        handle.remove()
    assert {("TopKLinear", "h1"), ("TopKLinear", "h2"), ("TopKSite", "h3"), ("TopKSite", "h4")} <= set(seen)
    experts = [m for m in model.modules() if isinstance(m, TopKExperts)]
    assert experts and all(m.hidden_topk.keep_k == plan.keep_k[0][3] for m in experts)
    if family == "qwen3_moe":  # its dense last layer: plain TopKLinears at gate/up/down
        assert ("TopKLinear", "h3") in seen and ("TopKLinear", "h4") in seen


def assert_experts_input_major(model) -> list[TopKExperts]:
    """Every `TopKExperts` holds its weights with the HF shapes as transpose views of contiguous (E, d, 2I) /
    (E, I, d) tensors; returns them."""
    experts = [m for m in model.modules() if isinstance(m, TopKExperts)]
    assert experts
    for module in experts:
        count, double_intermediate, hidden = module.gate_up_proj.shape
        assert module.down_proj.shape == (count, hidden, double_intermediate // 2)
        assert module.gate_up_proj.transpose(-2, -1).is_contiguous()
        assert module.down_proj.transpose(-2, -1).is_contiguous()
    return experts


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_save_load_round_trip_and_generation(tmp_path, family):
    model = moe_sparsified(family)
    dense_shapes = {k: v.shape for k, v in tiny_model(family).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == dense_shapes  # HF keys and shapes
    tokens = random_tokens(num_sequences=2, length=16)
    expected = logits(model, tokens)
    save(model, tmp_path)
    for restored in (load(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert torch.allclose(logits(restored, tokens), expected, atol=1e-5, rtol=1e-5)
        assert restored.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(value, restored.state_dict()[key]) for key, value in model.state_dict().items())
        assert restored.rotsparse_plan == model.rotsparse_plan
        assert_experts_input_major(restored)
    generated, stepwise = generated_and_stepwise(model)
    assert torch.equal(generated, stepwise)
    assert torch.equal(generated_and_stepwise(restored)[0], generated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_decode_step_equals_the_masked_path_and_reads_k_inputs(family, dtype):
    """A single-token step runs the expert kernels (input Top-K once, per routed expert index_gemv and the
    hidden Top-K GEMV): the same output as the dense-masked path, which depends on exactly K inputs."""
    torch.manual_seed(0)
    model = moe_sparsified(family).to(dtype)
    for experts in assert_experts_input_major(model):
        width = experts.input_topk.in_features
        x = torch.randn(1, width, dtype=dtype)
        routed = torch.randperm(experts.num_experts)[:2].view(1, 2)
        weights = torch.softmax(torch.randn(1, 2), dim=-1).to(dtype)
        with torch.no_grad():
            assert experts._is_decode_step(x)
            decoded = experts(x, routed, weights)
            set_kernels(model, False)
            assert not experts._is_decode_step(x)
            masked = experts(x, routed, weights)
            outside = keep_topk(x, experts.input_topk.keep_k) == 0  # the inputs outside the Top-K
            assert int((~outside).sum()) == experts.input_topk.keep_k
            changed = experts(torch.where(outside, 1e-3 * torch.randn_like(x), x), routed, weights)
            set_kernels(model, True)
            changed_decoded = experts(torch.where(outside, 1e-3 * torch.randn_like(x), x), routed, weights)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(decoded, masked, atol=tolerance * float(masked.abs().max()), rtol=tolerance)
        torch.testing.assert_close(changed, masked, atol=0, rtol=0)  # smaller entries outside keep the same Top-K
        torch.testing.assert_close(changed_decoded, decoded, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["auto", "larosa"])
def test_moe_calibrated_methods_are_refused_with_the_reason(method):
    with pytest.raises(NotImplementedError, match="mixture-of-experts.*use method='topk'"):
        rotsparse.sparsify(tiny_model("mixtral"), sparsity=0.5, method=method, calibration=random_tokens(seed=7),
                           progress=False)


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe"])
def test_squared_relu_reaches_fused_and_expert_mlps(family):
    from rotsparse.runtime import SquaredReLU

    model = rotsparse.sparsify(tiny_model(family), sparsity=0.5, method="topk", mlp_activation="relu2",
                               progress=False)
    activations = [layer.mlp_activation for layer in get_family(model).layer_views()]
    assert activations and all(isinstance(activation, SquaredReLU) for activation in activations)
    assert torch.isfinite(logits(model, random_tokens(length=16))).all()


@pytest.mark.parametrize("family", ["phi3", "olmo2"])
def test_relative_error_scaling_reads_the_producer_rows(family):
    """Unweighted (relative-error) scaling scales the h2/h4 producers' rows inside the h1/h3 readers while
    measuring: for Phi-3 the v rows of qkv_proj and the up half of gate_up_proj. Exact at sparsity 0."""
    model = tiny_model(family)
    tokens = random_tokens()
    expected = logits(model, tokens)
    options = AutoOptions(rotations=("identity", "pca"), loss_weighted=False, value_rotation=False,
                          structure_check=False)
    rotsparse.sparsify(model, sparsity=0.0, options=options, calibration=random_tokens(seed=7), progress=False)
    assert relative_error(logits(model, tokens), expected) < 1e-4
    sparse = rotsparse.sparsify(tiny_model(family), sparsity=0.5, options=options, calibration=random_tokens(seed=7),
                                progress=False)
    assert abs(sparse.rotsparse_plan.effective_sparsity - 0.5) < 0.02


def test_moe_experts_without_batched_weights_are_refused_with_what_is_missing():
    """transformers 4.x keeps experts as a list of linears: the family names the batched weights it lacks."""
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(4)])
    with pytest.raises(NotImplementedError, match="experts 'mlp.experts' without gate_up_proj; .* without down_proj"):
        rotsparse.sparsify(model, sparsity=0.5, method="topk", progress=False)


def test_decode_bytes_count_the_routed_experts_at_their_sites_k():
    """`weight_bytes`: an MoE layer reads its linears and the `num_experts_per_tok` experts a token is routed to,
    whose sites read K/in of their rows when sparsified (equal bytes at sparsity 0)."""
    dense = tiny_model("qwen3_moe")
    experts = dense.model.layers[0].mlp.experts
    active = dense.config.num_experts_per_tok
    linears = sum(module.weight.numel() * 4 for module in dense.model.layers.modules()
                  if isinstance(module, torch.nn.Linear))
    routed = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4 * active
    assert weight_bytes(dense)["layers"] == linears + routed
    unchanged = rotsparse.sparsify(tiny_model("qwen3_moe"), sparsity=0.0, method="topk", progress=False)
    assert weight_bytes(unchanged) == weight_bytes(dense)
    sparse = rotsparse.sparsify(tiny_model("qwen3_moe"), sparsity=0.5, method="topk", progress=False)
    sparse_experts = sparse.model.layers[0].mlp.experts
    assert isinstance(sparse_experts, TopKExperts)
    kept = (experts.gate_up_proj[0].numel() * sparse_experts.input_topk.keep_k / sparse_experts.input_topk.in_features
            + experts.down_proj[0].numel() * sparse_experts.hidden_topk.keep_k / sparse_experts.hidden_topk.in_features)
    sparse_linears = sum(module.weight.numel() * 4 * module.keep_k / module.in_features
                         for module in sparse.model.layers.modules() if isinstance(module, TopKLinear))
    assert weight_bytes(sparse)["layers"] == pytest.approx(sparse_linears + kept * 4 * active)
