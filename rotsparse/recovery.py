"""Optional recovery training (Q-Sparse): Top-K forward, straight-through backward, on a sparsified model.

    model = rotsparse.sparsify(model, tokenizer, sparsity=0.5)
    result = rotsparse.recovery.recover(model, tokenizer, texts, steps=300, lr=1e-4, seqlen=512, batch_size=8)

In training mode every `TopKLinear` keeps the K largest entries of each token in the forward pass and passes
the gradient straight through in the backward pass (x + (topk(x) - x).detach(), mask built per token).
The model stays a rotsparse model: rotations and residual rotations are buffers (never trained), the Top-K
weights keep their input-major layout (AdamW updates in place), and `rotsparse.save` / `load` and the decode
kernels work afterwards.

Q-Sparse switches (`configure`): L2 re-scaling after Top-K, block (N:M) Top-K, squared-ReLU gated MLPs. They
are stored in the plan's `SparsifyConfig`, hence saved in config.json and restored by `rotsparse.load`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .api import sparsify
from .config import SparsifyConfig
from .data import bos_token_id, load_texts, token_stream
from .evaluation import make_windows
from .families import get_family
from .io import save
from .models import load_model
from .plan import attach_plan, plan_of
from .progress import Progress
from .runtime import TopKLinear, apply_topk_options, is_sparsified

logger = logging.getLogger("rotsparse")

__all__ = ["TRAINABLE_PRESETS", "RecoveryResult", "configure", "recover", "recover_pretrained",
           "select_trainable", "training_windows"]


def _is_norm(name: str, module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() or name.rsplit(".", 1)[-1].endswith("norm")


def _preset_all(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    return lambda name, module: True


def _preset_sparse(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    return lambda name, module: isinstance(module, TopKLinear) or _is_norm(name, module)


def _preset_mlp(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    mlps = {id(layer.mlp) for layer in get_family(model).layer_views()}
    prefixes = tuple(name + "." for name, module in model.named_modules() if id(module) in mlps)
    return lambda name, module: (name + ".").startswith(prefixes) or _is_norm(name, module)


def _preset_norms(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    return _is_norm


TRAINABLE_PRESETS: dict[str, Callable[[nn.Module], Callable[[str, nn.Module], bool]]] = {
    "all": _preset_all,        # every parameter (embeddings and head included)
    "sparse": _preset_sparse,  # every Top-K projection (q/k/v/o/gate/up/down) and every norm; no embeddings/head
    "mlp": _preset_mlp,        # MLP projections and every norm: about 2/3 of a Llama layer, fits small machines
    "norms": _preset_norms,    # norm scales only (tiny; the gradient still flows through the whole model)
}
"""Named choices of `recover(trainable=...)`: which modules' own parameters are trained (each preset builds
its rule (module name, module) -> bool for a model)."""


def select_trainable(model: nn.Module, trainable: str | Callable[[str, nn.Module], bool] = "all") -> list[nn.Parameter]:
    """Set requires_grad on `model`'s parameters and return the trainable ones (each once, ties shared).

    trainable: a `TRAINABLE_PRESETS` name, or a function (module name, module) -> bool deciding for the
    parameters a module owns directly. Buffers (rotations, residual rotations) are never trained.
    """
    if isinstance(trainable, str):
        if trainable not in TRAINABLE_PRESETS:
            raise ValueError(f"unknown trainable preset {trainable!r}; choose one of {sorted(TRAINABLE_PRESETS)}")
        rule = TRAINABLE_PRESETS[trainable](model)
    elif callable(trainable):
        rule = trainable
    else:
        raise TypeError(f"trainable must be a preset name or a callable, got {type(trainable).__name__}")
    chosen: dict[int, nn.Parameter] = {}
    every: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        wanted = rule(name, module)
        for parameter in module.parameters(recurse=False):
            every[id(parameter)] = parameter
            if wanted:
                chosen[id(parameter)] = parameter
    for key, parameter in every.items():
        parameter.requires_grad_(key in chosen)
    if not chosen:
        raise ValueError(f"trainable={trainable!r} selects no parameters of this model")
    return list(chosen.values())


def configure(model: nn.Module, *, l2_rescale: bool | None = None, block_size: int | None = None,
              mlp_activation: str | None | type(...) = ...) -> None:
    """Switch Q-Sparse options on a sparsified model and record them in its plan (so `save` keeps them).

    None (or ... for mlp_activation) leaves a setting as it is. See `SparsifyConfig` for the meanings.
    """
    plan = plan_of(model)
    changes = {}
    if l2_rescale is not None:
        changes["l2_rescale"] = l2_rescale
    if block_size is not None:
        changes["block_size"] = block_size
    if mlp_activation is not ...:
        changes["mlp_activation"] = mlp_activation
    if not changes:
        return
    config = dataclasses.replace(plan.config, **changes)
    apply_topk_options(model, config)
    attach_plan(model, dataclasses.replace(plan, config=config))


def training_windows(tokenizer, texts: Sequence[str] | torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping training windows (n, seqlen) of token ids.

    texts: documents (joined with blank lines and tokenized once, each window starting with BOS when the
    tokenizer adds one itself), or token ids already cut into windows (n, L), used as they are.
    """
    if isinstance(texts, torch.Tensor):
        if texts.ndim != 2 or texts.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token ids must be an integer tensor (n, seq), got {texts.dtype} {tuple(texts.shape)}")
        return texts.long()
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not a single string")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to train on text")
    stream = token_stream(tokenizer, list(texts))
    windows = make_windows(stream, seqlen, bos_token_id(tokenizer))
    if windows.shape[1] < seqlen:
        logger.warning("training text has only %d tokens: one window of %d instead of %d",
                       stream.numel(), windows.shape[1], seqlen)
    return windows


