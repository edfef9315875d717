"""Mathematical facts of the ``auto`` method: exact folding of scales and rotations, error curves, budget."""

import logging
import re

import pytest
import torch

import rotsparse
from rotsparse.api import calibrate
from rotsparse.budget import allocate_by_error
from rotsparse.choose import choose, choose_value_rotations
from rotsparse.config import (IN_DOMAIN_ROTATIONS, ROTATION_CANDIDATES, SITES, AutoOptions, SparsifyConfig,
                              run_length)
from rotsparse.families import get_family
from rotsparse.fold import fold_rotations, fold_scales, fold_value_rotation
from rotsparse.measure import Calibration, LayerCalibration
from rotsparse.plan import site_sizes_for
from rotsparse.rotation import (column_scale, expand_head_scale, grouped_head_scale, head_block_rotation,
                                topk_error_curve)
from rotsparse.runtime import ROTATION_BUFFER, TopKLinear
from rotsparse.topk import keep_topk

from tiny_models import FAMILIES, logits, random_tokens, relative_error, tiny_model


ALL_CANDIDATES = ROTATION_CANDIDATES[:-1] + ("run2",)  # "run<G>" stands for any G


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rotations", [("identity",), ("pca",), ("pca_sink",), ("pca_scaled",), ("global",), ("run2",),
                                       ("identity", "pca"), ("identity", "global", "pca"), ("identity", "run2")])
def test_auto_folding_is_exact_at_sparsity_zero(family, rotations):
    """Scales and every kind of rotation (forced, so folding is really exercised) leave the function unchanged."""
    model = tiny_model(family, num_layers=3)
    tokens = random_tokens()
    expected = logits(model, tokens)
    calibrated = calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64),
                           options=AutoOptions(rotations=ALL_CANDIDATES),
                           progress=False).restricted(AutoOptions(rotations=rotations))
    if len(rotations) == 1 and rotations[0] != "identity":
        assert all(layer.rotations[0] is not None for layer in calibrated.layers)
    rotsparse.sparsify(model, sparsity=0.0, calibrated=calibrated, progress=False)
    assert relative_error(logits(model, tokens), expected) < 1e-4
    assert model.rotsparse_plan.effective_sparsity == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_scales_change_the_weights_and_select_by_weighted_magnitude(family):
    model = tiny_model(family)
    tokens = random_tokens()
    expected = logits(model, tokens)
    adapter = get_family(model)
    layer = adapter.layer_views()[0]
    qkv_before = torch.cat([linear.weight.detach().clone() for linear in layer.qkv])
    fold_rotations(adapter, [None] * len(adapter.layers))
    wina = column_scale([linear.weight for linear in layer.qkv])  # before scaling: not unit
    assert relative_error(wina, torch.ones_like(wina)) > 0.1
    for layer_adapter in adapter.layer_views():
        fold_scales(layer_adapter)
    assert relative_error(logits(model, tokens), expected) < 1e-4
    if layer.attn_input_norm is None:  # OLMo-2: no pre-norm to carry an h1 scale; q/k keep their columns
        assert all(torch.equal(after.weight, before) for after, before in zip(layer.qkv[:2], qkv_before.split(
            [linear.out_features for linear in layer.qkv])[:2]))
        return
    qkv_after = torch.cat([linear.weight.detach() for linear in layer.qkv])
    assert relative_error(qkv_after, qkv_before) > 0.1
    # the folded readers have unit columns and the norm now multiplies by the WINA scale
    assert torch.allclose(column_scale([linear.weight for linear in layer.qkv]), torch.ones_like(wina), atol=1e-5)
    assert relative_error(layer.norm_scale(layer.attn_input_norm).double(), torch.ones_like(wina)) > 0.1
    assert not any(hasattr(m, ROTATION_BUFFER) for m in model.modules()), "identity needs no adapters"


def test_head_scales_are_shared_within_groups():
    scale = torch.rand(4 * 3, dtype=torch.float64) + 0.1  # 4 heads of dim 3, 2 kv heads
    shared = grouped_head_scale(scale, 4, 2)
    assert shared.shape == (6,)
    assert torch.allclose(shared[:3], scale.view(4, 3)[:2].pow(2).mean(0).sqrt())
    expanded = expand_head_scale(shared, 4, 2)
    assert torch.equal(expanded.view(4, 3)[0], expanded.view(4, 3)[1])
    assert torch.equal(expanded.view(4, 3)[2], shared[3:])


