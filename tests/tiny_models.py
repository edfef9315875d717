"""Tiny random models of every supported family, for fast mathematical tests."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig,
                          Olmo2Config, Phi3Config, PretrainedConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig,
                          SmolLM3Config)

import rotsparse

FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text", "qwen3", "smollm3", "olmo2", "phi3")
"""Families every method supports."""
MOE_FAMILIES = ("qwen3_moe", "mixtral")
"""Mixture-of-experts families (``topk`` only)."""


def tiny_config(family: str, num_layers: int = 2, hidden_size: int = 64, vocab_size: int = 128) -> PretrainedConfig:
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 16,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=True)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                                + ["sliding_attention"] * (num_layers % 2))
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # their defaults lie outside the tiny vocabulary
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if family == "smollm3":  # no RoPE in every other layer
        return SmolLM3Config(**common, **tokens, no_rope_layers=[int(i % 2 == 0) for i in range(num_layers)])
    if family == "olmo2":
        return Olmo2Config(**common, **tokens)
    if family == "phi3":
        return Phi3Config(**common, **tokens)
    if family == "qwen3_moe":  # the last layer a dense MLP (mlp_only_layers)
        return Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                              mlp_only_layers=[num_layers - 1] if num_layers > 1 else [])
    if family == "mixtral":
        return MixtralConfig(**common, **tokens, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kwargs):
    """A random model with non-trivial norm weights and biases, in float32 eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand_like(parameter) + 0.5 if family != "gemma3_text"
                                else torch.rand_like(parameter) - 0.5)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model.eval()


def random_tokens(vocab_size: int = 128, num_sequences: int = 4, length: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, length), generator=generator)


def distinct_token(n_in: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """One token whose magnitudes are distinct in `dtype` (no ties at the Top-K threshold)."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = 1 + torch.randperm(n_in, generator=generator).float() / 8  # multiples of 1/8 below 2^5: exact
    signs = torch.randint(0, 2, (n_in,), generator=generator).float() * 2 - 1
    return (magnitudes * signs).to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||."""
    return ((actual - expected).norm() / expected.norm()).item()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits (n, seq, vocab) for token ids (n, seq), without gradients."""
    with torch.no_grad():
        return model(tokens).logits


def invariance_error(model, **sparsify_settings) -> float:
    """Relative logit error of `model` sparsified in place at sparsity 0 (calibrated on `random_tokens(seed=7)`)
    against the model before, on `random_tokens()`: ~0 when every fold is exact."""
    tokens = random_tokens()
    expected = logits(model, tokens)
    rotsparse.sparsify(model, sparsity=0.0, calibration=random_tokens(seed=7), progress=False, **sparsify_settings)
    return relative_error(logits(model, tokens), expected)


def generated_and_stepwise(model, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate` (KV cache, decode kernels) of `steps` tokens after a random 10-token prompt, and the same
    greedy tokens computed step by step on the whole sequence without a cache: equal when decoding is right."""
    prompt = random_tokens(num_sequences=1, length=10)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=steps, do_sample=False, pad_token_id=0)
        sequence = prompt
        for _ in range(steps):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return generated, sequence


def tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained in memory on the embedded corpus (no files, no network)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator([topics[key] for key in sorted(topics)[:40]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
