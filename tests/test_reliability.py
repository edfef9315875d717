"""save/load never lose data and never trust the files: failures at every stage of save leave the target as it
was; bad folders are refused before any weight is read, with the error class and the offending file/tensor."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import rotsparse
import rotsparse.hf_quantizer
import rotsparse.io
from rotsparse.cli import main
from rotsparse.io import CheckpointError, load, save
from rotsparse.runtime import ROTATION_BUFFER

from tiny_models import random_tokens, tiny_model, tiny_tokenizer

ROTATION = f"model.layers.0.{ROTATION_BUFFER}"


def sparsified(family="llama", method="larosa"):
    return rotsparse.sparsify(tiny_model(family), sparsity=0.5, method=method, calibration=random_tokens(seed=3),
                              progress=False)


def same_logits(first, second):
    """Equal logits, both run with eager attention (the tiny models run eager, loaded ones sdpa, whose roundings
    differ in the last bits and can flip a near-tie at a Top-K threshold)."""
    for model in (first, second):
        model.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(first(random_tokens()).logits, second(random_tokens()).logits, atol=1e-5,
                                   rtol=1e-5)


def snapshot(folder) -> dict:
    """Relative path -> bytes of every file under `folder` (hidden ones included)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def previous(tmp_path):
    """A folder holding an earlier saved model (the only entry of its parent)."""
    target = tmp_path / "out"
    save(sparsified(method="topk"), target)
    return target


# save: refusals and atomic replacement ------------------------------------------------------------

def test_refuses_non_empty_folder_file_and_source_folder(tmp_path, previous):
    model = sparsified()
    before = snapshot(previous)
    with pytest.raises(FileExistsError, match=f"{previous} is not empty; pass overwrite=True"):
        save(model, previous)
    a_file = tmp_path / "weights.bin"
    a_file.write_text("keep me")
    with pytest.raises(FileExistsError, match=f"{a_file} is a file"):
        save(model, a_file)
    source = tmp_path / "dense"
    tiny_model("llama").save_pretrained(source)
    from_source = rotsparse.sparsify(AutoModelForCausalLM.from_pretrained(source), sparsity=0.5, method="topk",
                                     progress=False)
    source_before = snapshot(source)
    with pytest.raises(FileExistsError, match=f"{source} is the folder this model was loaded from"):
        save(from_source, source)
    assert snapshot(previous) == before and a_file.read_text() == "keep me" and snapshot(source) == source_before
    (tmp_path / "empty").mkdir()
    save(model, tmp_path / "empty")  # an existing empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dense", "empty", "out", "weights.bin"]


