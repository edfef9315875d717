"""Building the kernels: the C++ extension (JIT-compiled on first use with ``torch.utils.cpp_extension.load``
and cached by torch), Triton's availability, and which backend a call will run (`kernel_backend`).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch
from torch.utils.cpp_extension import load

_EXT_NAME = "rotsparse_topk_gemv"
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topk_gemv.cpp")
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the native (C++ / Triton) kernels handle; anything else runs the PyTorch reference."""
KERNEL_MAX_TOKENS = 16
"""Up to this many tokens per call (a batched decode step, a short prompt) the sparse modules on the CPU take the
C++ `topk_gemv` (passes of 8 tokens, each over the union of their kept rows) instead of the masked product; it
beats the masked product up to about 32 tokens and loses at 64 (eval/results/batch_kernel.md)."""
INT8_KERNEL_MAX_TOKENS = 1024
"""The same for int8 weights (`topk_gemv_int8`), whose alternative dequantizes the weight on every call: the kernel
is 25-159x faster at 2-16 tokens, 5.6-8.0x at 64 and 2.0-2.3x at 256 tokens per Llama-2-7B matrix at 50%, and
the two meet at 1024 tokens (0.93-0.99x: a float32 dequantization and one GEMM; eval/results/batch_kernel_int8.md,
batch_kernel_int8_long.md)."""
INT4_KERNEL_MAX_TOKENS = 1024
"""The same for int4 weights (`topk_gemv_int4`, whose alternative also dequantizes on every call): 51-233x faster
than it at 2-16 tokens, 14.5-23x at 64, 4.2-6.7x at 256 and 2.3-2.7x at 1024 tokens per Llama-2-7B matrix
(eval/results/batch_kernel_int4.md, batch_kernel_int4_long.md)."""


def _build_flag_sets() -> list[tuple[list[str], list[str]]]:
    """Compiler/linker flag sets to try, best first."""
    if os.name == "nt":  # MSVC
        return [(["/O2", "/openmp"], []), (["/O2"], [])]
    # The portable retry covers compilers without OpenMP or -march=native
    # (e.g. Apple clang); the C++ source builds either way.
    return [(["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]), (["-O3"], [])]


@functools.cache
def _load_extension(verbose: bool = False):
    """Build (or load from torch's extension cache) the C++ kernel.

    Returns the op namespace ``torch.ops.rotsparse_cpp`` (``topk_gemv``,
    ``index_gemv``, ``topk_indices``, ``dense_gemv``, ``has_avx512``); raises on failure.
    Cached: the build runs at most once per process per ``verbose`` value.
    """
    cxx = os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"C++ compiler {cxx!r} not found (install g++/clang++ or set CXX)")
    errors = []
    for i, (cflags, ldflags) in enumerate(_build_flag_sets()):
        name = _EXT_NAME if i == 0 else f"{_EXT_NAME}_portable"
        try:
            load(
                name=name,
                sources=[_SRC],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                is_python_module=False,  # ops register themselves as torch.ops.rotsparse_cpp.*
                verbose=verbose,
            )
            return torch.ops.rotsparse_cpp
        except Exception as e:  # build error, ninja missing, ...
            errors.append(f"[flags {' '.join(cflags)}] {type(e).__name__}: {_tail(e)}")
    raise RuntimeError("could not build the rotsparse C++ kernel: " + " | ".join(errors))


def _tail(e: BaseException, limit: int = 400) -> str:
    """The end of an exception message (where the compiler's error usually is)."""
    s = " ".join(str(e).split())
    return s if len(s) <= limit else "... " + s[-limit:]


@functools.cache
def cpp_ext():
    """The compiled extension, or ``None`` (after ONE warning) if it cannot be built."""
    try:
        return _load_extension(False)
    except Exception as e:
        warnings.warn(
            f"rotsparse: C++ Top-K GEMV kernel unavailable, falling back to the (slower) "
            f"pure-PyTorch path. Reason: {_tail(e, 1200)}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def build_extension(verbose: bool = False):
    """Build (or load from cache) the C++ kernel now; returns ``torch.ops.rotsparse_cpp``.

    Raises ``RuntimeError`` with the compiler's message if the build fails
    (unlike the lazy path, which warns once and falls back to PyTorch).
    """
    return _load_extension(verbose)


@functools.cache
def triton_available() -> bool:
    try:
        import triton.language  # noqa: F401  (imports triton too)
    except Exception:
        return False
    return True


def kernel_backend(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Which backend :func:`topk_gemv` will actually run on ``device``.

    Returns ``"cpp"``, ``"triton"`` or ``"torch"``.  For CPU this builds the
    extension if needed (first call may take ~1 min; cached afterwards).
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        if dtype in NATIVE_DTYPES and cpp_ext() is not None:
            return "cpp"
        return "torch"
    if dev.type == "cuda":
        if dtype in NATIVE_DTYPES and triton_available():
            return "triton"
        return "torch"
    return "torch"