def test_error_curve_matches_brute_force_topk():
    torch.manual_seed(0)
    inputs = torch.randn(10, 8, dtype=torch.float64)
    weight = torch.randn(5, 8, dtype=torch.float64)
    dense = (inputs @ weight.T).pow(2).sum()
    brute = torch.stack([((inputs - keep_topk(inputs, k)) @ weight.T).pow(2).sum() / dense for k in range(9)])
    exact = topk_error_curve(inputs, weight, points=8, chunk_elements=100)
    assert torch.allclose(exact, brute, rtol=1e-5, atol=1e-6)
    coarse = topk_error_curve(inputs, weight, points=4)
    assert torch.allclose(coarse[::2], brute[::2], rtol=1e-5, atol=1e-6)
    assert torch.allclose(coarse[1::2], (brute[:-1:2] + brute[2::2])[: 4] / 2, rtol=1e-5, atol=1e-6)
    assert exact[0] == 1.0 and exact[-1] == 0.0


def test_error_allocation_meets_the_budget_and_follows_the_errors():
    sizes = ((100, 10000), (50, 5000), (100, 20000), (200, 20000))
    keep = torch.arange(101, dtype=torch.float64)
    cheap = (1 - keep / 100).pow(4)  # a site that loses little when sparse
    costly = 1 - keep / 100
    curves = [[costly, (1 - torch.arange(51.0, dtype=torch.float64) / 50), cheap,
               (1 - torch.arange(201.0, dtype=torch.float64) / 200)]] * 2
    keep_k, price = allocate_by_error(curves, [sizes] * 2, 0.5)
    assert price > 0
    total = 2 * sum(p for _, p in sizes)
    kept = sum(k * p / w for layer in keep_k for k, (w, p) in zip(layer, sizes))
    assert 0.5 <= 1 - kept / total <= 0.5 + max(p / w for w, p in sizes) / total
    assert keep_k[0][2] < keep_k[0][0], "the site with the cheaper error curve must be sparser"


def test_a_rotation_must_pay_for_the_weights_it_adds():
    """Two layers whose own rotations lower the h1/h3 error a little (5%) or a lot (60%). Any rotation but
    none needs one residual adapter (the embeddings and the head are folded for free). Charged for it at the
    allocation's price, only the large gain keeps its rotations; uncharged, both do."""
    sizes = (((100, 10000),), ((100, 10000),), ((100, 40000),), ((100, 40000),))  # one reader linear per site
    base = (1 - torch.arange(101, dtype=torch.float64) / 100)[None]
    for gain, charged in ((0.95, [0, 0]), (0.4, [1, 1])):
        layers = []
        for _ in range(2):
            curves = {"h1": [base, gain * base], "h2": [base], "h3": [base, gain * base], "h4": [base]}
            layers.append(LayerCalibration([None, torch.eye(4, dtype=torch.float64)], curves, {},
                                           residual_rotation_weights=10000))
        for charge, expected in ((True, charged), (False, [1, 1])):
            calibration = Calibration("auto", AutoOptions(charge_rotations=charge), layers, 0, 0.0, 0.0)
            choice, keep_k = choose(calibration, [sizes] * 2, 0.5, (1.0,) * 4)
            assert choice == expected, (gain, charge)


def test_adapters_are_paid_only_where_neighbouring_bases_differ():
    """Four layers with candidates (identity, one shared basis, their own basis): each own basis is a little
    better than the shared one, which is much better than identity. Charged, the chain keeps the shared
    basis everywhere (no adapter at all) rather than paying an adapter at every switch; uncharged, every
    layer takes its own basis. Output rotations (post-norms) are paid by every rotated layer."""
    sizes = (((100, 10000),), ((100, 10000),), ((100, 40000),), ((100, 40000),))
    base = (1 - torch.arange(101, dtype=torch.float64) / 100)[None]
    shared = torch.eye(4, dtype=torch.float64)

    def layers(output_rotation_weights: int) -> list[LayerCalibration]:
        result = []
        for _ in range(4):
            curves = {"h1": [base, 0.5 * base, 0.48 * base], "h2": [base], "h3": [base, 0.5 * base, 0.48 * base],
                      "h4": [base]}
            result.append(LayerCalibration([None, shared, torch.eye(4, dtype=torch.float64)], curves, {},
                                           residual_rotation_weights=10000, output_rotation_weights=output_rotation_weights))
        return result

    for charge, output_weights, expected in ((True, 0, [1] * 4), (False, 0, [2] * 4), (True, 10**6, [0] * 4)):
        calibration = Calibration("auto", AutoOptions(charge_rotations=charge), layers(output_weights), 0, 0.0, 0.0)
        choice, _ = choose(calibration, [sizes] * 4, 0.5, (1.0,) * 4)
        assert choice == expected, (charge, output_weights)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "olmo2", "phi3"])