def test_overwrite_replaces_the_folder_whole(previous):
    stale = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    for name in stale:
        (previous / name).write_text("stale")
    model = sparsified()
    save(model, previous, overwrite=True)
    assert sorted(path.name for path in previous.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert [path.name for path in previous.parent.iterdir()] == ["out"]  # no staging folder left
    same_logits(load(previous), model)


def test_overwrite_replaces_a_file_and_the_source_folder(tmp_path):
    a_file = tmp_path / "model"
    a_file.write_text("old")
    save(sparsified(), a_file, overwrite=True)
    assert (a_file / "model.safetensors").is_file()
    source = tmp_path / "dense"
    tiny_model("llama").save_pretrained(source)
    model = rotsparse.sparsify(AutoModelForCausalLM.from_pretrained(source), sparsity=0.5, method="larosa",
                               calibration=random_tokens(seed=3), progress=False)
    save(model, source, overwrite=True)
    same_logits(load(source), model)


def fail(*args, **kwargs):
    raise OSError("disk full (injected)")


def second_replace_fails(monkeypatch):
    """os.replace works once (the old folder moved aside) and fails on the staging -> target rename."""
    calls = []
    real = os.replace

    def replace(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise OSError("rename failed (injected)")
        return real(source, destination)

    monkeypatch.setattr(rotsparse.io.os, "replace", replace)


STAGES = {
    "weights": lambda model, tokenizer, monkeypatch: monkeypatch.setattr(model, "save_pretrained", fail),
    "tokenizer": lambda model, tokenizer, monkeypatch: monkeypatch.setattr(tokenizer, "save_pretrained", fail),
    "model card": lambda model, tokenizer, monkeypatch: monkeypatch.setattr(rotsparse.io, "model_card", fail),
    "rename": lambda model, tokenizer, monkeypatch: second_replace_fails(monkeypatch),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_failure_at_any_stage_leaves_the_target_as_it_was(previous, monkeypatch, stage):
    model, tokenizer = sparsified(), tiny_tokenizer()
    before = snapshot(previous)
    STAGES[stage](model, tokenizer, monkeypatch)
    with pytest.raises(OSError, match="injected"):
        save(model, previous, tokenizer, overwrite=True)
    assert snapshot(previous) == before
    assert [path.name for path in previous.parent.iterdir()] == ["out"]


@pytest.mark.parametrize("stage", ["weights", "tokenizer", "model card"])
def test_a_failure_leaves_no_new_folder(tmp_path, monkeypatch, stage):
    model, tokenizer = sparsified(), tiny_tokenizer()
    STAGES[stage](model, tokenizer, monkeypatch)
    with pytest.raises(OSError, match="injected"):
        save(model, tmp_path / "new", tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_only_safetensors_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", fail)  # pickle-based writing would call torch.save
    directory = save(sparsified(), tmp_path / "out", tiny_tokenizer())
    assert not list(directory.glob("*.bin")) and (directory / "model.safetensors").is_file()


# load: bad folders --------------------------------------------------------------------------------

def edit_tensors(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory, change):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def orthogonal(size=64, seed=0):
    return torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed)))[0].contiguous()


def drop_residual_bases(config):
    config["rotsparse"].pop("residual_bases")


def set_keep_k(config):
    config["rotsparse"]["keep_k"][0][0] = 10_000


BAD = {  # name: (method, tensors change, config change, error class, message pattern)
    "missing rotation": ("larosa", lambda t: t.pop(ROTATION), None, CheckpointError,
                         rf"missing rotation tensor {ROTATION}: the plan"),
    "extra rotation on an unlisted layer": (
        "larosa", lambda t: t.update({f"model.layers.1.{ROTATION_BUFFER}": orthogonal()}), None, CheckpointError,
        rf"model.safetensors: unexpected rotation tensor model.layers.1.{ROTATION_BUFFER}"),
    "rotation in a plan without rotations": (
        "topk", lambda t: t.update({ROTATION: orthogonal()}), None, CheckpointError,
        rf"model.safetensors: unexpected rotation tensor {ROTATION}"),
    "wrong shape": ("larosa", lambda t: t.update({ROTATION: orthogonal()[:, :32].contiguous()}), None,
                    CheckpointError, rf"model.safetensors: rotation tensor {ROTATION} has shape \(64, 32\)"),
    "not orthogonal": ("larosa", lambda t: t.update({ROTATION: 1.1 * orthogonal()}), None, CheckpointError,
                       rf"model.safetensors: rotation tensor {ROTATION} is not orthogonal"),
    "NaN": ("larosa", lambda t: t[ROTATION].view(-1).__setitem__(5, float("nan")), None, CheckpointError,
            rf"model.safetensors: rotation tensor {ROTATION} holds NaN"),
    "legacy plan, not orthogonal": ("larosa", lambda t: t.update({ROTATION: 2 * orthogonal()}), drop_residual_bases,
                                    CheckpointError, rf"rotation tensor {ROTATION} is not orthogonal"),
    "weight of the wrong shape": (
        "larosa", lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 64)}), None,
        CheckpointError, r"model.safetensors: model.layers.1.mlp.up_proj.weight has shape \(3, 64\)"),
    "unknown format version": ("topk", None, lambda c: c["rotsparse"].update(format_version=99), CheckpointError,
                               r"config.json: rotsparse format version 99 is not supported"),
    "malformed plan": ("topk", None, lambda c: c["rotsparse"].pop("keep_k"), CheckpointError,
                       r"config.json: malformed rotsparse plan: KeyError: 'keep_k'"),
    "plan is not an object": ("topk", None, lambda c: c.update(rotsparse=[1, 2]), CheckpointError,
                              r"config.json: the 'rotsparse' section is list"),
    "K out of range": ("topk", None, set_keep_k, CheckpointError,
                       r"config.json: layer 0 site h1: K = 10000 is outside \[0, 64\]"),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("loader", ["rotsparse.load", "from_pretrained"])
