"""The `rotsparse` command: its numbers equal the Python API's, errors are clear, --help works."""

import json

import pytest

import rotsparse
from rotsparse.cli import _sparsify_settings, build_parser, config_from_args, main
from rotsparse.config import SparsifyConfig
from rotsparse.data import load_texts
from rotsparse.evaluation import perplexity
from rotsparse.models import load_model

from tiny_models import tiny_model, tiny_tokenizer

TEXT = "\n\n".join(
    f"Paragraph {i}: the interpreter reads a line, splits it into tokens and evaluates the expression "
    f"named {i * 7} before it prints the result and waits for the next statement." for i in range(60)
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", num_layers=2)
    tokenizer = tiny_tokenizer(vocab_size=model.config.vocab_size)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("texts")
    calibration, evaluation = directory / "calibration.txt", directory / "evaluation.txt"
    calibration.write_text(TEXT)
    evaluation.write_text(TEXT.replace("interpreter", "compiler"))
    return calibration, evaluation


def last_json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


SMALL = ["--num-sequences", "2", "--calibration-seqlen", "128", "--seqlen", "128"]


@pytest.mark.parametrize("method", ["larosa", "topk"])
def test_eval_numbers_equal_the_python_api(tiny_dir, text_files, capsys, method):
    calibration, evaluation = text_files
    code = main(["eval", "--model", str(tiny_dir), "--sparsity", "0.4", "--method", method,
                 "--calibration", str(calibration), "--data", str(evaluation), *SMALL, "--json"])
    assert code == 0
    record = last_json_line(capsys)
    model, tokenizer = load_model(str(tiny_dir))
    texts = load_texts(str(evaluation), part="evaluation")
    dense = perplexity(model, tokenizer, texts, seqlen=128, progress=False)
    rotsparse.sparsify(model, tokenizer, sparsity=0.4, method=method, calibration=str(calibration),
                       num_sequences=2, sequence_length=128, progress=False)
    sparse = perplexity(model, tokenizer, texts, seqlen=128, progress=False)
    assert record["dense_ppl"] == dense.ppl
    assert record["sparse_ppl"] == sparse.ppl
    assert record["ppl_gap"] == sparse.ppl - dense.ppl
    assert record["effective_sparsity"] == model.rotsparse_plan.effective_sparsity
    assert record["eval_tokens"] == sparse.tokens
    assert record["method"] == method and record["sparsity"] == 0.4
    assert record["calibration_tokens"] == model.rotsparse_plan.calibration_tokens
    assert record["calibration_tokens"] == (0 if method == "topk" else 2 * 128)


def test_sparsify_writes_a_loadable_directory_that_eval_accepts(tiny_dir, text_files, tmp_path, capsys):
    calibration, evaluation = text_files
    out = tmp_path / "sparse"
    assert main(["sparsify", "--model", str(tiny_dir), "--sparsity", "0.5", "--calibration", str(calibration),
                 "--num-sequences", "2", "--calibration-seqlen", "128", "--out", str(out)]) == 0
    restored = rotsparse.load(out)
    assert abs(restored.rotsparse_plan.effective_sparsity - 0.5) < 0.02
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(evaluation), "--seqlen", "128", "--json"]) == 0
    record = last_json_line(capsys)
    assert record["dense_ppl"] is None and record["sparse_ppl"] > 1


