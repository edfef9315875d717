"""Text sources for calibration and evaluation, and the token stream both use.

Sources (see :func:`load_texts`)
--------------------------------
* ``"embedded"`` -- CPython's own ``pydoc_data.topics`` (the prose behind
  ``help("topic")``, English, about 113k tokens with the SmolLM2 or Gemma-3
  tokenizer).  It ships with every Python, so calibration and a quick
  perplexity check work with no download at all.
* a named offline **domain** (:data:`DOMAINS`, :func:`domain_texts`), as
  ``"domain:NAME"`` or the plain name: ``"pydoc"`` (= ``"embedded"``),
  ``"python-code"``, ``"licenses"``, ``"debian-docs"``, ``"translations"``,
  and ``"mixed"`` (equal shares of ``"pydoc"`` and ``"python-code"``: the
  default calibration text, see :data:`DEFAULT_CALIBRATION`).  Each is split
  by document into disjoint calibration / evaluation parts.
* a ``list`` of strings, a local ``.txt`` / ``.jsonl`` / ``.parquet`` file,
* a hub dataset name: ``"wikitext2"``, ``"c4"``, or any name that
  ``datasets.load_dataset`` accepts (needs internet, or a local HF cache).

Embedded split rule
-------------------
The topics are sorted by key; topic number ``i`` (0-based, in that order)
belongs to the **evaluation** part when ``i % 5 == 2`` and to the
**calibration** part otherwise.  The two parts never share a topic.  On
Python 3.11 this gives 79 topics: 16 evaluation topics (about 26k tokens) and
63 calibration topics (about 87k tokens).  The offset 2 was picked because it
puts the evaluation part above 20k tokens (offsets 0 and 4 give 17k and 7k);
the split is deterministic for a given Python version, but the topic texts
themselves change between Python versions, so numbers measured on the
embedded corpus are comparable only on the same Python minor version.

Token stream
------------
Documents are joined with ``"\\n\\n"`` and tokenized once without special
tokens (:func:`token_stream`).  A beginning-of-sequence token is then put in
front of *every* calibration sequence and perplexity window when the
tokenizer adds one by itself (``add_bos=None``, the default: Gemma yes,
SmolLM2 no), so calibration activations and evaluation see the same kind of
inputs.  A sequence of length ``L`` is therefore ``[BOS] + L-1`` text tokens
with a BOS, or ``L`` text tokens without one.
"""

from __future__ import annotations

import functools
import gettext
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "DatasetText",
    "DEFAULT_CALIBRATION",
    "DOMAINS",
    "EMBEDDED_EVAL_EVERY",
    "EMBEDDED_EVAL_OFFSET",
    "HUB_ALIASES",
    "bos_token_id",
    "calibration_batch",
    "dataset_texts",
    "check_disjoint",
    "domain_texts",
    "embedded_texts",
    "is_dataset_source",
    "load_texts",
    "looks_local",
    "token_stream",
]

Part = Literal["calibration", "evaluation"]

#: Topic ``i`` of the sorted ``pydoc_data.topics`` is held out for evaluation
#: when ``i % EMBEDDED_EVAL_EVERY == EMBEDDED_EVAL_OFFSET``.
EMBEDDED_EVAL_EVERY = 5
EMBEDDED_EVAL_OFFSET = 2

#: Short hub names -> ``load_dataset`` arguments for each part.
HUB_ALIASES: dict[str, dict[str, dict]] = {
    "wikitext2": {
        "calibration": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train"},
        "evaluation": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"},
    },
    "c4": {
        "calibration": {
            "path": "allenai/c4",
            "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
            "split": "train",
        },
        "evaluation": {
            "path": "allenai/c4",
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            "split": "validation",
        },
    },
}

_TEXT_SUFFIXES = (".txt", ".raw", ".text", "")
"""Plain text (documents separated by blank lines); "" is an existing file without a suffix."""
_LOCAL_SUFFIXES = (".txt", ".raw", ".text", ".jsonl", ".parquet")
_PARTS = ("calibration", "evaluation")


# --------------------------------------------------------------------------
# embedded corpus
# --------------------------------------------------------------------------


