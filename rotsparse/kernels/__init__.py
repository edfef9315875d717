"""Sparse decode kernels for fixed Top-K activation sparsity.

For one token, a linear layer ``y = W x`` with ``W`` of shape ``(out, in)`` only
needs the ``K`` weight columns whose activations survive Top-K.  The kernels
take the weight in *input-channel-major* layout ``weight_t = W.t()`` of shape
``(in, out)``, **contiguous**, so each selected input channel is one contiguous
row, and compute::

    y[j] = sum_{i in TopK(|x|, K)} x[i] * weight_t[i, j]  (+ bias[j])

Backends (picked per call, see :func:`kernel_backend`):

* ``"cpp"``    -- CPU: fused select + gather-GEMV in C++/OpenMP (AVX-512 when
  the compiler targets it), JIT-compiled on first use with
  ``torch.utils.cpp_extension.load`` and cached by torch.
* ``"triton"`` -- CUDA: one Triton kernel per call in which every program
  finds the exact Top-K itself (radix select on the bits of |x|) and gathers
  only the kept weight rows (``rotsparse/kernels/triton_gemv.py``).
* ``"torch"``  -- pure PyTorch fallback (correct, slower); used when the C++
  build fails (one warning says why), when Triton is missing, or for dtypes
  the native kernels do not handle.

Public API: :func:`topk_gemv`, :func:`index_gemv`, :func:`topk_indices`,
:func:`dense_gemv` (one token through a row-major ``(out, in)`` weight, e.g. the
lm_head), :func:`topk_mask`, :func:`kernel_backend`, :func:`build_extension`.
``topk_gemv``, ``index_gemv`` and ``topk_indices`` are ``torch.library``
custom ops (``torch.ops.rotsparse.*``, with fake implementations) so
``torch.compile`` can trace code that calls them; in plain eager mode without
autograd the public functions skip the custom-op layer (~25 us per call).
``topk_gemv`` also has an autograd formula (straight-through w.r.t. the mask).
"""

from __future__ import annotations

import functools
import operator
import os
import shutil
import warnings
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "build_extension",
    "dense_gemv",
    "index_gemv",
    "kernel_backend",
    "topk_gemv",
    "topk_indices",
    "topk_mask",
]

_EXT_NAME = "rotsparse_topk_gemv"
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topk_gemv.cpp")
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN = (Tensor, torch.nn.Parameter)


# ---------------------------------------------------------------------------
# C++ extension (lazy JIT build, cached)
# ---------------------------------------------------------------------------
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
    from torch.utils.cpp_extension import load

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
def _cpp_ext():
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
def _triton_available() -> bool:
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
        if dtype in _NATIVE_DTYPES and _cpp_ext() is not None:
            return "cpp"
        return "torch"
    if dev.type == "cuda":
        if dtype in _NATIVE_DTYPES and _triton_available():
            return "triton"
        return "torch"
    return "torch"


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def _check_keep_k(keep_k, n: int):
    if isinstance(keep_k, bool) or not isinstance(keep_k, (int, torch.SymInt)):
        try:
            keep_k = operator.index(keep_k)  # numpy / 0-d integer tensors
        except TypeError:
            raise TypeError(f"keep_k must be an int, got {type(keep_k).__name__}") from None
    if keep_k < 0 or keep_k > n:
        raise ValueError(f"keep_k={keep_k} out of range [0, {n}]")
    return keep_k


