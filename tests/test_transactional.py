"""`sparsify` is all-or-nothing: an exception at any stage (calibration, loss sensitivity, the structure check,
each fold step, Top-K installation, plan attachment; KeyboardInterrupt and MemoryError included) leaves the model
exactly as it was, and a later call works. Non-finite values stop the call before anything is folded, naming
the tensor and the layer. No global state (torch RNG, logger levels) changes."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import rotsparse
from rotsparse import api, fold, measure, runtime
from rotsparse.config import IN_DOMAIN_ROTATIONS, AutoOptions, SparsifyConfig
from rotsparse.evaluation import zero_shot
from rotsparse.measure import LossSensitivity
from rotsparse.models import load_model
from rotsparse.runtime import TopKLinear

from tiny_models import FAMILIES, random_tokens, tiny_model, tiny_tokenizer

CALIBRATION = random_tokens(num_sequences=4, length=24, seed=3)
SETTINGS = dict(sparsity=0.5, error_tokens=64, progress=False, calibration=CALIBRATION)


class Injected(RuntimeError):
    pass


def snapshot(model) -> dict:
    """Everything `sparsify` may change: every parameter and buffer (values, dtype, requires_grad), the module
    types and hooks, whether embeddings and head are tied, the config's fields and the plan attribute."""
    return {
        "parameters": {name: (p.detach().clone(), p.requires_grad)
                       for name, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {name: b.clone() for name, b in model.named_buffers(remove_duplicate=False)},
        "modules": {name: type(m) for name, m in model.named_modules()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()},
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "config": model.config.to_dict(),
        "plan": hasattr(model, "rotsparse_plan"),
    }


def assert_unchanged(before: dict, model) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["tied"] == before["tied"]
    assert after["config"] == before["config"]
    assert after["plan"] == before["plan"] is False
    assert after["parameters"].keys() == before["parameters"].keys()
    for name, (value, requires_grad) in before["parameters"].items():
        new_value, new_requires_grad = after["parameters"][name]
        assert new_value.dtype == value.dtype and torch.equal(new_value, value), name
        assert new_requires_grad == requires_grad, name
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name


def after_call(target, name: str, call: int, error: BaseException):
    """`target.name` replaced by a wrapper that runs the original and raises `error` on its `call`-th call
    (so the fault strikes after that step changed the model)."""
    original = getattr(target, name)
    calls = []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            raise error
        return result

    return original, wrapper, calls


STAGES = {  # stage -> (module, attribute, which call fails, methods it applies to)
    "calibration": (measure, "_calibrate_layer", 2, ("auto", "larosa")),
    "loss_sensitivity": (measure, "loss_sensitivity", 1, ("auto",)),
    "structure_check": (api, "_checked_structure", 1, ("auto",)),
    "fold_rotations": (fold, "_fold_layer", 2, ("auto", "larosa")),
    "fold_value_rotations": (fold, "fold_value_rotation", 2, ("auto",)),
    "fold_scales": (fold, "fold_scales", 2, ("auto",)),
    "topk_installation": (TopKLinear, "from_linear", 9, ("auto", "larosa", "topk")),
    "head_installation": (runtime, "install_head_kernel", 1, ("auto", "larosa", "topk")),
    "plan_attachment": (api, "attach_plan", 1, ("auto", "larosa", "topk")),
}
ERRORS = [Injected("injected"), KeyboardInterrupt(), MemoryError("injected")]
CASES = [(family, method, stage) for family in FAMILIES for stage, (*_, methods) in STAGES.items()
         for method in methods]


@pytest.mark.parametrize("family,method,stage", CASES)
def test_a_fault_at_any_stage_leaves_the_model_exactly_as_it_was(family, method, stage, monkeypatch):
    model = tiny_model(family, num_layers=3)
    before = snapshot(model)
    target, name, call, _ = STAGES[stage]
    error = ERRORS[list(STAGES).index(stage) % len(ERRORS)]
    original, wrapper, calls = after_call(target, name, call, error)
    if stage == "topk_installation":
        wrapper = staticmethod(wrapper)  # a classmethod read from the class is already bound
    monkeypatch.setattr(target, name, wrapper)
    if stage == "fold_value_rotations":  # make every layer take its value-head rotation, so the fold runs
        monkeypatch.setattr(api, "choose_value_rotations",
                            lambda layers, keep_k: [len(layer.value_rotations) - 1 for layer in layers])
    with pytest.raises(type(error)):
        rotsparse.sparsify(model, method=method, **SETTINGS)
    assert calls, f"the fault at {stage} was never reached"
    assert_unchanged(before, model)
    if stage == "plan_attachment":  # the failed call leaves nothing behind: a new call works
        monkeypatch.setattr(target, name, original)
        rotsparse.sparsify(model, method=method, **SETTINGS)
        assert hasattr(model, "rotsparse_plan")


def test_a_fault_in_an_offloaded_model_restores_its_stores(tmp_path, monkeypatch):
    model = tiny_model("llama", num_layers=3)
    model.save_pretrained(tmp_path / "checkpoint")
    device_map = {"lm_head": "cpu", "model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk"}
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", device_map=device_map,
                                                      offload_folder=str(tmp_path / "offload"),
                                                      attn_implementation="eager")
    probe = random_tokens(num_sequences=2, length=12, seed=5)
    with torch.no_grad():
        expected = dispatched(probe).logits
    types = {name: type(m) for name, m in dispatched.named_modules()}
    _, wrapper, calls = after_call(fold, "fold_scales", 3, Injected("injected"))
    monkeypatch.setattr(fold, "fold_scales", wrapper)
    with pytest.raises(Injected):
        rotsparse.sparsify(dispatched, **SETTINGS)
    assert calls
    assert {name: type(m) for name, m in dispatched.named_modules()} == types
    assert not hasattr(dispatched, "rotsparse_plan")
    with torch.no_grad():
        assert torch.equal(dispatched(probe).logits, expected)


