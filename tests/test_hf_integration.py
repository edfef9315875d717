"""A saved sparse model is a Hugging Face checkpoint: from_pretrained, pipeline and lm-eval build the sparse model
that `rotsparse.load` builds; plain transformers (rotsparse not imported) does not silently hand back another."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import rotsparse
from rotsparse import RotsparseConfig
from rotsparse.data import DatasetText, load_texts
from rotsparse.runtime import ROTATION_BUFFER, KernelLinear, TopKLinear

from test_offload import mixed_map
from tiny_models import FAMILIES, random_tokens, tiny_model, tiny_tokenizer

PROBE = random_tokens(num_sequences=2, length=16, seed=7)


def sparsified(family: str, method: str, sparsity: float = 0.5, **kwargs):
    return rotsparse.sparsify(tiny_model(family, **kwargs), sparsity=sparsity, method=method,
                              calibration=random_tokens(seed=3), progress=False)


def logits(model, tokens=PROBE):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, method) -> (in-memory sparse model, its saved folder), built once per pair."""
    cache = {}

    def get(family: str, method: str):
        if (family, method) not in cache:
            model = sparsified(family, method)
            directory = rotsparse.save(model, tmp_path_factory.mktemp(f"{family}-{method}") / "sparse")
            cache[family, method] = model, directory
        return cache[family, method]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["topk", "larosa", "auto"])
def test_from_pretrained_builds_what_load_builds(saved, family, method):
    model, directory = saved(family, method)
    loaded = rotsparse.load(directory)
    plain = AutoModelForCausalLM.from_pretrained(directory)
    assert torch.equal(logits(plain), logits(loaded))
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=1e-5)
    assert plain.rotsparse_plan == loaded.rotsparse_plan == model.rotsparse_plan
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert isinstance(plain.model.layers[0].mlp.down_proj, TopKLinear) and isinstance(plain.lm_head, KernelLinear)
    assert [m.keep_k for m in plain.modules() if isinstance(m, TopKLinear)] == \
        [m.keep_k for m in model.modules() if isinstance(m, TopKLinear)]
    expected, actual = model.state_dict(), plain.state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    if method != "auto":  # auto may pick one shared basis for these tiny layers: then no rotation tensor
        assert any(key.endswith(ROTATION_BUFFER) for key in actual) == (method == "larosa")
    assert not plain.training


