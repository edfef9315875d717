"""Tests for rotsparse.evaluation: the perplexity protocol and the lm-eval integration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rotsparse.data import embedded_texts, token_stream
from rotsparse.evaluation import PerplexityResult, make_windows, perplexity, zero_shot
from test_data import make_byte_tokenizer

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"


def tiny_llama(vocab_size: int = 258, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden 32) in float32 eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=256, eos_token_id=257, pad_token_id=257,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def texts():
    return embedded_texts("evaluation")[:2]


def hand_perplexity(model, windows: list[torch.Tensor]) -> tuple[float, int]:
    """Mean next-token NLL over explicit windows (each (T,)), computed one by one."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0]
            log_probs = F.log_softmax(logits.double(), dim=-1)
            for position in range(window.numel() - 1):
                total -= log_probs[position, window[position + 1]].item()
                count += 1
    return total / count, count


def test_perplexity_matches_hand_computation(model, tokenizer, texts):
    stream = token_stream(tokenizer, texts)
    seqlen = 128
    count = stream.numel() // seqlen
    windows = [stream[i * seqlen : (i + 1) * seqlen] for i in range(min(count, 3))]
    max_tokens = len(windows) * seqlen + seqlen // 2  # plus a partial window that must be dropped
    result = perplexity(model, tokenizer, texts, seqlen=seqlen, max_tokens=max_tokens, progress=False)
    nll, predicted = hand_perplexity(model, windows)
    assert isinstance(result, PerplexityResult)
    assert result.windows == len(windows) and result.seqlen == seqlen
    assert result.tokens == predicted == len(windows) * (seqlen - 1)
    assert result.nll == pytest.approx(nll, abs=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_batch_size_does_not_change_result(model, tokenizer, texts):
    one = perplexity(model, tokenizer, texts, seqlen=64, max_tokens=64 * 5, progress=False)
    three = perplexity(model, tokenizer, texts, seqlen=64, max_tokens=64 * 5, batch_size=3, progress=False)
    assert one.windows == three.windows == 5
    assert one.nll == pytest.approx(three.nll, abs=1e-5)


def test_short_text_is_one_shorter_window(model, tokenizer):
    result = perplexity(model, tokenizer, ["hello", "world"], seqlen=2048, progress=False)
    assert result.windows == 1 and result.seqlen == 12 and result.tokens == 11
    stream = token_stream(tokenizer, ["hello", "world"])
    nll, _ = hand_perplexity(model, [stream])
    assert result.nll == pytest.approx(nll, abs=1e-5)


def test_bos_is_put_in_front_of_each_window(model):
    bos_tokenizer = make_byte_tokenizer(add_bos=True)
    texts = ["abcdefghij" * 5]
    result = perplexity(model, bos_tokenizer, texts, seqlen=11, progress=False)
    assert result.windows == 5 and result.tokens == 5 * 10
    stream = token_stream(bos_tokenizer, texts)
    windows = [torch.cat([torch.tensor([256]), stream[i * 10 : (i + 1) * 10]]) for i in range(5)]
    nll, _ = hand_perplexity(model, windows)
    assert result.nll == pytest.approx(nll, abs=1e-5)


def test_make_windows_drops_partial_window():
    stream = torch.arange(25)
    windows = make_windows(stream, seqlen=10)
    assert windows.shape == (2, 10) and torch.equal(windows.flatten(), stream[:20])
    with_bos = make_windows(stream, seqlen=10, bos=99)
    assert with_bos.shape == (2, 10) and (with_bos[:, 0] == 99).all()
    assert torch.equal(with_bos[:, 1:].flatten(), stream[:18])
    with pytest.raises(ValueError, match="nothing to predict"):
        make_windows(torch.arange(1), seqlen=10)


def test_perplexity_restores_training_mode(tokenizer):
    model = tiny_llama().train()
    perplexity(model, tokenizer, ["some words here"], seqlen=8, progress=False)
    assert model.training


def test_perplexity_rejects_a_plain_string(model, tokenizer):
    with pytest.raises(TypeError, match="list of documents"):
        perplexity(model, tokenizer, "just a string", progress=False)


def test_uniform_model_has_vocab_sized_perplexity(tokenizer):
    """Zero logits -> every token has probability 1/V -> ppl == V exactly."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.config.tie_word_embeddings = False
    result = perplexity(model, tokenizer, ["x" * 300], seqlen=100, progress=False)
    assert result.ppl == pytest.approx(258, rel=1e-6)


# --------------------------------------------------------------------------
# lm-eval
# --------------------------------------------------------------------------


def local_task_dir(tmp_path: Path) -> Path:
    """Copy of the tiny task whose data_files path is absolute (lm-eval resolves it from the cwd)."""
    yaml_text = (TASKS_DIR / "tiny_facts.yaml").read_text()
    relative = "tests/data/lm_eval_tasks/tiny_facts.jsonl"
    assert relative in yaml_text
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_facts.yaml").write_text(
        yaml_text.replace(relative, str((TASKS_DIR / "tiny_facts.jsonl").resolve()))
    )
    return task_dir


def test_zero_shot_on_local_task(model, tokenizer, tmp_path):
    pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install 'rotsparse[eval]')")
    results = zero_shot(
        model, tokenizer, ["rotsparse_tiny_facts"], include_path=local_task_dir(tmp_path),
        include_defaults=False,
    )
    metrics = results["rotsparse_tiny_facts"]
    assert 0.0 <= metrics["acc"] <= 1.0
    assert 0.0 <= metrics["acc_norm"] <= 1.0
    assert not model.training


def test_zero_shot_unknown_task_is_clear(model, tokenizer, tmp_path):
    pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install 'rotsparse[eval]')")
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        zero_shot(model, tokenizer, ["no_such_task"], include_path=local_task_dir(tmp_path),
                  include_defaults=False)


def test_zero_shot_without_lm_eval_explains_install(model, tokenizer, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r"pip install 'rotsparse\[eval\]'"):
        zero_shot(model, tokenizer, ["piqa"])


def test_mean_loss_is_the_mean_next_token_cross_entropy():
    from rotsparse.evaluation import mean_loss
    from tiny_models import random_tokens, tiny_model

    model = tiny_model("llama")
    tokens = random_tokens(num_sequences=3, length=20)
    with torch.no_grad():
        logits = model(tokens).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert abs(mean_loss(model, tokens) - expected.item()) < 1e-5
    with pytest.raises(ValueError, match="shape"):
        mean_loss(model, tokens[:, :1])
