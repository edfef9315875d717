"""Bad inputs, table-driven: the library refuses them before touching the model, with the exact error class and a
message naming the argument, file or tensor; the command prints one line to stderr (no traceback unless --debug)
and exits with 2 for usage errors and 1 for runtime errors. docs/reliability.md tabulates these rows."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import rotsparse
from rotsparse import cli, data, measure, models
from rotsparse.cli import json_safe, main
from rotsparse.config import AutoOptions, SparsifyConfig

from tiny_models import random_tokens, tiny_model, tiny_tokenizer

TOKENS = random_tokens(num_sequences=4, length=24, seed=3)


def state(model) -> tuple:
    return ({name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)},
            {name: type(m) for name, m in model.named_modules()}, model.config.to_dict(),
            hasattr(model, "rotsparse_plan"))


def assert_same(before: tuple, model) -> None:
    parameters, modules, config, plan = state(model)
    assert modules == before[1] and config == before[2] and plan == before[3] is False
    assert parameters.keys() == before[0].keys()
    assert all(torch.equal(parameters[name].nan_to_num(), value.nan_to_num()) for name, value in before[0].items())


def nan_weight(model):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 2] = float("nan")
    return model


def float64(model):
    return model.double()


def sparsified(model):
    return rotsparse.sparsify(model, method="topk", sparsity=0.3, progress=False)


# (id, model preparation or None, keyword arguments of sparsify, error class, text the message must contain)
LIBRARY = [
    ("sparsity above 1", None, dict(sparsity=1.4), ValueError, "sparsity"),
    ("sparsity NaN", None, dict(sparsity=float("nan")), ValueError, "sparsity"),
    ("sparsity bool", None, dict(sparsity=True), ValueError, "sparsity"),
    ("unknown method", None, dict(method="nope"), ValueError, "method 'nope'"),
    ("block size not dividing", None, dict(block_size=7), ValueError, "block_size 7"),
    ("negative block size", None, dict(block_size=-1), ValueError, "block_size"),
    ("no sequences", None, dict(num_sequences=0), ValueError, "num_sequences"),
    ("sequence length text", None, dict(sequence_length="2048"), ValueError, "sequence_length"),
    ("error tokens zero", None, dict(error_tokens=0), ValueError, "error_tokens"),
    ("check sequences text", None, dict(check_sequences="2"), ValueError, "check_sequences"),
    ("negative seed", None, dict(seed=-1), ValueError, "seed"),
    ("l2_rescale not bool", None, dict(l2_rescale="yes"), ValueError, "l2_rescale"),
    ("unknown activation", None, dict(mlp_activation="gelu"), ValueError, "mlp_activation"),
    ("three coefficients", None, dict(site_coefficients=(1, 2, 3)), ValueError, "site_coefficients"),
    ("options for a fixed method", None, dict(method="larosa", options=AutoOptions(scaling=True)), ValueError,
     "'larosa' has fixed options"),
    ("unknown rotation", None, dict(options={"rotations": ("spin",)}), ValueError, "rotation candidates"),
    ("unknown setting", None, dict(sparsityy=0.4), TypeError, "sparsityy"),
    ("config and settings", None, dict(config=SparsifyConfig(), sparsity=0.4), ValueError, "config="),
    ("config of the wrong type", None, dict(config={"sparsity": 0.4}), TypeError, "SparsifyConfig"),
    ("progress not bool", None, dict(progress="yes"), TypeError, "progress"),
    ("float token ids", None, dict(calibration=TOKENS.float()), ValueError, "calibration token ids"),
    ("1-D token ids", None, dict(calibration=TOKENS[0]), ValueError, "calibration token ids"),
    ("empty token ids", None, dict(calibration=TOKENS[:0]), ValueError, "calibration token ids"),
    ("token ids beyond the vocabulary", None, dict(calibration=TOKENS + 1000), ValueError, "[0, 128)"),
    ("calibration of the wrong type", None, dict(calibration=42), TypeError, "calibration"),
    ("text without a tokenizer", None, dict(calibration="embedded"), ValueError, "tokenizer"),
    ("missing calibration file", None, dict(calibration="./no-such-file.txt", tokenizer="tok"), FileNotFoundError,
     "no-such-file.txt"),
    ("NaN in a weight", nan_weight, {}, FloatingPointError, "model.layers.1.mlp.down_proj.weight"),
    ("float64 model", float64, {}, TypeError, "torch.float64"),
    ("already sparsified", sparsified, {}, RuntimeError, "already sparsified"),
]


@pytest.mark.parametrize("name,prepare,kwargs,error,text", LIBRARY, ids=[row[0] for row in LIBRARY])
def test_library_refuses_bad_inputs_before_touching_the_model(name, prepare, kwargs, error, text, monkeypatch):
    model = tiny_model("llama")
    if prepare is not None:
        model = prepare(model)
    touched = []
    monkeypatch.setattr(measure, "layerwise", lambda *args, **kw: touched.append(1) or iter(()))
    kwargs = dict(kwargs)
    if kwargs.get("tokenizer") == "tok":
        kwargs["tokenizer"] = tiny_tokenizer()
    kwargs.setdefault("calibration", TOKENS)
    if "config" not in kwargs:
        kwargs.setdefault("progress", False)
    before = None if name == "already sparsified" else state(model)
    with pytest.raises(error) as info:
        rotsparse.sparsify(model, **kwargs)
    assert type(info.value) is error
    assert text in str(info.value)
    assert not touched
    if before is not None:
        assert_same(before, model)


def test_an_unsupported_family_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="model_type='gpt2'"):
        rotsparse.sparsify(model, calibration=TOKENS % 64, progress=False)


def test_calibrated_from_another_method_or_depth_is_refused():
    model = tiny_model("llama")
    calibrated = rotsparse.calibrate(model, calibration=TOKENS, config=SparsifyConfig(error_tokens=32), progress=False)
    with pytest.raises(ValueError, match="calibrated for method 'auto', asked for 'larosa'"):
        rotsparse.sparsify(model, method="larosa", calibrated=calibrated, progress=False)
    with pytest.raises(ValueError, match="calibrated has 2 layers, the model 3"):
        rotsparse.sparsify(tiny_model("llama", num_layers=3), calibrated=calibrated, progress=False)


# text and model sources -------------------------------------------------------------------------------------

def test_text_files_without_suffix_or_named_raw_are_text_and_bad_bytes_name_the_file(tmp_path):
    plain = tmp_path / "README"
    plain.write_text("first document\n\nsecond document\n")
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" = Title = \n\n text of the article \n")
    assert data.load_texts(str(plain)) == ["first document", "second document"]
    assert data.load_texts(str(raw)) == [" = Title = ", " text of the article "]
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text"):
        data.load_texts(str(latin))


@pytest.mark.parametrize("spec", ["./missing-model", "~/missing-model", "owner/name/extra", "weights.safetensors",
                                  "model.gguf", "/abs/missing"])
def test_local_looking_model_paths_are_never_sent_to_the_hub(spec, monkeypatch):
    monkeypatch.setattr(models, "_load_hub", lambda *args: pytest.fail("sent to the hub"))
    with pytest.raises(FileNotFoundError, match="missing|extra|weights.safetensors|model.gguf"):
        models.load_model(spec)


def test_offline_hub_ids_fail_fast_and_name_the_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_load_hub", lambda *args: pytest.fail("looked up"))
    with pytest.raises(ConnectionError, match="'nobody/no-such-model'.*HF_HUB_OFFLINE"):
        models.load_model("nobody/no-such-model")


# the command ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad-inputs")
    model = tiny_model("llama")
    good = directory / "model"
    model.save_pretrained(good)
    tiny_tokenizer().save_pretrained(good)
    truncated = directory / "truncated"
    model.save_pretrained(truncated)
    tiny_tokenizer().save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (directory / "empty.txt").write_text("")
    (directory / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (directory / "notes").write_text("plain text without a suffix\n\nand a second document of text\n" * 40)
    (directory / "a-file").write_text("x")
    (directory / "table.csv").write_text("text\nx\n")
    return directory


def cli_rows():
    cuda = torch.cuda.is_available()
    rows = [  # (id, argv with {dir} for the files folder, exit code, text on the one stderr line)
        ("sparsity above 1", ["eval", "--model", "{dir}/model", "--sparsity", "1.4"], 2, "--sparsity"),
        ("negative block size", ["eval", "--model", "{dir}/model", "--block-size", "-2"], 2, "--block-size"),
        ("block size not dividing", ["eval", "--model", "{dir}/model", "--block-size", "7"], 2, "--block-size 7"),
        ("unknown method", ["eval", "--model", "{dir}/model", "--method", "nope"], 2, "--method"),
        ("unknown flag", ["eval", "--bogus"], 2, "--bogus"),
        ("unknown rotation", ["eval", "--model", "{dir}/model", "--auto-rotations", "spin"], 2, "--auto-rotations"),
        ("zero seqlen", ["eval", "--model", "{dir}/model", "--seqlen", "0"], 2, "--seqlen"),
        ("missing model folder", ["eval", "--model", "{dir}/nope", "--sparsity", "0.4"], 2, "nope"),
        ("missing relative model", ["eval", "--model", "./nope-model", "--sparsity", "0.4"], 2, "./nope-model"),
        ("missing .safetensors model", ["eval", "--model", "nope.safetensors"], 2, "nope.safetensors"),
        ("a file as model", ["eval", "--model", "{dir}/a-file"], 2, "a-file"),
        ("unknown synthetic model", ["bench", "--model", "synthetic:gpt5"], 2, "synthetic:gpt5"),
        ("missing data file", ["eval", "--model", "{dir}/model", "--data", "{dir}/nope.txt"], 2, "nope.txt"),
        ("empty data file", ["eval", "--model", "{dir}/model", "--data", "{dir}/empty.txt"], 2, "empty.txt"),
        ("non-UTF-8 data file", ["eval", "--model", "{dir}/model", "--data", "{dir}/latin1.txt"], 2, "latin1.txt"),
        ("unsupported data suffix", ["eval", "--model", "{dir}/model", "--data", "{dir}/table.csv"], 2, "table.csv"),
        ("missing calibration file", ["sparsify", "--model", "{dir}/model", "--out", "{dir}/o",
                                      "--calibration", "./nope.jsonl"], 2, "nope.jsonl"),
        ("--out under a file", ["sparsify", "--model", "{dir}/model", "--out", "{dir}/a-file/out"], 2, "a-file"),
        ("--out is a file", ["sparsify", "--model", "{dir}/model", "--out", "{dir}/a-file"], 2, "a-file"),
        ("--out unwritable", ["sparsify", "--model", "{dir}/model", "--out", "/proc/rotsparse-out"], 2,
         "/proc/rotsparse-out"),
        ("truncated safetensors", ["eval", "--model", "{dir}/truncated", "--sparsity", "0.3", "--method", "topk",
                                   "--seqlen", "32", "--max-tokens", "64"], 1, "truncated"),
    ]
    if not cuda:
        rows.append(("--device cuda without CUDA", ["eval", "--model", "{dir}/model", "--device", "cuda"], 2,
                     "--device cuda"))
    rows.append(("bad device", ["eval", "--model", "{dir}/model", "--device", "gpu0"], 2, "--device gpu0"))
    return rows


CLI = cli_rows()


@pytest.mark.parametrize("name,argv,code,text", CLI, ids=[row[0] for row in CLI])
def test_the_command_prints_one_line_and_exits_with_the_right_code(name, argv, code, text, files, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    if code == 1:
        monkeypatch.undo()
    argv = [part.replace("{dir}", str(files)) for part in argv]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("rotsparse") and ": error: " in lines[-1], lines
    assert text.replace("{dir}", str(files)) in lines[-1]
    if code == 2:
        assert len(lines) == 1, lines


def test_debug_adds_the_traceback(files, capsys):
    assert main(["eval", "--model", str(files / "nope"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("rotsparse eval: error:")


def test_offline_hub_model_fails_fast_from_the_command(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--model", "nobody/no-such-model", "--sparsity", "0.4"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_json_is_strict_and_the_only_thing_on_stdout(files, capsys):
    assert main(["eval", "--model", str(files / "model"), "--data", str(files / "notes"), "--sparsity", "0.3",
                 "--method", "topk", "--seqlen", "32", "--max-tokens", "96", "--json", "-q"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0], parse_constant=lambda constant: pytest.fail(f"non-strict JSON: {constant}"))
    assert record["method"] == "topk" and record["data"] == str(files / "notes")
    assert json_safe({"a": float("nan"), "b": (float("inf"), 1.5), "c": torch.tensor(2.0)}) == \
        {"a": None, "b": [None, 1.5], "c": 2.0}


def test_offline_hub_dataset_fails_before_the_model_loads(files, monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    assert main(["eval", "--model", str(files / "model"), "--sparsity", "0.4",
                 "--data", "nobody/no-such-dataset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data nobody/no-such-dataset" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("raised,code,text", [(KeyboardInterrupt(), 130, "interrupted"),
                                              (RuntimeError("disk full"), 1, "RuntimeError: disk full"),
                                              (MemoryError(), 1, "MemoryError")])
def test_runtime_failures_are_one_line_with_exit_code_1(files, monkeypatch, capsys, raised, code, text):
    def fail(args):
        raise raised

    monkeypatch.setitem(cli.COMMANDS, "eval", fail)
    assert main(["eval", "--model", str(files / "model"), "--sparsity", "0.4"]) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [f"rotsparse eval: error: {text}"]