def _check_gemv_args(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], check_contiguous: bool = True) -> None:
    if not isinstance(x, Tensor) or not isinstance(weight_t, Tensor):
        raise TypeError("x and weight_t must be tensors")
    if weight_t.dim() != 2:
        raise ValueError(f"weight_t must be 2-D (in, out), got shape {tuple(weight_t.shape)}")
    if check_contiguous and not weight_t.is_contiguous():
        raise ValueError(
            "weight_t must be contiguous with shape (in, out) (input-channel-major); "
            "for an nn.Linear weight W (out, in) pass W.t().contiguous() once and keep it"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dtype != weight_t.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype}, weight_t is {weight_t.dtype}")
    if x.device != weight_t.device:
        raise ValueError(f"device mismatch: x on {x.device}, weight_t on {weight_t.device}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    n_in, n_out = weight_t.shape
    if x.shape[-1] != n_in:
        raise ValueError(
            f"shape mismatch: x has {x.shape[-1]} features, weight_t expects in={n_in} "
            f"(x {tuple(x.shape)}, weight_t {tuple(weight_t.shape)})"
        )
    if x.numel() != n_in:
        raise ValueError(
            f"topk_gemv handles exactly one token (x of shape (in,), (1, in) or (1, 1, in)); "
            f"got x of shape {tuple(x.shape)}. Use topk_mask(x, k) @ weight_t for several tokens."
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError("bias must be a tensor or None")
        if bias.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        if bias.device != weight_t.device:
            raise ValueError(f"device mismatch: bias on {bias.device}, weight_t on {weight_t.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: bias is {bias.dtype}, x is {x.dtype}")


# ---------------------------------------------------------------------------
# Reference / fallback implementations
# ---------------------------------------------------------------------------
def topk_mask(x: Tensor, keep_k: int) -> Tensor:
    """Per-token dense-masked Top-K along the last dim.

    x: (..., in), any number of tokens.  Returns a tensor of the same shape and
    dtype that is zero everywhere except, independently for every token, at
    the ``keep_k`` largest ``|x|`` entries (exactly ``keep_k`` per token; ties
    broken by ``torch.topk``).  ``keep_k == 0`` gives zeros; ``keep_k == in``
    returns ``x`` itself (no copy).
    """
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    n = x.shape[-1]
    keep_k = _check_keep_k(keep_k, n)
    if keep_k == n:
        return x
    if keep_k == 0:
        return torch.zeros_like(x)
    idx = x.abs().topk(keep_k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def _index_gemv_torch(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    n_in, n_out = weight_t.shape
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # float32 accumulation at least
    x1 = x.reshape(n_in)
    xs = x1.index_select(0, indices).to(acc_dtype).unsqueeze(0)
    acc = (xs @ weight_t.index_select(0, indices).to(acc_dtype)).reshape(n_out)
    if bias is not None:
        acc = acc + bias.to(acc_dtype)
    return acc.to(x.dtype).reshape(*x.shape[:-1], n_out)


def _topk_gemv_torch(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Pure-PyTorch implementation of the op (float32 accumulation)."""
    n_in = weight_t.shape[0]
    x1 = x.reshape(n_in)
    if keep_k == n_in:
        idx = torch.arange(n_in, device=x.device)
    else:
        idx = x1.abs().topk(keep_k, sorted=False).indices.sort().values
    return _index_gemv_torch(x, idx, weight_t, bias)


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------
def _topk_gemv_dispatch(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    if x.dtype in _NATIVE_DTYPES:
        if x.device.type == "cpu":
            ext = _cpp_ext()
            if ext is not None:
                return ext.topk_gemv(x, weight_t, bias, int(keep_k))
        elif x.device.type == "cuda" and _triton_available():
            from .triton_gemv import topk_gemv_triton

            return topk_gemv_triton(x, weight_t, bias, int(keep_k))
    return _topk_gemv_torch(x, weight_t, bias, int(keep_k))


def _index_gemv_dispatch(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.dtype in _NATIVE_DTYPES:
        if x.device.type == "cpu":
            ext = _cpp_ext()
            if ext is not None:
                return ext.index_gemv(x, indices, weight_t, bias)  # checks the index range
        elif x.device.type == "cuda" and _triton_available():
            from .triton_gemv import index_gemv_triton

            return index_gemv_triton(x, indices, weight_t, bias)
    if x.device.type == "cpu" and indices.numel():  # (no host sync on accelerators)
        if int(indices.min()) < 0 or int(indices.max()) >= weight_t.shape[0]:
            raise ValueError(f"indices out of range [0, {weight_t.shape[0]})")
    return _index_gemv_torch(x, indices, weight_t, bias)


def _topk_indices_dispatch(x: Tensor, keep_k: int) -> Tensor:
    n = x.shape[-1]
    x1 = x.reshape(n)
    if x1.device.type == "cpu" and x1.dtype in _NATIVE_DTYPES:
        ext = _cpp_ext()
        if ext is not None:
            return ext.topk_indices(x1, int(keep_k))
    elif x1.device.type == "cuda" and x1.dtype in _NATIVE_DTYPES and _triton_available():
        from .triton_gemv import topk_indices_triton

        indices = topk_indices_triton(x1.contiguous(), int(keep_k))
        if indices is not None:
            return indices
    if keep_k == n:
        return torch.arange(n, device=x.device)
    return x1.abs().topk(int(keep_k), sorted=False).indices.sort().values


def _dense_gemv_dispatch(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES:
        ext = _cpp_ext()
        if ext is not None:
            return ext.dense_gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("rotsparse::index_gemv", mutates_args=())
def _index_gemv_op(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _index_gemv_dispatch(x, indices, weight_t, bias)


@_index_gemv_op.register_fake
def _index_gemv_fake(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@torch.library.custom_op("rotsparse::topk_indices", mutates_args=())
def _topk_indices_op(x: Tensor, keep_k: int) -> Tensor:
    return _topk_indices_dispatch(x, keep_k).clone()  # fresh storage (the C++ op returns a view)


@_topk_indices_op.register_fake
def _topk_indices_fake(x: Tensor, keep_k: int) -> Tensor:
    return x.new_empty((keep_k,), dtype=torch.long)


@torch.library.custom_op("rotsparse::topk_gemv", mutates_args=())
def _topk_gemv_op(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    return _topk_gemv_dispatch(x, weight_t, bias, keep_k)


@_topk_gemv_op.register_fake
def _topk_gemv_fake(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    torch._check(x.shape[-1] == weight_t.shape[0])
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@torch.library.custom_op("rotsparse::dense_gemv", mutates_args=())
def _dense_gemv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _dense_gemv_dispatch(x, weight, bias)


@_dense_gemv_op.register_fake
def _dense_gemv_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    torch._check(x.shape[-1] == weight.shape[1])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _topk_gemv_setup_context(ctx, inputs, output):
    x, weight_t, bias, keep_k = inputs
    ctx.save_for_backward(x, weight_t)
    ctx.keep_k = keep_k
    ctx.has_bias = bias is not None


def _topk_gemv_backward(ctx, grad):
    # Straight-through w.r.t. the selection: the Top-K mask is treated as constant.
    x, weight_t = ctx.saved_tensors
    n = x.shape[-1]
    mask = torch.zeros_like(x, dtype=torch.bool)
    if ctx.keep_k == n:
        mask.fill_(True)
    elif ctx.keep_k > 0:
        mask.scatter_(-1, x.abs().topk(ctx.keep_k, dim=-1, sorted=False).indices, True)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = (grad @ weight_t.t()) * mask
    if ctx.needs_input_grad[1]:
        gw = (x * mask).reshape(-1, 1) @ grad.reshape(1, -1)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.reshape(-1)
    return gx, gw, gb, None


torch.library.register_autograd(
    "rotsparse::topk_gemv", _topk_gemv_backward, setup_context=_topk_gemv_setup_context
)


def topk_gemv(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """Fused Top-K + sparse GEMV for ONE token.

    Args:
        x: (in,), (1, in) or (1, 1, in); float32 / bfloat16 (float16 also works).
        weight_t: (in, out), contiguous, same dtype and device as ``x``
            (the transpose of an ``nn.Linear`` weight).
        bias: (out,) or None.
        keep_k: number of input channels kept, 0 <= keep_k <= in.

    Returns:
        ``x.shape[:-1] + (out,)`` tensor of ``x.dtype``, equal (up to float
        rounding, float32 accumulation) to ``topk_mask(x, keep_k) @ weight_t + bias``.
    """
    _check_gemv_args(x, weight_t, bias)
    keep_k = _check_keep_k(keep_k, weight_t.shape[0])
    if _eager_fast_path(x, weight_t, bias):
        # Same computation as the custom op, minus its ~25 us of Python dispatch.
        return _topk_gemv_dispatch(x, weight_t, bias, keep_k)
    return torch.ops.rotsparse.topk_gemv(x, weight_t, bias, keep_k)


def decode_topk_gemv(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], keep_k: int) -> Tensor:
    """:func:`topk_gemv` for callers whose arguments are consistent by construction (a `TopKLinear`'s decode
    step, a residual adapter): plain CPU tensors of one native dtype in eager mode go straight to the C++
    kernel (which still checks shapes), skipping the Python validation; anything else is `topk_gemv`."""
    if (x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and weight_t.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and _eager_fast_path(x, weight_t, bias)):
        ext = _cpp_ext()
        if ext is not None:
            return ext.topk_gemv(x, weight_t, bias, keep_k)
    return topk_gemv(x, weight_t, bias, keep_k)


def index_gemv(x: Tensor, indices: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Sparse GEMV over precomputed input channels, one token (inference only: no autograd).

    ``y = x[indices] @ weight_t[indices] (+ bias)``; ``indices``: 1-D int64 on
    x's device, distinct, ascending is fastest (e.g. from :func:`topk_indices`,
    so q/k/v projections sharing an input can share one selection).  The index
    range is checked on CPU only (on CUDA it is the caller's responsibility).
    Shapes as in :func:`topk_gemv`; custom op ``torch.ops.rotsparse.index_gemv``.
    """
    _check_gemv_args(x, weight_t, bias)
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype != torch.long:
        raise ValueError("indices must be a 1-D int64 tensor")
    if indices.device != x.device:
        raise ValueError(f"device mismatch: indices on {indices.device}, x on {x.device}")
    if _eager_fast_path(x, weight_t, bias, indices):
        return _index_gemv_dispatch(x, indices, weight_t, bias)
    return torch.ops.rotsparse.index_gemv(x, indices, weight_t, bias)


def dense_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Dense GEMV for ONE token through a row-major weight: ``F.linear(x, weight, bias)``.

    ``weight``: ``(out, in)``, contiguous (an ``nn.Linear`` weight as stored, so
    the lm_head needs no re-layout and stays tied to the embeddings); ``x``:
    ``(in,)``, ``(1, in)`` or ``(1, 1, in)``.  On CPU (float32 / bfloat16 /
    float16) a C++/OpenMP kernel streams the rows with float32 accumulation,
    at memory bandwidth where torch's own bf16 single-token ``F.linear`` is
    about half as fast; elsewhere, and when autograd must record, it is
    ``F.linear`` itself.  Custom op ``torch.ops.rotsparse.dense_gemv``.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("x and weight must be tensors")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D (out, in) tensor, got shape {tuple(weight.shape)}")
    _check_gemv_args(x, weight.t(), bias, check_contiguous=False)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return torch.nn.functional.linear(x, weight, bias)
    if _eager_fast_path(x, weight, bias):
        return _dense_gemv_dispatch(x, weight, bias)
    return torch.ops.rotsparse.dense_gemv(x, weight, bias)


def topk_indices(x: Tensor, keep_k: int) -> Tensor:
    """Ascending int64 indices, shape (keep_k,), of the keep_k largest |x| of ONE token.

    x: (in,), (1, in) or (1, 1, in).  Exactly keep_k indices (ties broken
    arbitrarily); custom op ``torch.ops.rotsparse.topk_indices``.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError("x must be a tensor with at least one dimension")
    n = x.shape[-1]
    keep_k = _check_keep_k(keep_k, n)
    if x.numel() != n:
        raise ValueError(f"topk_indices handles one token, got x of shape {tuple(x.shape)}")
    if _eager_fast_path(x):
        return _topk_indices_dispatch(x, keep_k)
    return torch.ops.rotsparse.topk_indices(x, keep_k)


def _eager_fast_path(*tensors: Optional[Tensor]) -> bool:
    """True when the implementation can be called directly instead of through the
    custom op: plain tensors, eager mode (no torch.compile / tracing / dispatch
    modes) and nothing that autograd must record."""
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False  # tensor subclasses (FakeTensor, FunctionalTensor, DTensor, ...)
    if torch.compiler.is_compiling() or _dispatch_modes_active():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return True


def _dispatch_modes_active() -> bool:
    try:
        return torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
    except AttributeError:  # private API moved: be conservative
        return True
