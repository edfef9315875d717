"""Tests for rotsparse.data: text sources, the embedded split, token streams, calibration batches."""

from __future__ import annotations

import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rotsparse import data
from rotsparse.data import calibration_batch, embedded_texts, load_texts, token_stream


def make_byte_tokenizer(add_bos: bool = False):
    """A byte-level tokenizer (ids 0..255: the 256 byte symbols, 256 = <s>, 257 = </s>), built offline.

    With ``add_bos`` it puts <s> in front of every encoding, like Gemma's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 256)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture(scope="module")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    return make_byte_tokenizer(add_bos=True)


# --------------------------------------------------------------------------
# embedded corpus
# --------------------------------------------------------------------------


def test_embedded_split_is_deterministic_and_disjoint():
    from pydoc_data.topics import topics

    calibration = embedded_texts("calibration")
    evaluation = embedded_texts("evaluation")
    assert calibration == embedded_texts("calibration")
    assert evaluation == embedded_texts("evaluation")
    assert not set(calibration) & set(evaluation)
    assert len(calibration) + len(evaluation) == len(topics)
    keys = sorted(topics)
    assert evaluation == [topics[k] for i, k in enumerate(keys) if i % 5 == 2]


def test_embedded_evaluation_part_is_large_enough():
    # bytes are >= tokens for any real tokenizer; the parts are ~87k and ~26k BPE tokens
    evaluation_chars = sum(len(t) for t in embedded_texts("evaluation"))
    calibration_chars = sum(len(t) for t in embedded_texts("calibration"))
    assert evaluation_chars > 80_000
    assert calibration_chars > 3 * evaluation_chars


def test_load_texts_embedded_and_bad_part():
    assert load_texts("embedded", part="evaluation") == embedded_texts("evaluation")
    assert load_texts("embedded") == embedded_texts("calibration")
    with pytest.raises(ValueError, match="part must be"):
        load_texts("embedded", part="test")


# --------------------------------------------------------------------------
# local files and lists
# --------------------------------------------------------------------------


def test_load_texts_list_is_validated():
    assert load_texts(["a", "b"]) == ["a", "b"]
    with pytest.raises(TypeError, match="item 1 is int"):
        load_texts(["a", 3])
    with pytest.raises(ValueError, match="holds no text"):
        load_texts(["", "  "])


def test_load_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n", encoding="utf-8")
    assert load_texts(path) == ["first doc\nline two", "second doc", "third"]
    assert load_texts(str(path), part="evaluation") == load_texts(path)


def test_load_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert load_texts(path) == ["one", "two"]


def test_jsonl_missing_field_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: no \"text\" field"):
        load_texts(path)
    path.write_text('{"text": "one"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_texts(path)


def test_load_parquet(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"], "n": [1, 2]}), path)
    assert load_texts(path) == ["alpha", "beta"]
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["x"]}), other)
    with pytest.raises(ValueError, match=r"no \"text\" column \(columns: body\)"):
        load_texts(other)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file_is_an_error(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        load_texts(path)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_texts(missing)
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        load_texts("./no/such/dir")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported text file type '.csv'"):
        load_texts(path)


# --------------------------------------------------------------------------
# hub names (never touch the network)
# --------------------------------------------------------------------------


def test_hub_alias_arguments(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(**kwargs):
        calls.append(kwargs)
        return datasets.Dataset.from_dict({"text": ["", " = Title =", "body"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("wikitext2", part="evaluation") == ["", " = Title =", "body"]
    assert calls[-1] == {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    load_texts("wikitext2")
    assert calls[-1]["split"] == "train"
    load_texts("c4", part="evaluation")
    assert calls[-1]["path"] == "allenai/c4" and calls[-1]["split"] == "validation"


def test_hub_dataset_dict_split_and_text_column(monkeypatch):
    import datasets

    def fake_load_dataset(**kwargs):
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict({"text": ["train doc"]}),
            validation=datasets.Dataset.from_dict({"text": ["validation doc"]}),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("someone/corpus") == ["train doc"]
    assert load_texts("someone/corpus", part="evaluation") == ["validation doc"]
    monkeypatch.setattr(
        datasets, "load_dataset", lambda **kw: datasets.Dataset.from_dict({"body": ["x"]})
    )
    with pytest.raises(ValueError, match=r"no \"text\" column"):
        load_texts("someone/corpus")


def test_unreachable_hub_gives_clear_error(monkeypatch):
    import datasets

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"'wikitext2' cannot be downloaded \(offline\?\).*'embedded'"):
        load_texts("wikitext2", part="evaluation")


def test_unreachable_hub_real_offline_mode(monkeypatch):
    """The real datasets code path in offline mode (no network traffic at all)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-rotsparse-test-cache")
    with pytest.raises(ConnectionError, match="cannot be downloaded"):
        load_texts("rotsparse-test/no-such-dataset")


# --------------------------------------------------------------------------
# token stream and calibration batches
# --------------------------------------------------------------------------


def test_token_stream_joins_with_blank_line(byte_tokenizer):
    stream = token_stream(byte_tokenizer, ["ab", "c"])
    assert stream.dtype == torch.long and stream.shape == (5,)
    assert byte_tokenizer.decode(stream) == "ab\n\nc"


def test_token_stream_max_tokens_matches_full_prefix(byte_tokenizer):
    texts = embedded_texts("evaluation")
    full = token_stream(byte_tokenizer, texts[:3])
    capped = token_stream(byte_tokenizer, texts[:3], max_tokens=1000)
    assert torch.equal(capped, full[:1000])