def test_one_shared_basis_needs_no_residual_adapters(family, tmp_path):
    """All layers in the global basis: exact at sparsity 0, rotated, no adapter between layers (Gemma-3 keeps
    its output rotations after the post-norms), and it saves and loads (with or without rotation tensors)."""
    model = tiny_model(family, num_layers=3)
    tokens = random_tokens()
    expected = logits(model, tokens)
    calibrated = calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64),
                           options=AutoOptions(rotations=IN_DOMAIN_ROTATIONS),
                           progress=False).restricted(AutoOptions(rotations=("global",)))
    shared = calibrated.layers[0].rotations[0]
    assert shared is not None and all(layer.rotations[0] is shared for layer in calibrated.layers)
    assert torch.allclose(shared.T @ shared, torch.eye(shared.shape[0], dtype=torch.float64), atol=1e-10)
    rotsparse.sparsify(model, sparsity=0.0, calibrated=calibrated, progress=False)
    assert relative_error(logits(model, tokens), expected) < 1e-4
    assert model.rotsparse_plan.rotated
    layers = get_family(model).layers
    assert not any(hasattr(layer, ROTATION_BUFFER) for layer in layers)
    output_rotations = sum(hasattr(m, ROTATION_BUFFER) for m in model.modules())
    assert output_rotations == (2 * len(layers) if family in ("gemma3_text", "olmo2") else 0)  # post-norms
    rotsparse.save(model, tmp_path / "sparse")
    loaded = rotsparse.load(tmp_path / "sparse")
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
    assert torch.allclose(logits(loaded, tokens), logits(model, tokens), atol=1e-5, rtol=1e-5)  # eager vs sdpa


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_auto_is_the_default_and_hits_the_requested_sparsity(family, sparsity):
    model = tiny_model(family, num_layers=3)
    rotsparse.sparsify(model, sparsity=sparsity, calibration=random_tokens(seed=7), progress=False)
    plan = model.rotsparse_plan
    assert plan.config.method == "auto"
    total = sum(params for layer in plan.site_sizes for _, params in layer)
    one_column_per_site = sum(params / width for layer in plan.site_sizes for width, params in layer) / total
    assert sparsity <= plan.effective_sparsity <= sparsity + one_column_per_site
    sites = {m.site for m in model.modules() if isinstance(m, TopKLinear)}
    assert sites == set(SITES)


def test_explicit_coefficients_override_the_error_allocation():
    model = tiny_model("llama", num_layers=2)
    rotsparse.sparsify(model, sparsity=0.5, site_coefficients=(1, 1, 1, 1), calibration=random_tokens(seed=7),
                       progress=False)
    widths = [[w for w, _ in layer] for layer in model.rotsparse_plan.site_sizes]
    assert model.rotsparse_plan.keep_k == tuple(tuple(w // 2 for w in layer) for layer in widths)


def test_one_calibration_serves_every_sparsity():
    model = tiny_model("qwen2")
    calibrated = calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64),
                           progress=False)
    first = rotsparse.sparsify(tiny_model("qwen2"), sparsity=0.4, error_tokens=64, calibrated=calibrated,
                               progress=False)
    second = rotsparse.sparsify(tiny_model("qwen2"), sparsity=0.4, calibration=random_tokens(seed=7),
                                error_tokens=64, progress=False)
    assert first.rotsparse_plan == second.rotsparse_plan
    tokens = random_tokens()
    assert torch.allclose(logits(first, tokens), logits(second, tokens), atol=1e-6)
    with pytest.raises(ValueError, match="calibrated for method"):
        rotsparse.sparsify(tiny_model("qwen2"), sparsity=0.4, method="larosa", calibrated=calibrated)
    assert site_sizes_for(get_family(model)) == first.rotsparse_plan.site_sizes