def embedded_texts(part: Part = "calibration") -> list[str]:
    """Return one part of the embedded ``pydoc_data.topics`` corpus.

    Topics are sorted by key; topic ``i`` goes to ``"evaluation"`` when
    ``i % 5 == 2``, otherwise to ``"calibration"``.  Returns the topic texts
    in sorted-key order (one document per topic).
    """
    _check_part(part)
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held_out = [i % EMBEDDED_EVAL_EVERY == EMBEDDED_EVAL_OFFSET for i in range(len(keys))]
    want_eval = part == "evaluation"
    return [topics[key] for key, is_eval in zip(keys, held_out, strict=True) if is_eval == want_eval]


# --------------------------------------------------------------------------
# named offline domains
# --------------------------------------------------------------------------
#
# Every domain is a list of documents read from files the machine already has,
# each document keyed by its path (relative to its root).  Split rule: a
# document belongs to the evaluation part when crc32(key) % DOMAIN_EVAL_EVERY
# == DOMAIN_EVAL_OFFSET, else to the calibration part (stable when files are
# added or removed).  Documents are cut to DOMAIN_DOCUMENT_CHARS characters
# (so that a few thousand tokens span many documents) and ordered by a hash of
# their key (deterministic, and no part starts with one sub-topic).  Boilerplate
# repeated across documents (licence headers, GPL paragraphs) is dropped: a
# paragraph (block between blank lines) of 40+ characters is kept only in the
# first document, in key order, that has it, so the two parts share no such
# paragraph (`check_disjoint`).

#: Prefix that marks a domain name in :func:`load_texts` (plain names work too).
DOMAIN_PREFIX = "domain:"
DOMAIN_EVAL_EVERY = 5
DOMAIN_EVAL_OFFSET = 2
DOMAIN_DOCUMENT_CHARS = 6000

#: Named offline domains, and what each holds.
DOMAINS: dict[str, str] = {
    "pydoc": "CPython's pydoc_data.topics (English technical prose): the 'embedded' split, less the evaluation "
             "paragraphs that also occur in a calibration topic",
    "python-code": "the Python standard library's .py sources (code, comments, docstrings; tests excluded)",
    "licenses": "licence and copyright texts: /usr/share/common-licenses/*, /usr/share/doc/*/copyright (Debian), "
                "the Python install's LICENSE.txt",
    "debian-docs": "package documentation: README*, NEWS*, *.md / *.txt under /usr/share/doc (Debian; .gz read), "
                   "changelogs and copyright files excluded",
    "translations": "multilingual UI messages: the translated strings (msgstr) of every gettext catalogue "
                    "/usr/share/locale/*/LC_MESSAGES/*.mo (ISO code tables excluded), one document per catalogue",
    "mixed": "equal shares of 'pydoc' and 'python-code', interleaved in chunks (DEFAULT_CALIBRATION)",
}

#: The domains whose parts "mixed" interleaves.  Both ship with every Python, so the
#: default calibration text needs nothing else; "licenses", "debian-docs" and
#: "translations" stay out of it, so calibration on it can be evaluated out of domain.
MIXED_DOMAINS = ("pydoc", "python-code")
MIXED_CHUNK_CHARS = 2000

#: What calibration uses when the user gives no text (`rotsparse.sparsify(calibration=None)`).
DEFAULT_CALIBRATION = "mixed"


def domain_texts(name: str, part: Part = "calibration") -> list[str]:
    """One part of a named offline domain (:data:`DOMAINS`; ``"domain:NAME"`` or NAME).

    Deterministic for a given set of files on the machine; the calibration and evaluation parts share no
    document and no paragraph of 40+ characters.  Raises ValueError for an unknown name and FileNotFoundError
    when the domain's files are not on this machine.
    """
    _check_part(part)
    key = name[len(DOMAIN_PREFIX):] if name.startswith(DOMAIN_PREFIX) else name
    if key not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; choose one of {', '.join(DOMAINS)}")
    if key == "pydoc":
        return list(_pydoc_split()[0 if part == "calibration" else 1])
    if key == "mixed":
        return _interleave([domain_texts(domain, part) for domain in MIXED_DOMAINS], MIXED_CHUNK_CHARS)
    return list(_split_domain(key)[0 if part == "calibration" else 1])