def test_settings_are_checked_before_the_model_is_touched(monkeypatch):
    model = tiny_model("llama")
    before = snapshot(model)
    touched = []
    monkeypatch.setattr(measure, "layerwise", lambda *args, **kwargs: touched.append(1) or iter(()))
    with pytest.raises(ValueError, match="block_size 7"):
        rotsparse.sparsify(model, block_size=7, **SETTINGS)
    assert not touched
    assert_unchanged(before, model)


# non-finite values ------------------------------------------------------------------------------------------

def test_nan_in_an_unused_embedding_row_is_named_and_nothing_is_folded():
    model = tiny_model("llama")
    used = set(CALIBRATION.flatten().tolist())
    row = next(index for index in range(model.config.vocab_size) if index not in used)
    with torch.no_grad():
        model.model.embed_tokens.weight[row, 3] = float("nan")
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=rf"model\.embed_tokens\.weight \(rows \[{row}\]\)"):
        rotsparse.sparsify(model, **SETTINGS)
    after = snapshot(model)
    for name, (value, _) in before["parameters"].items():
        assert torch.equal(value.nan_to_num(), after["parameters"][name][0].nan_to_num()), name


def test_nan_in_an_untied_lm_head_is_named_and_nothing_is_folded():
    model = tiny_model("qwen2")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"lm_head\.weight"):
        rotsparse.sparsify(model, **SETTINGS)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("what,site", [("scales", "h1"), ("scales", "h4"), ("curves", "h2"), ("rotations", None),
                                       ("value_rotations", None)])
def test_non_finite_calibration_results_are_named_with_their_layer(what, site):
    model = tiny_model("llama", num_layers=3)
    calibrated = rotsparse.calibrate(model, calibration=CALIBRATION, config=SparsifyConfig(error_tokens=64),
                                     progress=False, options=AutoOptions(rotations=IN_DOMAIN_ROTATIONS))
    layer = calibrated.layers[1]
    values = getattr(layer, what)[site] if site else getattr(layer, what)
    index = next(i for i, tensor in enumerate(values) if tensor is not None)
    values[index] = values[index].clone()
    values[index].view(-1)[0] = float("nan")
    before = snapshot(model)
    names = {"scales": f"WINA scales {site}", "curves": f"Top-K error curve {site}", "rotations": "residual basis",
             "value_rotations": "value-head rotation"}
    with pytest.raises(FloatingPointError, match=rf"{names[what]}.* of decoder layer 1"):
        rotsparse.sparsify(model, calibrated=calibrated, sparsity=0.5, progress=False)
    assert_unchanged(before, model)


def test_non_finite_loss_sensitivity_is_named_with_its_layer(monkeypatch):
    model = tiny_model("mistral", num_layers=3)
    original = measure.loss_sensitivity

    def poisoned(*args, **kwargs):
        result = original(*args, **kwargs)
        result.fisher[2]["h3"][1] = result.fisher[2]["h3"][1] * float("nan")
        return LossSensitivity(result.fisher, result.token_energy, result.sequences)

    monkeypatch.setattr(measure, "loss_sensitivity", poisoned)
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"Fisher\) of site h3 reader 1 of decoder layer 2"):
        rotsparse.sparsify(model, **SETTINGS)
    assert_unchanged(before, model)


# global state -----------------------------------------------------------------------------------------------

def test_sparsify_and_calibrate_leave_the_global_rng_and_loggers_alone():
    model = tiny_model("gemma3_text")
    names = ["", "rotsparse", "transformers", "accelerate", "torch"]
    levels = {name: logging.getLogger(name).level for name in names}
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    rotsparse.calibrate(model, calibration=CALIBRATION, config=SparsifyConfig(error_tokens=64, seed=5),
                        progress=False)
    rotsparse.sparsify(model, seed=7, **SETTINGS)
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: logging.getLogger(name).level for name in names} == levels


def test_the_seed_still_makes_calibration_reproducible():
    first = rotsparse.calibrate(tiny_model("llama"), calibration=CALIBRATION,
                                config=SparsifyConfig(error_tokens=32, seed=3), progress=False)
    torch.manual_seed(99)
    second = rotsparse.calibrate(tiny_model("llama"), calibration=CALIBRATION,
                                 config=SparsifyConfig(error_tokens=32, seed=3), progress=False)
    for a, b in zip(first.layers, second.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.curves["h1"], b.curves["h1"]))


def test_loading_and_zero_shot_leave_the_global_rngs_and_loggers_alone(tmp_path):
    for name in ("lm_eval", "lm_eval.models.huggingface", "lm_eval.tasks", "datasets"):  # their import-time defaults
        pytest.importorskip(name, reason="lm_eval not installed (pip install 'rotsparse[eval]')")
    from test_evaluation import local_task_dir

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    names = ["", "rotsparse", "transformers", "lm-eval", "lm_eval", "datasets"]
    levels = {name: logging.getLogger(name).level for name in names}
    torch.manual_seed(4321)
    state = torch.get_rng_state()
    loaded, loaded_tokenizer = load_model(tmp_path / "model")
    zero_shot(loaded, loaded_tokenizer, ["rotsparse_tiny_facts"], include_path=local_task_dir(tmp_path),
              include_defaults=False, limit=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: logging.getLogger(name).level for name in names} == levels