def test_error_curve_of_a_wide_reader_matches_brute_force():
    """A reader with more outputs than inputs is replaced by a square factor of its Gram matrix: same errors."""
    torch.manual_seed(0)
    inputs = torch.randn(12, 8, dtype=torch.float64)
    weight = torch.randn(30, 8, dtype=torch.float64)
    brute = torch.stack([((inputs - keep_topk(inputs, k)) @ weight.T).pow(2).sum() / len(inputs) for k in range(9)])
    absolute = topk_error_curve(inputs, weight, points=8, relative=False)
    assert torch.allclose(absolute, brute, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "olmo2"])
def test_loss_sensitivity_is_the_squared_loss_gradient_of_each_output(family):
    """Checked against an independent route: a zero perturbation added to one linear's output, differentiated.
    Fisher = mean over real tokens of squared gradients per output; token energy = per-token sum over outputs."""
    from rotsparse.moments import loss_sensitivity

    model = tiny_model(family)
    tokens = random_tokens(num_sequences=3, length=16)
    mask = torch.ones_like(tokens)
    mask[1, 12:] = 0  # padding does not count
    adapter = get_family(model)
    sensitivity = loss_sensitivity(model, adapter, tokens, mask, progress=False, max_sequences=2)
    assert sensitivity.sequences == 2 and len(sensitivity.fisher) == len(adapter.layers)
    assert [len(sensitivity.fisher[0][site]) for site in SITES] == [3, 1, 2, 1]
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients are kept"

    linear = adapter.layer_views()[1].gate_up[1]
    squares, count, energy = torch.zeros(linear.out_features, dtype=torch.float64), 0, torch.zeros(2, 16)
    for row in range(2):
        delta = torch.zeros(1, 16, linear.out_features, requires_grad=True)
        handle = linear.register_forward_hook(lambda module, args, output: output + delta)
        logits = model(tokens[row : row + 1], attention_mask=mask[row : row + 1]).logits
        handle.remove()
        targets = tokens[row : row + 1, 1:].masked_fill(mask[row : row + 1, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0], ignore_index=-100, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        real = mask[row].bool()
        squares += grad[0][real].double().pow(2).sum(0)
        energy[row] = grad[0].pow(2).sum(-1) * real
        count += int(real.sum())
    assert torch.allclose(sensitivity.fisher[1]["h3"][1], squares / count, rtol=1e-4, atol=1e-12)
    assert sensitivity.fisher[1]["h3"][1].sum() > 0
    assert sensitivity.token_energy[1]["h3"][1].shape == (2, 16)
    assert torch.allclose(sensitivity.token_energy[1]["h3"][1].float(), energy, rtol=1e-4, atol=1e-12)
    assert (sensitivity.token_energy[1]["h3"][1][1, 12:] == 0).all()


def test_loss_weighted_error_curves_weigh_every_token_and_output_of_every_reader():
    """curve_r(K) = mean_t a_rt * sum_i (f_ri / sum f_r) * (W_r r_t(K))_i^2: a_rt the token's gradient
    energy at reader r, f_r its Fisher, r_t(K) what Top-K drops from row t (checked at the exact grid points)."""
    from rotsparse.measure import _calibrate_layer

    layer_adapter = get_family(tiny_model("llama")).layer_views()[0]
    modules = layer_adapter.site_modules()
    torch.manual_seed(0)
    rows = {site: torch.randn(40, modules[site][0].in_features, dtype=torch.float64) for site in SITES}
    fisher = {site: [torch.rand(m.out_features, dtype=torch.float64) for m in readers] for site, readers in modules.items()}
    token_weights = {site: [torch.rand(40, dtype=torch.float64) for _ in readers] for site, readers in modules.items()}
    result = _calibrate_layer(layer_adapter, torch.eye(rows["h1"].shape[1], dtype=torch.float64), rows,
                              AutoOptions(rotations=("identity",), scaling=False), (fisher, token_weights))
    norm_scale = layer_adapter.norm_scale(layer_adapter.attn_input_norm).double()
    for site in ("h1", "h4"):
        width = rows[site].shape[1]
        for k in torch.unique(torch.linspace(0, width, 33).round().long()).tolist():
            dropped = rows[site] - keep_topk(rows[site], k)
            assert result.curves[site][0].shape == (len(modules[site]), width + 1)
            for reader, (f, a, module) in enumerate(zip(fisher[site], token_weights[site], modules[site])):
                weight = module.weight.double() * (norm_scale if site == "h1" else 1.0)
                brute = (a[:, None] * f / f.sum() * (dropped @ weight.T).pow(2)).sum() / len(dropped)
                assert torch.isclose(result.curves[site][0][reader, k], brute, rtol=1e-4), (site, reader, k)


def test_loss_weighted_calibration_folds_its_own_scales_exactly():
    model = tiny_model("qwen2", num_layers=3)
    tokens = random_tokens()
    expected = logits(model, tokens)
    calibrated = calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64),
                           progress=False)
    assert calibrated.options.loss_weighted
    layer = calibrated.layers[0]
    assert len(layer.scales["h1"]) == len(layer.rotations)
    assert len(layer.scales["h2"]) == len(layer.value_rotations) == 2
    # absolute (loss-unit) errors: decreasing to 0, not normalised to 1 at K = 0
    curve = layer.curves["h3"][0].sum(0)  # the site: gate + up
    assert curve[-1] == 0 and curve[0] > 0 and not torch.isclose(curve[0], torch.tensor(1.0, dtype=torch.float64))
    rotsparse.sparsify(model, sparsity=0.0, calibrated=calibrated, progress=False)
    assert relative_error(logits(model, tokens), expected) < 1e-4