def check_disjoint(calibration: Sequence[str], evaluation: Sequence[str], min_chars: int = 40) -> None:
    """Raise ValueError if an evaluation paragraph of `min_chars`+ characters (half of them letters or digits)
    also occurs in the calibration text (paragraphs: blocks between blank lines, whitespace-stripped)."""
    def substantial(paragraph: str) -> bool:  # rules of "=====" and the like do not count
        return len(paragraph) >= min_chars and sum(c.isalnum() for c in paragraph) >= min_chars // 2

    seen = {p for text in calibration for p in _paragraphs(text) if substantial(p)}
    shared = [p for text in evaluation for p in _paragraphs(text) if substantial(p) and p in seen]
    if shared:
        raise ValueError(f"{len(shared)} evaluation paragraphs also occur in the calibration text, e.g. "
                         f"{shared[0][:80]!r}")


def _paragraphs(text: str) -> list[str]:
    return [block.strip() for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]


def _interleave(parts: list[list[str]], chunk_chars: int) -> list[str]:
    """Round-robin chunks of about `chunk_chars` characters (cut at paragraph ends) from each list of
    documents, until the shortest list runs out: equal shares of every source at any prefix."""
    def chunks(texts):
        for text in texts:
            current = ""
            for paragraph in text.split("\n\n"):
                current = f"{current}\n\n{paragraph}" if current else paragraph
                if len(current) >= chunk_chars:
                    yield current
                    current = ""
            if current.strip():
                yield current

    streams = [chunks(texts) for texts in parts]
    out = []
    while True:
        row = [next(stream, None) for stream in streams]
        if any(chunk is None for chunk in row):
            return out
        out.extend(row)


def _documents(name: str) -> dict[str, str]:
    """key -> raw text of every document of a file-based domain found on this machine."""

    def read(path: Path) -> str:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8", errors="replace")

    documents: dict[str, str] = {}
    if name == "python-code":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.rglob("*.py")):
            relative = path.relative_to(stdlib).as_posix()
            if relative.startswith(("test/", "site-packages/", "dist-packages/", "lib2to3/tests/",
                                    "idlelib/idle_test/", "tkinter/test/")) or "/tests/" in relative:
                continue
            documents[relative] = read(path)
    elif name == "licenses":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        roots = [(Path("/usr/share/common-licenses"), "*"), (Path("/usr/share/doc"), "*/copyright")]
        for root, pattern in roots:
            if root.is_dir():
                for path in sorted(root.glob(pattern)):
                    if path.is_file():
                        documents[str(path)] = read(path)
        if (stdlib / "LICENSE.txt").is_file() and documents:
            documents[str(stdlib / "LICENSE.txt")] = read(stdlib / "LICENSE.txt")
    elif name == "debian-docs":
        root = Path("/usr/share/doc")
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                base = path.name.lower().removesuffix(".gz")
                if (path.is_file() and not path.is_symlink()
                        and (base.startswith(("readme", "news")) or base.endswith((".md", ".txt", ".rst")))
                        and "changelog" not in base and "copyright" not in base):
                    documents[path.relative_to(root).as_posix()] = read(path)
    elif name == "translations":

        root = Path("/usr/share/locale")
        if root.is_dir():
            for path in sorted(root.glob("*/LC_MESSAGES/*.mo")):
                if path.name.startswith("iso_"):  # ISO code tables: lists of names, not messages
                    continue
                try:
                    with path.open("rb") as handle:
                        catalog = gettext.GNUTranslations(handle)._catalog
                except Exception:  # a malformed catalogue is skipped, whatever gettext raises
                    continue
                strings = [value for msgid, value in sorted(catalog.items(), key=lambda item: str(item[0]))
                           if isinstance(value, str) and msgid and value.strip() and value != msgid]
                if strings:
                    documents[path.relative_to(root).as_posix()] = "\n".join(strings)
    return documents


