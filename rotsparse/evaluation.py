"""Perplexity (the GPTQ / SparseGPT / TEAL / LaRoSA protocol) and zero-shot accuracy.

Perplexity protocol
-------------------
1. Documents are joined with ``"\\n\\n"`` and tokenized once, without special
   tokens (:func:`rotsparse.data.token_stream`); ``max_tokens`` keeps the
   first ``max_tokens`` tokens.
2. The stream is cut into non-overlapping windows of ``seqlen`` tokens.  When
   the tokenizer adds a BOS by itself (Gemma; not SmolLM2, see
   :func:`rotsparse.data.bos_token_id`) every window is ``[BOS] + seqlen-1``
   text tokens, otherwise ``seqlen`` text tokens.  The final partial window
   is dropped, except when the stream is shorter than one window: then the
   whole stream is one shorter window.
3. In each window every token after the first is predicted from the ones
   before it (``seqlen - 1`` predictions per window); the result is the mean
   negative log-likelihood over all predictions and ``ppl = exp(nll)``.

This matches the published wikitext-2 protocol when the tokenizer adds no
BOS.  For tokenizers that add one, the reference code puts a single BOS at
the start of the whole stream; here each window gets its own BOS, which is
what such models (Gemma) need to give sensible numbers.

Zero-shot accuracy uses the lm-evaluation-harness (``pip install
rotsparse[eval]``) on the already-loaded, possibly sparsified, model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import bos_token_id, token_stream
from .offload import execution_device
from .progress import Progress

__all__ = ["PerplexityResult", "make_windows", "mean_loss", "perplexity", "zero_shot"]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a text.

    ppl: exp(nll); nll: mean negative log-likelihood per predicted token
    (nats); tokens: number of predicted tokens; windows: number of windows;
    seqlen: window length in tokens (shorter than asked when the text was).
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int

    def __str__(self) -> str:
        return (
            f"ppl {self.ppl:.4f} (nll {self.nll:.4f} over {self.tokens} tokens, "
            f"{self.windows} windows of {self.seqlen})"
        )


def make_windows(stream: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """Cut a token stream (N,) into non-overlapping windows (W, seqlen).

    With ``bos`` each window is ``[bos] + seqlen-1`` stream tokens.  The final
    partial window is dropped unless the stream holds less than one window,
    in which case the result is the whole stream as one window (1, N[+1]).
    """
    if stream.dim() != 1:
        raise ValueError(f"token stream must be 1-D, got shape {tuple(stream.shape)}")
    prefix = 0 if bos is None else 1
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    per_window = seqlen - prefix
    count = stream.numel() // per_window
    if count == 0:
        body = stream.view(1, -1)
    else:
        body = stream[: count * per_window].view(count, per_window)
    if body.shape[1] + prefix < 2:
        raise ValueError(
            f"text too short for perplexity: {stream.numel()} tokens leave nothing to predict"
        )
    if bos is None:
        return body
    column = torch.full((body.shape[0], 1), bos, dtype=stream.dtype)
    return torch.cat([column, body], dim=1)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: where its input embeddings compute (accelerate-offloaded models included),
    else the device of its first parameter."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return execution_device(embeddings)
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None


def _window_nll_sum(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64 scalar) of next-token predictions in ``batch`` (B, T)."""
    logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
    predicted = logits[:, :-1, :].float()
    targets = batch[:, 1:]
    losses = F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return losses.double()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Mean next-token loss (nats) of ``model`` over token sequences ``input_ids`` (n, seq), one sequence at a
    time, in eval mode (the training flag is restored)."""
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape (n, seq) with n >= 1, seq >= 2, got {tuple(input_ids.shape)}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        total = sum(_window_nll_sum(model, row[None].to(device)).to(device) for row in input_ids)
    finally:
        model.train(was_training)
    return float(total) / (input_ids.shape[0] * (input_ids.shape[1] - 1))


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    seqlen: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    add_bos: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` with non-overlapping windows.

    ``texts``: documents (e.g. from :func:`rotsparse.data.load_texts`);
    ``seqlen``: window length in tokens (BOS included); ``max_tokens``: use
    only the first ``max_tokens`` text tokens; ``add_bos``: None follows the
    tokenizer (see module docstring).  The model runs under ``no_grad`` in
    eval mode on its own device; its training flag is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stream = token_stream(tokenizer, texts, max_tokens=max_tokens)
    windows = make_windows(stream, seqlen, bos_token_id(tokenizer, add_bos))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per window
        bar = Progress("perplexity", windows.shape[0], enabled=progress, unit="window", every=None)
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            total += _window_nll_sum(model, batch).to(device)
            bar.step(batch.shape[0])
    finally:
        model.train(was_training)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    nll = total.item() / predicted
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, tokens=predicted, windows=windows.shape[0],
        seqlen=windows.shape[1],
    )


# --------------------------------------------------------------------------
# zero-shot via lm-evaluation-harness
# --------------------------------------------------------------------------


def _import_lm_eval():
    """Import lm_eval lazily, with an install hint when it is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "zero-shot evaluation needs the lm-evaluation-harness: "
            "pip install 'rotsparse[eval]' (or pip install lm_eval)"
        ) from error
    return lm_eval, HFLM, TaskManager


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Zero/few-shot accuracy of an already-loaded model with lm-eval.

    ``tasks``: lm-eval task names (e.g. ``["piqa", "arc_easy"]``);
    ``limit``: examples per task (int) or fraction (float); ``include_path``:
    folder(s) with extra task YAML files; ``include_defaults=False`` skips
    indexing lm-eval's built-in tasks (about 12 s) when only local tasks are
    used.  Returns ``{task: {metric: value}}``
    with the filter suffix dropped (``"acc"``, ``"acc_stderr"``, ``"acc_norm"``,
    ... where the task reports them).
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError("tasks must be a non-empty list of lm-eval task names")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    with _global_state_kept():  # lm-eval seeds the global RNGs and may set logger levels
        return _zero_shot(lm_eval, HFLM, TaskManager, model, tokenizer, tasks, num_fewshot, limit, batch_size,
                          include_path, include_defaults, max_length)


@contextlib.contextmanager
def _global_state_kept() -> Iterator[None]:
    """Restore the Python, NumPy and torch RNG states and every existing logger's level afterwards."""
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    levels = [(logger, logger.level, logger.disabled) for logger in loggers]
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        for logger, level, disabled in levels:
            logger.setLevel(level)
            logger.disabled = disabled
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _zero_shot(lm_eval, HFLM, TaskManager, model, tokenizer, tasks, num_fewshot, limit, batch_size, include_path,
               include_defaults, max_length) -> dict[str, dict[str, float]]:
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    task_manager = TaskManager(
        include_path=_as_path_list(include_path), include_defaults=include_defaults
    )
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; pass include_path= for local task YAML files"
        )
    was_training = model.training
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
            task_manager=task_manager, log_samples=False,
        )
    finally:
        model.train(was_training)
    return {task: _clean_metrics(values) for task, values in output["results"].items()}


def _as_path_list(include_path) -> list[str] | None:
    """Normalize ``include_path`` to a list of str (or None)."""
    if include_path is None:
        return None
    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    paths = [str(Path(p).expanduser().resolve()) for p in include_path]
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"lm-eval include_path not found: {path}")
    return paths


def _clean_metrics(values: dict) -> dict[str, float]:
    """``{"acc,none": x, "alias": ...}`` -> ``{"acc": x}`` (numbers only)."""
    metrics: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name, _, filter_name = key.partition(",")
        metrics[name if filter_name in ("", "none") else key] = float(value)
    return metrics