def _random_head_rotations(kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))[0]
                        for _ in range(kv_heads)])


def test_head_block_rotation_follows_the_gqa_grouping():
    rotations = _random_head_rotations(2, 3, seed=0)
    block = head_block_rotation(rotations, num_heads=4)  # heads 0, 1 read value head 0; heads 2, 3 value head 1
    assert block.shape == (12, 12)
    for head, value_head in enumerate((0, 0, 1, 1)):
        assert torch.equal(block[3 * head : 3 * head + 3, 3 * head : 3 * head + 3], rotations[value_head])
    assert torch.allclose(block.T @ block, torch.eye(12, dtype=torch.float64))
    assert torch.equal(head_block_rotation(rotations, num_heads=2), torch.block_diag(*rotations))
    with pytest.raises(ValueError, match="cannot share"):
        head_block_rotation(rotations, num_heads=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_value_rotation_folding_is_exact(family):
    """Any orthogonal matrix per value head, folded into v_proj's rows (and bias) and o_proj's columns, leaves
    the function unchanged (GQA: query heads sharing a value head share its rotation); the weights change."""
    model = tiny_model(family)
    tokens = random_tokens()
    expected = logits(model, tokens)
    layers = get_family(model).layer_views()
    v_before = layers[0].v_proj.weight.detach().clone()  # Phi-3: the v rows of qkv_proj
    for index, layer in enumerate(layers):
        fold_value_rotation(layer, _random_head_rotations(2, layer.o_proj.in_features // 4, seed=index))
    assert relative_error(logits(model, tokens), expected) < 1e-4
    assert relative_error(layers[0].v_proj.weight.detach(), v_before) > 0.1
    with pytest.raises(ValueError, match="value heads"):
        fold_value_rotation(layers[0], _random_head_rotations(3, layers[0].o_proj.in_features // 4, seed=0))


def test_k_is_allocated_per_reader_linear_where_the_readers_differ():
    """h1 read by three linears whose errors differ (q costly, k cheap, v in between), h3 by two: with
    `per_reader`, the cheap reader is sparser than the costly one at the same budget (parameter-weighted over
    reader linears, within one column each) and the summed error is lower; without, a site's readers share K."""
    keep = torch.arange(101, dtype=torch.float64)
    costly, middle, cheap = 1 - keep / 100, (1 - keep / 100).pow(2), (1 - keep / 100).pow(6)
    sizes = (((100, 10000), (100, 2500), (100, 2500)), ((100, 10000),), ((100, 20000), (100, 20000)),
             ((100, 40000),))
    curves = {"h1": [torch.stack([costly, cheap, middle])], "h2": [costly[None]], "h3": [torch.stack([cheap, costly])],
              "h4": [costly[None]]}
    layers = [LayerCalibration([None], curves, {})] * 2
    total = 2 * sum(params for site in sizes for _, params in site)
    summed_error = {}
    for per_reader in (True, False):
        calibration = Calibration("auto", AutoOptions(per_reader=per_reader), layers, 0, 0.0, 0.0)
        _, keep_k = choose(calibration, [sizes] * 2, 0.5, (1.0,) * 4)
        assert [len(site) for site in keep_k[0]] == [3, 1, 2, 1]
        kept = sum(k * params / width for layer_k in keep_k for site_k, site in zip(layer_k, sizes)
                   for k, (width, params) in zip(site_k, site))
        assert 0.5 <= 1 - kept / total <= 0.5 + 2 * 7 * 400 / total
        summed_error[per_reader] = sum(float(curve[k]) for layer_k in keep_k for site, site_k in zip(SITES, layer_k)
                                       for curve, k in zip(curves[site][0], site_k))
        h1, h3 = keep_k[0][0], keep_k[0][2]
        if per_reader:
            assert h1[1] < h1[2] < h1[0] and h3[0] < h3[1], keep_k[0]
        else:
            assert len(set(h1)) == 1 and len(set(h3)) == 1
    assert summed_error[True] < summed_error[False]


def test_sparsify_installs_the_k_of_every_reader_linear_and_it_survives_save_and_load(tmp_path):
    """``auto`` (GQA model: q and k/v differ in size) plans a K per reader linear; every TopKLinear keeps its
    own, the plan's effective sparsity counts them, and save/load restores them with the same function."""
    from rotsparse.io import load, save

    model = tiny_model("qwen2", num_layers=3)
    calibrated = calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64),
                           progress=False)
    rotsparse.sparsify(model, sparsity=0.5, calibrated=calibrated, progress=False)
    plan = model.rotsparse_plan
    installed, kept, total = [], 0, 0
    for layer_adapter in get_family(model).layer_views():
        modules = layer_adapter.site_modules()
        installed.append(tuple(tuple(module.keep_k for module in modules[site]) for site in SITES))
        for module in (m for site in SITES for m in modules[site]):
            assert isinstance(module, TopKLinear)
            kept += module.keep_k * module.out_features
            total += module.in_features * module.out_features
    assert tuple(installed) == plan.reader_keep_k
    assert [len(site) for site in plan.reader_keep_k[0]] == [3, 1, 2, 1]
    assert abs(plan.effective_sparsity - (1 - kept / total)) < 1e-12
    assert abs(plan.effective_sparsity - 0.5) < 0.05
    tokens = random_tokens(num_sequences=2, length=16)
    expected = logits(model, tokens)
    save(model, tmp_path)
    restored = load(tmp_path)
    assert restored.rotsparse_plan == plan
    assert torch.allclose(logits(restored, tokens), expected, atol=1e-5, rtol=1e-5)
    for layer_adapter, layer_k in zip(get_family(restored).layer_views(), plan.reader_keep_k):
        modules = layer_adapter.site_modules()
        assert tuple(tuple(m.keep_k for m in modules[site]) for site in SITES) == layer_k


def test_value_rotation_is_taken_where_its_h2_error_is_lower():
    """Value rotations are free: the allocation sees, per K, the smaller of the two h2 errors, and each layer
    takes the candidate that is better at its allocated K (here: the rotation wins only when sparse)."""
    sizes = (((100, 10000),), ((100, 10000),), ((100, 40000),), ((100, 40000),))
    base = (1 - torch.arange(101, dtype=torch.float64) / 100)[None]
    sparse_winner = torch.where(torch.arange(101) < 50, 0.1 * base, 2 * base)
    layer = LayerCalibration([None], {"h1": [base], "h2": [base, sparse_winner], "h3": [base], "h4": [base]}, {},
                             value_rotations=[None, torch.eye(4, dtype=torch.float64)])
    assert choose_value_rotations([layer, layer], (((100,), (30,), (100,), (100,)),
                                                   ((100,), (70,), (100,), (100,)))) == [1, 0]
    calibration = Calibration("auto", AutoOptions(), [layer] * 2, 0, 0.0, 0.0)
    _, keep_k = choose(calibration, [sizes] * 2, 0.5, (1.0,) * 4)
    assert all(layer_k[1][0] < 50 for layer_k in keep_k), "the cheap rotated h2 curve must draw sparsity to h2"
    assert choose_value_rotations([layer] * 2, keep_k) == [1, 1]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_calibration_offers_a_pca_rotation_of_every_value_head(family):
    model = tiny_model(family)
    calibrated = calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64),
                           progress=False)
    head_dim = get_family(model).layer_views()[0].o_proj.in_features // 4
    for layer in calibrated.layers:
        assert layer.value_rotations[0] is None and layer.value_rotations[1].shape == (2, head_dim, head_dim)
        for rotation in layer.value_rotations[1]:
            assert torch.allclose(rotation.T @ rotation, torch.eye(head_dim, dtype=torch.float64), atol=1e-10)
        assert len(layer.curves["h2"]) == len(layer.scales["h2"]) == 2
    without = calibrated.restricted(AutoOptions(value_rotation=False))
    assert all(layer.value_rotations == [None] and len(layer.curves["h2"]) == 1 for layer in without.layers)
    with pytest.raises(ValueError, match="not a restriction"):
        without.restricted(AutoOptions())
    with pytest.raises(ValueError, match="loss_weighted"):
        AutoOptions(loss_weighted=False)
    sparse = rotsparse.sparsify(model, sparsity=0.5, calibrated=calibrated, progress=False)
    assert abs(sparse.rotsparse_plan.effective_sparsity - 0.5) < 0.05


def test_run_bases_are_shared_within_runs_of_layers():
    """run<G>: one orthogonal basis object per run of G consecutive layers, so adapters sit only between runs;
    a run's layers pay no adapter between them (`_choose_rotations` compares objects)."""
    model = tiny_model("llama", num_layers=5)
    calibrated = calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64),
                           options=AutoOptions(rotations=("identity", "run2", "run5")), progress=False)
    run2 = [layer.rotations[1] for layer in calibrated.layers]
    run5 = [layer.rotations[2] for layer in calibrated.layers]
    assert run2[0] is run2[1] and run2[2] is run2[3] and run2[1] is not run2[2] and run2[3] is not run2[4]
    assert all(basis is run5[0] for basis in run5)
    for basis in (run2[0], run2[2], run2[4], run5[0]):
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-10)
    assert run_length("run12") == 12 and run_length("pca") is None
    for bad in (("run1",), ("run",), ("runs5",), ("identity", "identity"), ()):
        with pytest.raises(ValueError, match="rotation candidates"):
            AutoOptions(rotations=bad)