@functools.lru_cache(maxsize=None)
def _pydoc_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The embedded split, with every paragraph of 40+ characters that also occurs in a calibration topic
    (grammar rules, shared examples) removed from the evaluation topics."""
    calibration = embedded_texts("calibration")
    seen = {p for text in calibration for p in _paragraphs(text) if len(p) >= 40}
    evaluation = []
    for text in embedded_texts("evaluation"):
        kept = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip() and not
                (len(p.strip()) >= 40 and p.strip() in seen)]
        if kept:
            evaluation.append("\n\n".join(kept))
    return tuple(calibration), tuple(evaluation)


def _order(key: str) -> str:

    return hashlib.sha1(key.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=None)
def _split_domain(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration, evaluation) documents of a file-based domain: paragraph-deduplicated in key order,
    cut to DOMAIN_DOCUMENT_CHARS, split by crc32 of the key, each part in hash order."""

    raw = _documents(name)
    if not raw:
        raise FileNotFoundError(f"domain {name!r} needs files this machine does not have ({DOMAINS[name]})")
    seen: set[str] = set()
    parts: tuple[list, list] = ([], [])
    for key in sorted(raw):
        kept, size = [], 0
        for paragraph in raw[key].replace("\r\n", "\n").split("\n\n"):
            if size >= DOMAIN_DOCUMENT_CHARS:
                break
            paragraph = paragraph.strip("\n")[: DOMAIN_DOCUMENT_CHARS - size]  # cut before comparing
            stripped = paragraph.strip()
            if not stripped:
                continue
            if len(stripped) >= 40:
                if stripped in seen:
                    continue
                seen.add(stripped)
            kept.append(paragraph)
            size += len(paragraph) + 2
        text = "\n\n".join(kept)
        if len(text.strip()) < 200 or text in seen:  # too little left, or a copy of an earlier document
            continue
        seen.add(text)
        held_out = zlib.crc32(key.encode("utf-8")) % DOMAIN_EVAL_EVERY == DOMAIN_EVAL_OFFSET
        parts[held_out].append((_order(key), text))
    return tuple(text for _, text in sorted(parts[0])), tuple(text for _, text in sorted(parts[1]))


# --------------------------------------------------------------------------
# load_texts
# --------------------------------------------------------------------------


def load_texts(source: str | os.PathLike | Sequence[str], part: Part = "calibration") -> list[str]:
    """Load documents from ``source`` as a list of strings.

    ``source`` is ``"embedded"`` (the given ``part``), a `DatasetText` or a
    ``datasets.Dataset`` (its ``"text"`` column; see `dataset_texts`), a list of strings
    (returned as a list after checking), a path to a ``.txt`` (documents
    separated by blank lines), ``.jsonl`` (a ``"text"`` field per line) or
    ``.parquet`` file (a ``"text"`` column), a named offline domain
    (``"domain:NAME"`` or NAME from :data:`DOMAINS`; the given ``part``), or a hub dataset name
    (``"wikitext2"``, ``"c4"`` or any ``datasets.load_dataset`` name; the
    ``part`` picks the train split for calibration and the test/validation
    split for evaluation).  Local files are the same for both parts.
    """
    _check_part(part)
    if is_dataset_source(source):
        return dataset_texts(source)
    if isinstance(source, (list, tuple)):
        return _check_text_list(source, origin="the given list")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"text source must be 'embedded', a path, a hub dataset name or a list of "
            f"strings, got {type(source).__name__}"
        )
    if isinstance(source, str) and source == "embedded":
        return embedded_texts(part)
    if isinstance(source, str) and (source.startswith(DOMAIN_PREFIX) or source in DOMAINS):
        return domain_texts(source, part)
    if _looks_local(source):
        return _load_local(Path(source).expanduser())
    return _load_hub(str(source), part)


@dataclass(frozen=True)
class DatasetText:
    """One column of one split of a ``datasets.load_dataset`` dataset, as a text source for `load_texts`.

    E.g. ``DatasetText("wikitext", name="wikitext-2-raw-v1", split="train")`` or, offline,
    ``DatasetText("json", data_files="texts.jsonl", column="body")``.
    """

    path: str
    name: str | None = None
    split: str = "train"
    column: str = "text"
    data_files: str | Sequence[str] | None = None


def is_dataset_source(source) -> bool:
    """Whether `source` is a `DatasetText` or a ``datasets.Dataset`` (checked without importing datasets: a
    Dataset can only exist once it is imported)."""
    datasets = sys.modules.get("datasets")
    return isinstance(source, DatasetText) or (datasets is not None and isinstance(source, datasets.Dataset))