@pytest.mark.parametrize("family,method", [("llama", "larosa"), ("gemma3_text", "auto")])
def test_device_maps_give_the_same_model(tmp_path, family, method):
    model = sparsified(family, method, num_layers=4)
    directory = rotsparse.save(model, tmp_path / "sparse")
    reference = logits(rotsparse.load(directory))
    on_cpu = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")
    assert torch.equal(logits(on_cpu), reference)
    device_map = mixed_map(model)
    assert "disk" in device_map.values()
    offloaded = AutoModelForCausalLM.from_pretrained(directory, device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really on disk
    torch.testing.assert_close(logits(offloaded), reference, atol=1e-5, rtol=1e-5)
    assert offloaded.rotsparse_plan == model.rotsparse_plan


def test_saved_config_points_transformers_at_rotsparse(saved):
    model, directory = saved("llama", "larosa")
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "rotsparse", "format_version": 1,
                                             "plan_key": "rotsparse"}
    assert config["rotsparse"] == json.loads(json.dumps(model.rotsparse_plan.to_dict()))  # options' tuples: lists
    assert sorted(path.name for path in directory.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors"]


PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys, warnings
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_warning()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print(json.dumps({"q_proj": type(model.model.layers[0].self_attn.q_proj).__name__,
                      "rotsparse_imported": "rotsparse" in sys.modules}))
""")


def test_plain_transformers_warns_that_it_ignores_rotsparse(saved, tmp_path):
    """Without `import rotsparse`, transformers loads the dense weights but logs a warning naming the unknown
    quantization method, and (rotated models) the rotation tensors it drops as unexpected."""
    _, directory = saved("llama", "larosa")
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(directory)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"q_proj": "Linear", "rotsparse_imported": False}
    assert "Unknown quantization type, got rotsparse" in result.stderr
    assert "we will skip the quantization" in result.stderr
    assert f"model.layers.0.{ROTATION_BUFFER}" in result.stderr and "UNEXPECTED" in result.stderr


def test_pipeline_generates_the_greedy_tokens_of_the_in_memory_model(tmp_path):
    from transformers import pipeline

    model = sparsified("llama", "larosa")
    tokenizer = tiny_tokenizer(vocab_size=model.config.vocab_size)
    directory = rotsparse.save(model, tmp_path / "sparse", tokenizer)
    prompt = "the interpreter reads a line and"
    generator = pipeline("text-generation", model=str(directory))
    assert isinstance(generator.model.model.layers[0].self_attn.q_proj, TopKLinear)
    text = generator(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(prompt_ids, max_new_tokens=12, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(expected[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert expected.shape[1] > prompt_ids.shape[1]


def test_lm_eval_pretrained_directory_equals_the_in_memory_model(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from rotsparse.evaluation import zero_shot
    from test_data import make_byte_tokenizer
    from test_evaluation import local_task_dir, tiny_llama

    tokenizer = make_byte_tokenizer()
    model = rotsparse.sparsify(tiny_llama(), sparsity=0.5, method="larosa", calibration=random_tokens(258, seed=3),
                               progress=False)
    directory = rotsparse.save(model, tmp_path / "sparse", tokenizer)
    tasks = local_task_dir(tmp_path)
    in_memory = zero_shot(model, tokenizer, ["rotsparse_tiny_facts"], include_path=tasks, include_defaults=False)
    output = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={directory},dtype=float32",
                                     tasks=["rotsparse_tiny_facts"], log_samples=False, device="cpu",
                                     task_manager=TaskManager(include_path=[str(tasks)], include_defaults=False))
    from_folder = {key.partition(",")[0]: value for key, value in output["results"]["rotsparse_tiny_facts"].items()
                   if isinstance(value, float)}
    for metric in ("acc", "acc_norm", "acc_stderr"):
        assert from_folder[metric] == in_memory["rotsparse_tiny_facts"][metric], metric


def test_topk_while_loading_equals_sparsify(tmp_path):
    dense = tiny_model("qwen2")
    dense.save_pretrained(tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense",
                                                  quantization_config=RotsparseConfig(method="topk", sparsity=0.4))
    expected = rotsparse.sparsify(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), sparsity=0.4,
                                  method="topk", progress=False)
    assert torch.equal(logits(loaded), logits(expected))
    assert loaded.rotsparse_plan == expected.rotsparse_plan
    again = AutoModelForCausalLM.from_pretrained(rotsparse.save(loaded, tmp_path / "sparse"))
    assert torch.equal(logits(again), logits(loaded))
    assert json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]["plan_key"] == \
        "rotsparse"


def test_rotsparse_config_round_trips_and_refuses_what_it_cannot_do():
    request = RotsparseConfig(method="topk", sparsity=0.3, block_size=8)
    again = RotsparseConfig.from_dict(request.to_dict())
    assert again.sparsify_config == request.sparsify_config
    assert request.sparsify_config == rotsparse.SparsifyConfig(method="topk", sparsity=0.3, block_size=8)
    assert RotsparseConfig.from_dict(RotsparseConfig().to_dict()).sparsify_config is None
    with pytest.raises(ValueError, match="cannot calibrate while loading"):
        RotsparseConfig(method="larosa", sparsity=0.4)
    with pytest.raises(ValueError, match="format version 7"):
        RotsparseConfig(format_version=7)
    with pytest.raises(ValueError, match="sparsity must be in"):
        RotsparseConfig(method="topk", sparsity=1.5)


def test_a_sparsify_request_on_a_sparse_folder_never_sparsifies_again(saved, tmp_path):
    """The folder's own quantization_config wins (transformers warns); a folder saved before
    quantization_config was written refuses the request."""
    model, directory = saved("llama", "topk")
    request = RotsparseConfig(method="topk", sparsity=0.2)
    with pytest.warns(UserWarning, match="The `quantization_config` from the model will be used"):
        loaded = AutoModelForCausalLM.from_pretrained(directory, quantization_config=request)
    assert loaded.rotsparse_plan == model.rotsparse_plan
    old = tmp_path / "old"
    old.mkdir()
    for path in directory.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(rotsparse.load(old)), logits(loaded))
    with pytest.raises(ValueError, match="is already sparsified by rotsparse"):
        AutoModelForCausalLM.from_pretrained(old, quantization_config=request)


def test_model_card_names_base_method_sparsity_metrics_and_usage(tmp_path):
    base = tmp_path / "base-model"
    tiny_model("llama").save_pretrained(base)
    model = rotsparse.sparsify(AutoModelForCausalLM.from_pretrained(base), sparsity=0.5, method="larosa",
                               calibration=random_tokens(seed=3), progress=False)
    directory = rotsparse.save(model, tmp_path / "sparse", metrics={"perplexity": 12.5})
    card = (directory / "README.md").read_text()
    plan = model.rotsparse_plan
    for expected in ("| base model | base-model |", "| method | larosa |", "| requested sparsity | 0.5000 |",
                     f"| effective sparsity | {plan.effective_sparsity:.4f} |",
                     f"| calibration tokens | {plan.calibration_tokens} |", "| perplexity | 12.5000 |",
                     "import rotsparse", "AutoModelForCausalLM.from_pretrained"):
        assert expected in card, expected
    assert str(tmp_path) not in card


def test_datasets_as_calibration_text(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"document {i} about interpreters and compilers" for i in range(5)]
    assert load_texts(datasets.Dataset.from_dict({"text": texts, "id": list(range(5))})) == texts
    data_file = tmp_path / "texts.jsonl"
    data_file.write_text("".join(json.dumps({"body": text}) + "\n" for text in texts))
    assert load_texts(DatasetText("json", data_files=str(data_file), column="body")) == texts
    with pytest.raises(ValueError, match="no 'text' column"):
        load_texts(DatasetText("json", data_files=str(data_file)))
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer(vocab_size=model.config.vocab_size)
    rotsparse.sparsify(model, tokenizer, sparsity=0.4, method="larosa", progress=False, num_sequences=2,
                       sequence_length=8, calibration=datasets.Dataset.from_dict({"text": texts * 4}))
    assert model.rotsparse_plan.calibration_tokens == 2 * 8