def test_structure_check_holds_out_sequences_and_takes_the_lowest_check_loss():
    """The last check_sequences rows are held out of calibration; every structure is scored on them, the plan
    records the scores, and the chosen bases belong to the structure with the lowest check loss."""
    tokens = random_tokens(num_sequences=5, seed=7)
    model = tiny_model("llama", num_layers=4)
    calibrated = calibrate(model, calibration=tokens, config=SparsifyConfig(error_tokens=64), progress=False,
                           options=AutoOptions(rotations=IN_DOMAIN_ROTATIONS))
    assert torch.equal(calibrated.check_input_ids, tokens[3:])
    assert calibrated.tokens == 3 * tokens.shape[1]
    structures = calibrated.structures()
    assert list(structures) == ["chooser", "run5", "run10"]
    assert structures["run5"].rotations == ("identity", "run5")
    sparse = rotsparse.sparsify(tiny_model("llama", num_layers=4), sparsity=0.5, error_tokens=64,
                                calibrated=calibrated, progress=False)
    plan = sparse.rotsparse_plan
    labels = [label for label, _ in plan.check_losses]
    assert labels == list(structures)
    best = min(plan.check_losses, key=lambda pair: pair[1])[0]
    assert set(plan.residual_bases) <= set(structures[best].rotations) and len(plan.residual_bases) == 4
    # the recorded check loss is the sparsified model's real loss on the held-out rows
    from rotsparse.evaluation import mean_loss
    assert abs(mean_loss(sparse, tokens[3:]) - dict(plan.check_losses)[best]) < 1e-5
    unchecked = calibrate(model, calibration=tokens, config=SparsifyConfig(error_tokens=64, check_sequences=0),
                          progress=False)
    assert unchecked.check_input_ids is None and unchecked.tokens == 5 * tokens.shape[1]
    proxy = rotsparse.sparsify(tiny_model("llama", num_layers=4), sparsity=0.5, calibrated=unchecked,
                               progress=False)
    assert proxy.rotsparse_plan.check_losses == ()
    off = calibrated.restricted(AutoOptions(structure_check=False))
    assert list(off.structures()) == ["chooser"]


