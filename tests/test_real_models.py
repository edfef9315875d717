"""End-to-end checks on the two pip-shipped real models (SmolLM2-135M: llama; Gemma-3-270M: gemma3_text)."""

import pytest
import torch

import rotsparse
from rotsparse.data import calibration_batch, load_texts
from rotsparse.models import load_model

pytestmark = pytest.mark.slow


def small_calibration(tokenizer) -> torch.Tensor:
    return calibration_batch(tokenizer, load_texts("embedded", part="calibration"), num_sequences=2,
                             sequence_length=256)


def prompt_ids(tokenizer) -> torch.Tensor:
    text = load_texts("embedded", part="evaluation")[0][:400]
    return tokenizer(text, return_tensors="pt").input_ids[:, :64]


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("method", ["larosa", "auto"])
def test_sparsity_zero_is_invariant_on_the_real_model(alias, method):
    model, tokenizer = load_model(alias)
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        expected = model(ids).logits
    rotsparse.sparsify(model, tokenizer, sparsity=0.0, method=method, calibration=small_calibration(tokenizer),
                       error_tokens=128, progress=False)
    with torch.no_grad():
        actual = model(ids).logits
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-4


def test_smollm2_greedy_generation_survives_save_and_load(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    rotsparse.sparsify(model, tokenizer, sparsity=0.4, method="larosa", calibration=small_calibration(tokenizer),
                       progress=False)
    ids = prompt_ids(tokenizer)[:, :24]

    def greedy(network):
        with torch.no_grad():
            return network.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)

    before = greedy(model)
    with torch.no_grad():
        logits_before = model(before).logits
    rotsparse.save(model, tmp_path, tokenizer)
    restored = rotsparse.load(tmp_path)
    after = greedy(restored)
    assert torch.equal(before, after)
    with torch.no_grad():
        assert torch.allclose(restored(after).logits, logits_before, atol=1e-4, rtol=1e-4)