def test_bad_input_gives_a_clear_error_and_exit_code_2(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", "--model", str(tiny_dir), "--sparsity", "0.4", "--data", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--sparsity", "1.2", "--data", str(empty)]) == 2
    assert main(["eval", "--model", str(tmp_path / "nope"), "--sparsity", "0.4"]) == 2
    assert "not found" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for command in ("run", "sparsify", "eval", "bench", "recover"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "--" in capsys.readouterr().out


def test_bench_on_a_synthetic_shape_reports_speed_and_bytes_limit(capsys):
    assert main(["bench", "--model", "synthetic:llama2-7b", "--layers", "1", "--dtype", "float32",
                 "--sparsity", "0.5", "--tokens", "2", "--repeats", "1", "--json"]) == 0
    record = last_json_line(capsys)
    for key in ("dense_ms_per_token", "sparse_ms_per_token", "speedup", "effective_sparsity",
                "bytes_limit_speedup", "dtype", "kernel_dense_ms_per_token", "speedup_vs_kernel_dense",
                "kernel_dense_layers_ms_per_token", "layers_speedup_vs_kernel_dense"):
        assert key in record
    assert record["layers_speedup_vs_kernel_dense"] > 0
    assert record["dtype"] == "float32" and record["layers"] == 1
    assert abs(record["effective_sparsity"] - 0.5) < 0.01
    assert 1.0 < record["bytes_limit_speedup"] < 2.0


def test_bench_batch_size_decodes_several_sequences(capsys):
    assert main(["bench", "--model", "synthetic:llama2-7b", "--layers", "1", "--dtype", "float32",
                 "--sparsity", "0.5", "--tokens", "2", "--repeats", "1", "--batch-size", "3", "--json"]) == 0
    record = last_json_line(capsys)
    assert record["batch_size"] == 3 and record["speedup"] > 0 and record["speedup_vs_kernel_dense"] > 0
    assert record["bytes_limit_speedup"] is None  # a batch reads the union of its tokens' kept rows
    assert main(["bench", "--model", "synthetic:llama2-7b", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_synthetic_structure_places_residual_adapters_every_g_layers():
    """The bench's stand-in for a rotated model: a d x d adapter after every G-th layer but the last (G = 1:
    after every layer, the worst case), none for topk; the function's weights are untouched."""
    from rotsparse.bench import structural_sparse_copy
    from rotsparse.runtime import ROTATION_BUFFER

    dense = tiny_model("llama", num_layers=5)
    for method, every, expected in (("larosa", 1, [0, 1, 2, 3]), ("larosa", 2, [1, 3]), ("auto", 5, []),
                                    ("auto", 3, [2]), ("topk", 1, [])):
        model = structural_sparse_copy(dense, SparsifyConfig(sparsity=0.5, method=method), adapter_every=every)
        assert [i for i, layer in enumerate(model.model.layers) if hasattr(layer, ROTATION_BUFFER)] == expected
    with pytest.raises(ValueError, match="adapter_every"):
        structural_sparse_copy(dense, SparsifyConfig(sparsity=0.5), adapter_every=0)


def test_check_sequences_reach_the_config():
    parser = build_parser()
    for argv, expected in (([], 2), (["--check-sequences", "0"], 0)):
        args = parser.parse_args(["sparsify", "--model", "m", "--sparsity", "0.4", "--out", "o", *argv])
        settings = _sparsify_settings(args)
        assert SparsifyConfig(**{k: v for k, v in settings.items() if k != "calibration"}).check_sequences == expected


def test_every_subcommand_takes_the_config_flags_with_the_config_defaults(capsys):
    """The SparsifyConfig / AutoOptions flags are generated from the dataclasses: the same on every subcommand,
    and a flag not given leaves the config's own default."""
    parser = build_parser()
    required = {"sparsify": ["--out", "o"], "recover": ["--steps", "1", "--out", "o"]}
    for command in ("run", "sparsify", "eval", "bench", "recover"):
        args = parser.parse_args([command, *required.get(command, []), "--json", "-q"])
        assert config_from_args(args) == SparsifyConfig() and args.json and args.quiet
        args = parser.parse_args([command, *required.get(command, []), "--method", "larosa", "--seed", "3",
                                  "--site-coefficients", "1", "1", "2", "2", "--no-l2-rescale", "-vv"])
        assert config_from_args(args) == SparsifyConfig(method="larosa", seed=3, site_coefficients=(1, 1, 2, 2))
        assert args.verbose == 2
    args = parser.parse_args(["eval", "--auto-rotations", "identity", "pca", "--no-auto-per-reader"])
    assert config_from_args(args).options == rotsparse.AutoOptions(rotations=("identity", "pca"), per_reader=False)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--version"])
    assert exit_info.value.code == 0 and rotsparse.__version__ in capsys.readouterr().out