def test_default_offers_the_identity_basis_only():
    """Residual-basis rotations fitted to the calibration text do not transfer to other text (docs/quality.md):
    the default keeps the identity; `IN_DOMAIN_ROTATIONS` offers the PCA candidates."""
    assert AutoOptions().rotations == ("identity",)
    assert SparsifyConfig().resolved_options.rotations == ("identity",)
    assert "identity" in IN_DOMAIN_ROTATIONS and len(IN_DOMAIN_ROTATIONS) > 1
    AutoOptions(rotations=IN_DOMAIN_ROTATIONS)  # valid candidates


def test_calibration_logs_one_progress_line_per_layer_and_stage_with_an_eta(caplog):
    model = tiny_model("llama", num_layers=3)
    with caplog.at_level(logging.INFO, logger="rotsparse"):
        calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64), progress=False)
    assert not [record for record in caplog.records if "ETA" in record.getMessage()]
    with caplog.at_level(logging.INFO, logger="rotsparse"):
        calibrate(model, calibration=random_tokens(seed=7), config=SparsifyConfig(error_tokens=64))
    lines = [record.getMessage() for record in caplog.records if "ETA" in record.getMessage()]
    for stage in ("loss sensitivity, forward", "loss sensitivity, backward", "statistics and error curves"):
        steps = [match.group(1) for line in lines if (match := re.search(f"{stage}: layer (\\d/3), .* elapsed", line))]
        assert steps == ["1/3", "2/3", "3/3"], lines


