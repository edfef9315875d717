"""Models dispatched by accelerate (device_map with CPU and disk offload): calibrate, fold, install Top-K, save
and load, one layer at a time; results equal the same model sparsified in memory."""

import copy
import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import rotsparse
from rotsparse.offload import InputMajorOffloadHook, execution_device, is_offloaded, materialized
from rotsparse.runtime import TopKExperts, TopKLinear

from tiny_models import generated_and_stepwise, random_tokens, tiny_model

CALIBRATION = random_tokens(seed=3)
PROBE = random_tokens(num_sequences=2, length=12, seed=5)


def mixed_map(model) -> dict:
    """Embeddings, head and the first and last layers on the CPU; the layers between on disk."""
    layers = len(model.model.layers)
    device_map = {name: "cpu" for name, _ in model.named_children() if name != "model"}
    device_map.update({f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"})
    device_map.update({f"model.layers.{i}": "cpu" if i in (0, layers - 1) else "disk" for i in range(layers)})
    return device_map


def dispatched(model, tmp_path, device_map="mixed", **kwargs):
    checkpoint = tmp_path / "checkpoint"
    if not checkpoint.exists():
        model.save_pretrained(checkpoint)
    if device_map == "mixed":
        device_map = mixed_map(model)
    offload = tmp_path / f"offload-{len(list(tmp_path.glob('offload-*')))}"
    return AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map, offload_folder=str(offload),
                                                attn_implementation="eager", **kwargs)


def logits(model, tokens=PROBE):
    with torch.no_grad():
        return model(tokens).logits


def checkpoint_digest(path) -> str:
    return hashlib.sha256((path / "checkpoint" / "model.safetensors").read_bytes()).hexdigest()


def test_dispatch_really_offloads_to_cpu_and_disk(tmp_path):
    model = dispatched(tiny_model("llama", num_layers=4), tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    layers = model.model.layers
    assert [is_offloaded(layer) for layer in layers] == [False, True, True, False]
    assert layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert execution_device(layers[1]) == torch.device("cpu")


@pytest.mark.parametrize("family,device_map,method", [("llama", "mixed", "larosa"), ("qwen2", {"": "disk"}, "auto"),
                                                      ("gemma3_text", "mixed", "larosa")])
def test_sparsity_zero_keeps_the_function(tmp_path, family, device_map, method):
    original = tiny_model(family, num_layers=4)
    model = dispatched(original, tmp_path, device_map)
    digest = checkpoint_digest(tmp_path)
    rotsparse.sparsify(model, sparsity=0.0, method=method, calibration=CALIBRATION, progress=False)
    expected = logits(original)
    actual = logits(model)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # still dispatched: offloaded layers hold meta tensors, their Top-K linears read the offload store
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, TopKLinear) and q_proj.weight.device.type == "meta"
    assert isinstance(q_proj._hf_hook, InputMajorOffloadHook)
    assert checkpoint_digest(tmp_path) == digest  # the checkpoint it was loaded from is never written


@pytest.mark.parametrize("family,method", [("llama", "larosa"), ("gemma3_text", "auto")])
def test_offloaded_result_equals_sparsifying_in_memory(tmp_path, family, method):
    original = tiny_model(family, num_layers=4)
    # check_sequences=0: an offloaded model skips auto's structure check (it would need a second copy)
    in_memory = rotsparse.sparsify(copy.deepcopy(original), sparsity=0.5, method=method, calibration=CALIBRATION,
                                   progress=False, check_sequences=0)
    model = rotsparse.sparsify(dispatched(original, tmp_path), sparsity=0.5, method=method,
                               calibration=CALIBRATION, progress=False, check_sequences=0)
    assert model.rotsparse_plan == in_memory.rotsparse_plan
    assert torch.allclose(logits(model), logits(in_memory), atol=1e-6, rtol=1e-5)


def test_offloaded_mixture_of_experts_equals_sparsifying_in_memory(tmp_path):
    """The experts module is replaced with its hooks kept (its weights read from the store, laid out input-major
    for the decode kernels)."""
    original = tiny_model("qwen3_moe", num_layers=4)
    in_memory = rotsparse.sparsify(copy.deepcopy(original), sparsity=0.5, method="topk", progress=False)
    model = rotsparse.sparsify(dispatched(original, tmp_path), sparsity=0.5, method="topk", progress=False)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, TopKExperts) and experts.gate_up_proj.device.type == "meta"
    assert isinstance(experts._hf_hook, InputMajorOffloadHook)
    assert torch.allclose(logits(model), logits(in_memory), atol=1e-6, rtol=1e-5)
    assert torch.equal(generated_and_stepwise(model)[0], generated_and_stepwise(in_memory)[0])