def test_bos_follows_tokenizer(byte_tokenizer, bos_tokenizer):
    assert data.bos_token_id(byte_tokenizer) is None
    assert data.bos_token_id(bos_tokenizer) == 256
    assert data.bos_token_id(byte_tokenizer, add_bos=True) == 256
    assert data.bos_token_id(bos_tokenizer, add_bos=False) is None


def test_calibration_batch_shape_and_order(byte_tokenizer):
    texts = ["x" * 500, "y" * 500]
    batch = calibration_batch(byte_tokenizer, texts, num_sequences=3, sequence_length=100)
    assert batch.shape == (3, 100) and batch.dtype == torch.long
    stream = token_stream(byte_tokenizer, texts)
    assert torch.equal(batch.flatten(), stream[:300])


def test_calibration_batch_with_bos(bos_tokenizer):
    texts = ["z" * 1000]
    batch = calibration_batch(bos_tokenizer, texts, num_sequences=2, sequence_length=64)
    assert batch.shape == (2, 64)
    assert (batch[:, 0] == 256).all()
    stream = token_stream(bos_tokenizer, texts)
    assert torch.equal(batch[:, 1:].flatten(), stream[:126])


def test_calibration_batch_fewer_sequences_warns(byte_tokenizer):
    with pytest.warns(UserWarning, match="only 350 tokens: using 3 sequences of 100"):
        batch = calibration_batch(byte_tokenizer, ["a" * 350], num_sequences=8, sequence_length=100)
    assert batch.shape == (3, 100)


def test_calibration_batch_shorter_sequence_warns(byte_tokenizer):
    with pytest.warns(UserWarning, match="using 1 sequence of 300 tokens"):
        batch = calibration_batch(
            byte_tokenizer, ["a" * 300], num_sequences=4, sequence_length=2048, min_tokens=256
        )
    assert batch.shape == (1, 300)


def test_calibration_batch_too_short_and_empty(byte_tokenizer):
    with pytest.raises(ValueError, match="calibration text too short: 100 tokens, need at least 256"):
        calibration_batch(byte_tokenizer, ["a" * 100], sequence_length=2048)
    with pytest.raises(ValueError, match="calibration text is empty"):
        calibration_batch(byte_tokenizer, ["", "  "])


def test_calibration_batch_exact_fit_does_not_warn(byte_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = calibration_batch(byte_tokenizer, ["q" * 400], num_sequences=4, sequence_length=100)
    assert batch.shape == (4, 100)


def test_a_single_string_is_not_taken_as_documents(byte_tokenizer):
    with pytest.raises(TypeError, match="not a single string"):
        token_stream(byte_tokenizer, "abc")
    with pytest.raises(TypeError, match="not a single string"):
        calibration_batch(byte_tokenizer, "abc" * 200)


# --------------------------------------------------------------------------
# named offline domains
# --------------------------------------------------------------------------


def _available(name: str) -> bool:
    try:
        data.domain_texts(name, "evaluation")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(data.DOMAINS))
def test_domain_split_is_deterministic_and_disjoint(name):
    if not _available(name):
        pytest.skip(f"domain {name!r}: its files are not on this machine")
    data._split_domain.cache_clear()
    data._pydoc_split.cache_clear()
    calibration = data.domain_texts(name, "calibration")
    evaluation = data.domain_texts(name, "evaluation")
    data._split_domain.cache_clear()
    data._pydoc_split.cache_clear()
    assert calibration == data.domain_texts(name, "calibration")
    assert evaluation == data.domain_texts(name, "evaluation")
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    data.check_disjoint(calibration, evaluation)  # no shared paragraph of 40+ characters
    # bytes >= tokens: enough held-out text for a 4096-token evaluation
    assert sum(len(t) for t in evaluation) > 30_000
    assert load_texts(name, part="evaluation") == evaluation
    assert load_texts("domain:" + name, part="calibration") == calibration


def test_domain_parts_do_not_leak_into_each_other():
    # the default calibration text ("mixed") shares nothing with any domain's evaluation part
    mixed = data.domain_texts(data.DEFAULT_CALIBRATION, "calibration")
    for name in data.DOMAINS:
        if _available(name):
            data.check_disjoint(mixed, data.domain_texts(name, "evaluation"))
    assert not set(data.MIXED_DOMAINS) & {"licenses", "debian-docs", "translations"}


def test_mixed_interleaves_equal_shares():
    chunks = data._interleave([["a" * 10 + "\n\n" + "b" * 10], ["c" * 10, "d" * 10, "e" * 10]], chunk_chars=5)
    assert chunks == ["a" * 10, "c" * 10, "b" * 10, "d" * 10]


def test_check_disjoint_raises_on_shared_paragraph():
    shared = "x" * 50
    data.check_disjoint(["a\n\n" + "y" * 50], ["a\n\n" + shared])  # short paragraphs may repeat
    with pytest.raises(ValueError, match="also occur"):
        data.check_disjoint(["a\n\n" + shared], ["b\n\n" + shared + "\n\n"])


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown domain 'domain:nope'"):
        load_texts("domain:nope")
    with pytest.raises(ValueError, match="unknown domain"):
        data.domain_texts("nope", "evaluation")


def test_missing_domain_files_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(data, "_documents", lambda name: {})
    data._split_domain.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="needs files this machine does not have"):
            data.domain_texts("licenses", "calibration")
    finally:
        data._split_domain.cache_clear()