@pytest.mark.parametrize("rotations", [AutoOptions().rotations, IN_DOMAIN_ROTATIONS[:4] + ("run2",)])
def test_calibration_and_folding_never_copy_to_the_host(monkeypatch, rotations):
    """Every statistic, basis, curve and fold stays on the device of the layer it belongs to: no `.cpu()` call
    (on an accelerator each would be a copy and a host sync)."""
    model = tiny_model("llama", num_layers=3)

    def refuse(tensor, *args, **kwargs):
        raise AssertionError("Tensor.cpu() called")

    monkeypatch.setattr(torch.Tensor, "cpu", refuse)
    rotsparse.sparsify(model, sparsity=0.5, options=AutoOptions(rotations=rotations),
                       calibration=random_tokens(num_sequences=6, seed=7), progress=False)
    assert model.rotsparse_plan.effective_sparsity > 0.4


def test_per_layer_allocation_puts_every_layer_at_the_budget():
    """allocation="layer" (TEAL's budget): a layer whose errors are cheap keeps as many weights as a costly one,
    each at the requested sparsity, spread over its sites by their errors; "error" moves weights to the costly
    layer and reaches a lower summed error."""
    keep = torch.arange(101, dtype=torch.float64)
    costly, cheap = 1 - keep / 100, (1 - keep / 100).pow(6)
    sizes = (((100, 10000),), ((100, 10000),), ((100, 20000),), ((100, 40000),))

    def layer(curve, h4):
        return LayerCalibration([None], {"h1": [curve[None]], "h2": [curve[None]], "h3": [curve[None]],
                                         "h4": [h4[None]]}, {})

    layers = [layer(costly, costly), layer(cheap, costly)]
    per_layer_params = sum(params for site in sizes for _, params in site)
    errors = {}
    for allocation in ("layer", "error"):
        calibration = Calibration("auto", AutoOptions(allocation=allocation, value_rotation=False), layers, 0, 0.0,
                                  0.0)
        _, keep_k = choose(calibration, [sizes] * 2, 0.5, (1.0,) * 4)
        kept = [sum(site_k[0] * site[0][1] / site[0][0] for site_k, site in zip(layer_k, sizes)) for layer_k in keep_k]
        errors[allocation] = sum(float(curve[k[0]]) for lay, layer_k in zip(layers, keep_k)
                                 for site, k in zip(SITES, layer_k) for curve in lay.curves[site][0][:1])
        if allocation == "layer":
            for weights in kept:
                assert 0.5 <= 1 - weights / per_layer_params <= 0.5 + 4 * 400 / per_layer_params
            assert keep_k[1][3][0] < keep_k[0][3][0] or keep_k[1][0][0] < keep_k[0][0][0]
        else:
            assert kept[0] > kept[1] + 0.05 * per_layer_params
    assert errors["error"] < errors["layer"]
    with pytest.raises(ValueError, match="allocation must be"):
        AutoOptions(allocation="greedy")