def dataset_texts(source) -> list[str]:
    """The texts of a `DatasetText`, or of the ``"text"`` column of a ``datasets.Dataset``."""
    if isinstance(source, DatasetText):
        import datasets

        options = {"data_files": source.data_files} if source.data_files is not None else {}
        dataset = datasets.load_dataset(source.path, source.name, split=source.split, **options)
        column, origin = source.column, f"dataset {source.path!r} split {source.split!r}"
    else:
        dataset, column, origin = source, "text", "the given datasets.Dataset"
    if column not in dataset.column_names:
        raise ValueError(f"{origin} has no {column!r} column (columns: {', '.join(dataset.column_names)})")
    return _check_text_list([text for text in dataset[column] if text is not None], origin=origin)


def _check_part(part: str) -> None:
    """Raise ValueError unless ``part`` is 'calibration' or 'evaluation'."""
    if part not in _PARTS:
        raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")


def _check_text_list(texts: Sequence, origin: str) -> list[str]:
    """Check ``texts`` is a non-empty sequence of str holding some text."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{origin}: item {index} is {type(text).__name__}, expected str")
    if not any(text.strip() for text in texts):
        raise ValueError(f"{origin} holds no text")
    return list(texts)


def looks_local(source: str | os.PathLike) -> bool:
    """True if ``source`` names a local file rather than a hub dataset: it exists, starts with ``.``, ``/`` or
    ``~``, holds a path separator other than ``/`` (or two ``/``: hub ids are 'name' or 'owner/name'), or ends
    in a known file suffix. Such a source is never looked up on the hub."""
    if isinstance(source, os.PathLike):
        return True
    path = Path(source).expanduser()
    separators = {sep for sep in (os.sep, os.altsep) if sep and sep != "/"}
    return (
        path.exists()
        or path.suffix.lower() in _LOCAL_SUFFIXES
        or source.startswith(("/", ".", "~"))
        or any(sep in source for sep in separators)
        or source.count("/") >= 2
    )


_looks_local = looks_local


def _load_local(path: Path) -> list[str]:
    """Dispatch on the suffix of an existing local file (no suffix: plain text)."""
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a .txt, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in _TEXT_SUFFIXES:
            texts = _read_txt(path)
        elif suffix == ".jsonl":
            texts = _read_jsonl(path)
        elif suffix == ".parquet":
            texts = _read_parquet(path)
        else:
            raise ValueError(
                f"unsupported text file type {suffix!r} for {path}; use .txt (or .raw, or no suffix), "
                f".jsonl or .parquet"
            )
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except PermissionError as error:
        raise PermissionError(f"cannot read {path}: {error.strerror}") from None
    if not any(text.strip() for text in texts):
        raise ValueError(f"{path} holds no text (empty file?)")
    return texts


def _read_txt(path: Path) -> list[str]:
    """Documents are runs of lines separated by one or more blank lines."""
    documents: list[str] = []
    current: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def _read_jsonl(path: Path) -> list[str]:
    """One JSON object per non-blank line, each with a string ``"text"``."""
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: invalid JSON ({error})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f"{path}, line {line_number}: no \"text\" field")
            if not isinstance(record["text"], str):
                raise ValueError(
                    f"{path}, line {line_number}: \"text\" is "
                    f"{type(record['text']).__name__}, expected a string"
                )
            texts.append(record["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    """The ``"text"`` column of a parquet file."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise ValueError(f"{path}: no \"text\" column (columns: {', '.join(schema.names)})")
    column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return _check_text_list([t for t in column if t is not None], origin=str(path))


def _load_hub(name: str, part: Part) -> list[str]:
    """Load the ``"text"`` column of a hub dataset; clear error when offline."""
    import datasets

    kwargs = HUB_ALIASES[name][part] if name in HUB_ALIASES else {"path": name}
    try:
        dataset = datasets.load_dataset(**kwargs)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[_pick_split(dataset, part, name)]
    except (ConnectionError, OSError) as error:
        raise ConnectionError(
            f"dataset {name!r} cannot be downloaded (offline?); pass a local "
            f".txt/.jsonl/.parquet file or 'embedded' instead. Cause: {error}"
        ) from error
    if "text" not in dataset.column_names:
        raise ValueError(
            f"dataset {name!r} has no \"text\" column (columns: {', '.join(dataset.column_names)})"
        )
    return _check_text_list(dataset["text"], origin=f"dataset {name!r}")


def _pick_split(dataset, part: Part, name: str) -> str:
    """Choose the split of a DatasetDict that matches ``part``."""
    preferred = ("train",) if part == "calibration" else ("test", "validation", "train")
    for split in preferred:
        if split in dataset:
            return split
    raise ValueError(
        f"dataset {name!r} has no split for {part} (wanted one of {preferred}, "
        f"has {list(dataset)})"
    )