def test_auto_device_map_with_a_memory_limit(tmp_path):
    original = tiny_model("llama", num_layers=6, hidden_size=128, vocab_size=256)
    layer_bytes = sum(p.numel() * p.element_size() for p in original.model.layers[0].parameters())
    model = dispatched(original, tmp_path, "auto", max_memory={"cpu": 3 * layer_bytes})
    assert "disk" in model.hf_device_map.values()
    rotsparse.sparsify(model, sparsity=0.0, method="larosa", calibration=random_tokens(vocab_size=256, seed=3),
                       progress=False)
    tokens = random_tokens(vocab_size=256, num_sequences=2, length=12)
    expected = logits(original, tokens)
    assert torch.allclose(logits(model, tokens), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def greedy(model, prompt, steps=6):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=steps, do_sample=False, pad_token_id=0)


def test_generation_through_offloaded_topk_linears(tmp_path):
    original = tiny_model("llama", num_layers=4)
    in_memory = rotsparse.sparsify(copy.deepcopy(original), sparsity=0.5, method="larosa", calibration=CALIBRATION,
                                   progress=False)
    model = rotsparse.sparsify(dispatched(original, tmp_path), sparsity=0.5, method="larosa",
                               calibration=CALIBRATION, progress=False)
    prompt = random_tokens(num_sequences=1, length=8, seed=9)
    for kernels in (True, False):  # decode steps go through the sparse kernel (input-major weight) or not
        rotsparse.set_kernels(model, kernels)
        assert torch.equal(greedy(model, prompt), greedy(in_memory, prompt))


def test_save_and_load_round_trip_with_offload(tmp_path):
    original = tiny_model("llama", num_layers=4)
    model = rotsparse.sparsify(dispatched(original, tmp_path), sparsity=0.5, method="larosa",
                               calibration=CALIBRATION, progress=False)
    expected = logits(model)
    target = tmp_path / "sparse"
    rotsparse.save(model, target)
    plain = rotsparse.load(target)
    assert torch.allclose(logits(plain), expected, atol=1e-5, rtol=1e-5)
    restored = rotsparse.load(target, device_map=mixed_map(plain), offload_folder=tmp_path / "offload-load")
    assert is_offloaded(restored.model.layers[1]) and not is_offloaded(restored.model.layers[0])
    assert restored.model.layers[1].rotsparse_output_rotation.device.type == "cpu"
    assert torch.allclose(logits(restored), expected, atol=1e-5, rtol=1e-5)
    assert restored.rotsparse_plan == model.rotsparse_plan
    on_disk = rotsparse.load(target, device_map={"": "disk"}, offload_folder=tmp_path / "offload-disk")
    assert torch.allclose(logits(on_disk), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(on_disk, PROBE[:1]), greedy(plain, PROBE[:1]))


def test_materialized_reads_and_writes_the_store(tmp_path):
    original = tiny_model("llama", num_layers=4)
    model = dispatched(original, tmp_path)
    layer = model.model.layers[1]
    stored = original.model.layers[1].mlp.up_proj.weight
    with materialized(layer, writeback=False):
        weight = layer.mlp.up_proj.weight
        assert weight.device.type == "cpu" and torch.equal(weight, stored)
        weight.data.mul_(2)
    assert layer.mlp.up_proj.weight.device.type == "meta"
    with materialized(layer):
        assert torch.equal(layer.mlp.up_proj.weight, stored)  # read-only: the change was not kept
        layer.mlp.up_proj.weight.data.mul_(2)
    with materialized(layer):
        assert torch.equal(layer.mlp.up_proj.weight, 2 * stored)
    with pytest.raises(RuntimeError, match="boom"), materialized(layer):
        layer.mlp.up_proj.weight.data.zero_()
        raise RuntimeError("boom")
    with materialized(layer, writeback=False):
        assert torch.equal(layer.mlp.up_proj.weight, 2 * stored)  # an error leaves the store as it was


def test_materialized_is_a_no_op_without_offload():
    model = tiny_model("llama")
    weight = model.model.layers[0].self_attn.q_proj.weight
    with materialized(model.model.layers[0]):
        assert model.model.layers[0].self_attn.q_proj.weight is weight
    assert model.model.layers[0].self_attn.q_proj.weight is weight


def test_tied_offloaded_embeddings_stay_tied_when_loaded_together(tmp_path):
    model = dispatched(tiny_model("llama"), tmp_path, {"": "disk"})
    embed, head = model.model.embed_tokens, model.lm_head
    assert embed.weight is head.weight
    with materialized(embed, head, writeback=False):
        assert embed.weight is head.weight and embed.weight.device.type == "cpu"
    assert embed.weight is head.weight and embed.weight.device.type == "meta"