def test_bad_folders_are_refused_naming_the_file_and_tensor(tmp_path, case, loader):
    method, change_tensors, change_config, error, message = BAD[case]
    directory = save(sparsified(method=method), tmp_path / "out")
    if change_tensors:
        edit_tensors(directory, change_tensors)
    if change_config:
        edit_config(directory, change_config)
    before = snapshot(directory)
    with pytest.raises(error, match=message):
        load(directory) if loader == "rotsparse.load" else AutoModelForCausalLM.from_pretrained(directory)
    assert snapshot(directory) == before


def test_gemma_post_norm_rotations_are_checked(tmp_path):
    directory = save(sparsified("gemma3_text"), tmp_path / "out")
    name = f"model.layers.1.post_feedforward_layernorm.{ROTATION_BUFFER}"
    assert name in load_file(directory / "model.safetensors")
    edit_tensors(directory, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing rotation tensor {name}"):
        load(directory)


def test_a_legacy_plan_without_residual_bases_still_loads(tmp_path):
    model = sparsified()
    directory = save(model, tmp_path / "out")
    edit_config(directory, drop_residual_bases)
    same_logits(load(directory), model)


def test_an_unknown_quantization_config_version_is_refused(tmp_path):
    directory = save(sparsified(method="topk"), tmp_path / "out")
    edit_config(directory, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(ValueError, match="rotsparse format version 99 is not supported"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_truncated_safetensors_is_named(tmp_path):
    directory = save(sparsified(), tmp_path / "out")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        load(directory)


def test_a_stray_pickle_file_is_never_read(tmp_path, monkeypatch):
    model = sparsified()
    directory = save(model, tmp_path / "out")
    torch.save({"model.embed_tokens.weight": torch.zeros(128, 64)}, directory / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", fail)
    same_logits(load(directory), model)
    same_logits(AutoModelForCausalLM.from_pretrained(directory), model)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        load(directory)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: rotsparse reads weights from .safetensors files"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_a_failed_load_changes_neither_the_folder_nor_the_logger(tmp_path, monkeypatch):
    directory = save(sparsified(), tmp_path / "out")
    before = snapshot(directory)
    logger = logging.getLogger("transformers")
    level = logger.level
    monkeypatch.setattr(rotsparse.hf_quantizer, "install_topk", fail)
    with pytest.raises(OSError, match="injected"):
        load(directory)
    assert snapshot(directory) == before and logger.level == level


# the command line ---------------------------------------------------------------------------------

@pytest.fixture
def dense_dir(tmp_path):
    directory = tmp_path / "dense"
    model = tiny_model("llama")
    model.save_pretrained(directory)
    tiny_tokenizer(vocab_size=model.config.vocab_size).save_pretrained(directory)
    return directory


def sparsify_cli(model, out, *extra):
    return main(["sparsify", "--model", str(model), "--sparsity", "0.5", "--method", "topk", "--out", str(out),
                 *extra])


def test_cli_refuses_to_overwrite_with_a_one_line_error(dense_dir, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    source_before = snapshot(dense_dir)
    for out, reason in ((occupied, "is not empty"), (dense_dir, "is the --model folder"), (a_file, "is a file")):
        assert sparsify_cli(dense_dir, out) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not progress bars
        assert len(errors) == 1 and errors[0].startswith(f"rotsparse sparsify: error: --out {out}: {reason}")
        assert "pass --overwrite" in errors[0]
    assert (occupied / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine"
    assert snapshot(dense_dir) == source_before
    assert sparsify_cli(dense_dir, occupied, "--overwrite") == 0
    assert not (occupied / "notes.txt").exists()
    assert isinstance(AutoModelForCausalLM.from_pretrained(occupied).model.layers[0].mlp.down_proj,
                      rotsparse.runtime.TopKLinear)