def _learning_rate_factor(step: int, steps: int, warmup: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")


@dataclass
class RecoveryResult:
    """What `recover` did.

    losses: mean training loss of each optimizer step (nats/token); learning_rates: the rate of each step.
    tokens: training tokens seen; seconds: wall time of the loop; trainable_parameters: count trained.
    checkpoints: directories written by `checkpoint_every`.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    trainable_parameters: int = 0
    checkpoints: list[str] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recover(model: nn.Module, tokenizer=None, texts: Sequence[str] | torch.Tensor | str | None = None, *,
            steps: int = 300, lr: float = 1e-4, seqlen: int = 512, batch_size: int = 8,
            gradient_accumulation: int = 1, warmup: int | float = 0.05, schedule: str = "cosine",
            min_lr_ratio: float = 0.1, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
            max_grad_norm: float | None = 1.0, trainable: str | Callable[[str, nn.Module], bool] = "all",
            seed: int = 0, precision: str = "auto", device: str | torch.device | None = None,
            checkpoint_every: int = 0, checkpoint_dir: str | Path | None = None,
            l2_rescale: bool | None = None, block_size: int | None = None,
            mlp_activation: str | None | type(...) = ..., progress: bool = True,
            log_every: int = 10) -> RecoveryResult:
    """Train `model` in place with Q-Sparse's straight-through Top-K; returns the loss history.

    texts: documents, a `rotsparse.data.load_texts` source ("embedded" or None: the embedded corpus'
        calibration part), or token ids (n, L) already cut into windows.
    steps: optimizer steps, each of `batch_size` x `gradient_accumulation` windows of `seqlen` tokens, drawn
        without replacement in a seeded order (a new order each epoch).
    lr, warmup (steps, or a fraction of `steps` when < 1), schedule ("cosine", "linear", "constant"),
    min_lr_ratio: AdamW peak rate, linear warm-up, then decay to lr * min_lr_ratio.
    max_grad_norm: gradient clipping (None: off). trainable: see `select_trainable`.
    precision: "auto" (bf16 autocast on CUDA with bf16, else float32), "fp32" or "bf16" (autocast).
    device: where to train (None: where the model is); the model stays there afterwards.
    checkpoint_every: save with `rotsparse.save` into checkpoint_dir/step-N every N steps (0: never).
    l2_rescale, block_size, mlp_activation: Q-Sparse switches applied (and saved in the plan) before training.
    progress, log_every: a log line (loss, learning rate, elapsed time, ETA) every `log_every` steps (0: none).
    A model that is not sparsified is trained the same way (a dense baseline); the switches need a plan.
    The model is left in eval mode with every parameter's requires_grad restored.
    """
    if steps < 1 or batch_size < 1 or gradient_accumulation < 1 or seqlen < 2:
        raise ValueError("steps, batch_size and gradient_accumulation must be >= 1 and seqlen >= 2")
    if lr <= 0 or not 0 <= min_lr_ratio <= 1:
        raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir")
    if any(getattr(module, "residual_bits", 0) for module in model.modules()):
        raise ValueError("recover: this model carries dropped inputs through a residual weight copy "
                         "(residual_bits), which training would leave stale; recover a model sparsified without "
                         "residual_bits")
    sparse = is_sparsified(model)
    if l2_rescale is not None or block_size is not None or mlp_activation is not ...:
        configure(model, l2_rescale=l2_rescale, block_size=block_size, mlp_activation=mlp_activation)
    elif not sparse:
        logger.warning("recover: this model is not sparsified by rotsparse; training it densely")

    if texts is None or isinstance(texts, (str, Path)):
        texts = load_texts("embedded" if texts is None else texts, part="calibration")
    windows = training_windows(tokenizer, texts, seqlen)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    autocast_dtype = _autocast_dtype(precision, device)
    warmup_steps = int(round(warmup * steps)) if warmup < 1 else int(warmup)
    warmup_steps = min(warmup_steps, steps)

    torch.manual_seed(seed)
    random.seed(seed)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    parameters = select_trainable(model, trainable)
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    result = RecoveryResult(steps=steps, trainable_parameters=sum(p.numel() for p in parameters))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_batch() -> torch.Tensor:
        nonlocal order
        rows = []
        while len(rows) < batch_size:
            if not order:
                order = torch.randperm(windows.shape[0], generator=generator).tolist()
            rows.append(order.pop())
        return windows[rows].to(device)

    model.train()
    started = time.perf_counter()
    bar = Progress("recover", steps, enabled=progress and log_every > 0, every=max(log_every, 1))
    try:
        for step in range(steps):
            rate = lr * _learning_rate_factor(step, steps, warmup_steps, schedule, min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = rate
            total = 0.0
            for _ in range(gradient_accumulation):
                batch = next_batch()
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"recover: loss is {loss.item()} at step {step}; lower lr")
                (loss / gradient_accumulation).backward()
                total += loss.item() / gradient_accumulation
                result.tokens += batch.numel()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(total)
            result.learning_rates.append(rate)
            bar.step(detail=f"loss {total:.4f}, lr {rate:.2e}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                result.checkpoints.append(str(_checkpoint(model, tokenizer, Path(checkpoint_dir) / f"step-{step + 1}")))
    finally:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(requires_grad.get(id(parameter), True))
        result.seconds = time.perf_counter() - started
    return result


def _checkpoint(model: nn.Module, tokenizer, directory: Path) -> Path:
    was_training = model.training
    model.eval()
    try:
        if is_sparsified(model):
            save(model, directory, tokenizer)
        else:
            model.save_pretrained(directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
    finally:
        model.train(was_training)
    return directory


def recover_pretrained(model: str, config: SparsifyConfig, steps: int, out: str | Path, data: str | None = None, *,
                       calibration: str | None = None, progress: bool = True, **options) -> RecoveryResult:
    """What `rotsparse recover --model M --sparsity S --steps N [--data DATA] --out DIR` does.

    Loads M (`rotsparse.models.load_model`), sparsifies it with `config` (calibrating on `calibration`, by
    default DATA's calibration part, or the embedded corpus), recovers on DATA's calibration part, saves model +
    tokenizer to DIR with `rotsparse.save` and the loss history to DIR/recovery.json. `options` go to `recover`
    (lr, seqlen, batch_size, trainable, ...).
    """
    network, tokenizer = load_model(model)
    source = data or "embedded"
    sparsify(network, tokenizer, config=config, calibration=calibration or source, progress=progress)
    texts = load_texts(source, part="calibration")
    result = recover(network, tokenizer, texts, steps=steps, progress=progress, **options)
    out = Path(out)
    save(network, out, tokenizer)
    (out / "recovery.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
