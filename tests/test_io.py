"""Save/load round trips, generation with the KV cache, batches with left padding, and bad directories."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import rotsparse
from rotsparse.io import load, read_plan, save

from tiny_models import FAMILIES, random_tokens, tiny_model


def sparsified(family: str, sparsity: float = 0.5, method: str = "larosa"):
    model = tiny_model(family)
    return rotsparse.sparsify(model, sparsity=sparsity, method=method, calibration=random_tokens(seed=3),
                              progress=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["larosa", "topk"])
def test_save_load_round_trip_is_identical(tmp_path, family, method):
    model = sparsified(family, method=method)
    tokens = random_tokens(num_sequences=2, length=16)
    with torch.no_grad():
        expected = model(tokens).logits
    save(model, tmp_path)
    restored = load(tmp_path)
    with torch.no_grad():
        actual = restored(tokens).logits
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)  # attention kernels may differ (eager/sdpa)
    saved, reloaded = model.state_dict(), restored.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[key], reloaded[key]) for key in saved)
    assert restored.rotsparse_plan == model.rotsparse_plan
    assert read_plan(tmp_path).effective_sparsity == model.rotsparse_plan.effective_sparsity


def test_plain_save_pretrained_is_loadable_and_dtype_can_be_requested(tmp_path):
    model = sparsified("llama")
    model.save_pretrained(tmp_path)
    restored = load(tmp_path, dtype=torch.bfloat16)
    assert restored.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert restored.model.layers[0].rotsparse_output_rotation.dtype == torch.bfloat16
    with torch.no_grad():
        logits = restored(random_tokens(num_sequences=1)).logits
    assert torch.isfinite(logits).all()


def greedy(model, tokens, steps=8, **kwargs):
    with torch.no_grad():
        return model.generate(tokens, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels", [True, False])
def test_kv_cache_decoding_equals_full_forward(family, kernels):
    model = sparsified(family)
    rotsparse.set_kernels(model, kernels)
    prompt = random_tokens(num_sequences=1, length=10)
    result = greedy(model, prompt)
    with torch.no_grad():
        full = model(result.sequences, use_cache=False).logits
    steps = len(result.logits)
    for step, step_logits in enumerate(result.logits):
        position = prompt.shape[1] - 1 + step
        assert torch.allclose(step_logits[0], full[0, position], atol=1e-4, rtol=1e-4), step
    assert steps == 8


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_kernel_and_masked_paths_generate_the_same_tokens(family, monkeypatch):
    model = sparsified(family)
    assert not any(module.training for module in model.modules()), "sparsify must keep the model in eval mode"
    import rotsparse.kernels

    calls = []
    kernel = rotsparse.kernels.decode_topk_gemv  # what TopKLinear's decode step and the adapters call
    monkeypatch.setattr(rotsparse.kernels, "decode_topk_gemv", lambda *args: calls.append(1) or kernel(*args))
    prompt = random_tokens(num_sequences=1, length=10, seed=11)
    with_kernels = greedy(model, prompt, steps=12).sequences
    assert len(calls) >= 11 * 7 * 2, "decode steps must go through the sparse kernel"
    rotsparse.set_kernels(model, False)
    without = greedy(model, prompt, steps=12).sequences
    assert torch.equal(with_kernels, without)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "olmo2", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decoding_through_the_kernels_equals_the_full_forward(family, dtype):
    """On a GPU, decode steps take the Triton kernels and match the masked full forward pass."""
    model = sparsified(family).to("cuda", dtype)
    assert rotsparse.kernels.kernel_backend("cuda", dtype) == "triton"
    prompt = random_tokens(num_sequences=1, length=10, seed=11).cuda()
    result = greedy(model, prompt, steps=8)
    with torch.no_grad():
        full = model(result.sequences, use_cache=False).logits
    for step, step_logits in enumerate(result.logits):
        expected = full[0, prompt.shape[1] - 1 + step].float()
        if dtype == torch.float32:
            torch.testing.assert_close(step_logits[0], expected, atol=1e-4, rtol=1e-4)
        else:  # bfloat16 rounding can flip a near-tie in Top-K: compare the whole logit vector
            assert (step_logits[0].float() - expected).norm() <= 0.05 * expected.norm(), step


@pytest.mark.parametrize("method", ["topk", "larosa"])
def test_lm_head_decodes_through_the_dense_kernel_and_keeps_its_tie(method, monkeypatch):
    from torch import nn

    import rotsparse.kernels
    from rotsparse.runtime import KernelLinear

    model = sparsified("llama", method=method)
    head = model.lm_head
    assert type(head) is KernelLinear and isinstance(head, nn.Linear)
    if method == "topk":  # tied embeddings stay tied (the head is not re-laid out)
        assert head.weight is model.model.embed_tokens.weight
    calls = []
    kernel = rotsparse.kernels.dense_gemv
    monkeypatch.setattr(rotsparse.kernels, "dense_gemv", lambda *args: calls.append(1) or kernel(*args))
    prompt = random_tokens(num_sequences=1, length=10, seed=5)
    result = greedy(model, prompt, steps=6)
    assert len(calls) >= 5, "decode steps must go through the dense head kernel"
    with torch.no_grad():
        full = model(result.sequences, use_cache=False).logits
    for step, step_logits in enumerate(result.logits):
        assert torch.allclose(step_logits[0], full[0, prompt.shape[1] - 1 + step], atol=1e-4, rtol=1e-4), step


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "olmo2", "phi3"])
def test_left_padded_batch_equals_prompts_one_by_one(family):
    model = sparsified(family)
    prompts = [random_tokens(num_sequences=1, length=n, seed=n)[0] for n in (5, 9, 12)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batched = greedy(model, batch, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None])
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, len(prompt):]), row
        assert torch.allclose(batched.logits[0][row], alone.logits[0][0], atol=1e-4, rtol=1e-4)


def test_sampling_generation_runs_and_is_seeded():
    model = sparsified("llama")
    prompt = random_tokens(num_sequences=1, length=6)

    def sample(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0)

    assert torch.equal(sample(5), sample(5))
    assert sample(5).shape == (1, 16)


def test_loading_a_plain_directory_is_a_clear_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no rotsparse model"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path / "missing")


def test_newer_format_version_is_refused(tmp_path):
    save(sparsified("llama"), tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["rotsparse"]["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99"):
        load(tmp_path)


def _wrong_shape(weights):
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)


def _missing(weights):
    del weights["model.layers.1.self_attn.k_proj.weight"]


@pytest.mark.parametrize("edit,error,name", [(_wrong_shape, Exception, "down_proj"), (_missing, ValueError, "k_proj")],
                         ids=["wrong shape", "missing"])
def test_weights_that_do_not_match_the_config_are_refused_naming_them(tmp_path, edit, error, name):
    save(sparsified("llama"), tmp_path)
    weights_path = tmp_path / "model.safetensors"
    weights = load_file(weights_path)
    edit(weights)
    save_file(weights, weights_path, metadata={"format": "pt"})
    with pytest.raises(error, match=name):
        load(tmp_path)


def test_a_missing_weights_file_is_refused(tmp_path):
    save(sparsified("llama"), tmp_path)
    weights_path = tmp_path / "model.safetensors"
    weights_path.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load(tmp_path)


def test_corrupt_config_is_refused(tmp_path):
    save(sparsified("llama"), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path)


def test_saving_a_plain_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not sparsified"):
        save(tiny_model("llama"), tmp_path)