# --------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------


def token_stream(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``"\\n\\n".join(texts)`` once, without special tokens.

    Returns a LongTensor of shape (N,).  With ``max_tokens`` only the first
    ``max_tokens`` tokens are returned, and only a prefix of the text that is
    large enough is tokenized (the prefix is grown until it yields at least
    ``max_tokens + 64`` tokens, so the kept tokens are unaffected by the cut).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not a single string")
    text = "\n\n".join(texts)
    if max_tokens is None:
        return _encode(tokenizer, text)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    chars = 8 * (max_tokens + 64)
    while True:
        ids = _encode(tokenizer, text[:chars])
        if chars >= len(text) or ids.numel() >= max_tokens + 64:
            return ids[:max_tokens]
        chars *= 2


def _encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, shape (N,)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_token_id(tokenizer, add_bos: bool | None = None) -> int | None:
    """BOS id to put in front of each sequence, or None.

    ``add_bos=None`` follows the tokenizer: a BOS is used when the tokenizer
    adds one itself to ``tokenizer("x")``.  ``add_bos=True`` with a
    tokenizer that has no BOS token raises ValueError.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        if bos is None:
            return None
        default_ids = tokenizer("x")["input_ids"]
        return bos if len(default_ids) > 0 and default_ids[0] == bos else None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    return bos if add_bos else None


def calibration_batch(
    tokenizer,
    texts: Sequence[str],
    num_sequences: int = 16,
    sequence_length: int = 2048,
    min_tokens: int = 256,
    add_bos: bool | None = None,
) -> torch.Tensor:
    """Cut the token stream into non-overlapping calibration sequences.

    Returns a LongTensor of shape (n, L): ``n = num_sequences`` rows of
    ``L = sequence_length`` tokens taken in order from the start of the
    stream (each row starts with a BOS when :func:`bos_token_id` gives one).
    With too little text: fewer rows (warning); with less than one row, one
    shorter row (warning) if it still holds ``min_tokens`` text tokens,
    else ValueError.
    """
    if num_sequences < 1 or sequence_length < 2:
        raise ValueError(
            f"need num_sequences >= 1 and sequence_length >= 2, got "
            f"{num_sequences} and {sequence_length}"
        )
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not a single string")
    if not any(text.strip() for text in texts):
        raise ValueError("calibration text is empty")
    bos = bos_token_id(tokenizer, add_bos)
    prefix = 0 if bos is None else 1
    wanted = num_sequences * (sequence_length - prefix)
    stream = token_stream(tokenizer, texts, max_tokens=wanted)
    if stream.numel() == 0:
        raise ValueError("calibration text is empty")
    rows, length = _fit_rows(stream.numel(), num_sequences, sequence_length, prefix, min_tokens)
    body = stream[: rows * (length - prefix)].view(rows, length - prefix)
    return _prepend_bos(body, bos)


def _fit_rows(
    available: int, num_sequences: int, sequence_length: int, prefix: int, min_tokens: int
) -> tuple[int, int]:
    """(rows, row length) that fit into ``available`` text tokens; warn/raise."""
    per_row = sequence_length - prefix
    rows = min(num_sequences, available // per_row)
    if rows == num_sequences:
        return rows, sequence_length
    if rows >= 1:
        warnings.warn(
            f"calibration text has only {available} tokens: using {rows} sequences of "
            f"{sequence_length} tokens instead of {num_sequences}",
            stacklevel=3,
        )
        return rows, sequence_length
    if available < min_tokens:
        raise ValueError(
            f"calibration text too short: {available} tokens, need at least {min_tokens}"
        )
    warnings.warn(
        f"calibration text has only {available} tokens: using 1 sequence of "
        f"{available + prefix} tokens instead of {num_sequences} of {sequence_length}",
        stacklevel=3,
    )
    return 1, available + prefix


def _prepend_bos(body: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Prepend a BOS column to ``body`` (rows, T) if ``bos`` is not None."""
    if bos is None:
        return body.contiguous()
    column = torch.full((body.shape[0], 1), bos, dtype=body.dtype)
    return torch.cat([column, body], dim=1)

