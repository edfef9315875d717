"""Batch-1 decode latency of a dense model and its sparsified copy, measured interleaved in one run.

Synthetic models (``synthetic:llama2-7b``, ``synthetic:llama3-8b``, the mixture of experts
``synthetic:qwen3-30b-a3b``) have random weights at the real layer shapes; under fixed Top-K, speed does not depend
on weight values, so they stand in for the real models.
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache

from .api import sparsify
from .budget import allocate_keep_k
from .compiled import compile as compile_model, compile_function, eager_forward
from .config import SparsifyConfig
from .families import get_family
from .plan import SparsityPlan, attach_plan, plan_of, site_sizes_for
from .runtime import (ROTATION_BUFFER, QuantizedTopKLinear, TopKExperts, TopKLinear, attach_output_rotation,
                      install_topk)

SYNTHETIC_SHAPES = {
    # model_type, hidden, intermediate, heads, kv heads, vocab, full depth (and the experts of a mixture)
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, num_hidden_layers=32),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, num_hidden_layers=48,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}


def synthetic_model(name: str, num_layers: int | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A causal LM with random weights at the real shapes of `name` (see `SYNTHETIC_SHAPES`)."""
    if name not in SYNTHETIC_SHAPES:
        raise ValueError(f"unknown synthetic model {name!r}; choose one of {sorted(SYNTHETIC_SHAPES)}")
    shape = dict(SYNTHETIC_SHAPES[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        shape["num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name_, parameter in model.named_parameters():
            if "norm" in name_:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
        rotary = get_family(model).rotary_embedding
        rotary.inv_freq.copy_(_inv_freq(config))
        rotary.original_inv_freq = rotary.inv_freq.clone()
    return model.eval()


def _inv_freq(config) -> torch.Tensor:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def weight_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes a batch-1 decode step must read: decoder layers (sparse linears at K/in), and the whole model.

    Counts every linear weight (quantized ones: the kept rows and all their scales; with a residual copy also its
    dropped rows and their scales) and rotation matrix, and of
    batched mixture-of-experts weights the experts one token is routed to (``num_experts_per_tok`` of them; in a
    `TopKExperts`, at K/in of each site: the bytes a row-gathering kernel would read); embeddings count one row
    per token (negligible).
    """
    active = getattr(model.config, "num_experts_per_tok", None)
    in_layers_ids = {id(module) for layer in get_family(model).layers for module in layer.modules()}
    layers = head = 0.0
    for module in model.modules():
        in_layers = id(module) in in_layers_ids
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name == ROTATION_BUFFER:
                layers += buffer.numel() * buffer.element_size()
        size = 0.0
        if isinstance(module, nn.Linear):
            fraction = module.keep_k / module.in_features if isinstance(module, TopKLinear) else 1.0
            if isinstance(module, QuantizedTopKLinear):  # kept rows of the weight; every scale (int4: each group
                size = module.qweight.nbytes * fraction + module.qscale.nbytes  # holds a kept channel)
            else:
                size = module.weight.numel() * module.weight.element_size() * fraction
            if getattr(module, "residual_bits", 0):  # the copied rows of the residual copy
                size += (module.residual_codes.nbytes + module.residual_scales.nbytes) * (
                    module.residual_copy_k / module.in_features)
        elif active and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):  # batched experts
            fractions = ((module.input_topk.keep_k / module.input_topk.in_features,
                          module.hidden_topk.keep_k / module.hidden_topk.in_features)
                         if isinstance(module, TopKExperts) else (1.0, 1.0))
            size = sum(weight[0].numel() * weight.element_size() * active * fraction
                       for weight, fraction in zip((module.gate_up_proj, module.down_proj), fractions))
        if size:
            if in_layers:
                layers += size
            else:
                head += size
    return {"layers": layers, "model": layers + head}


class DecodeRunner:
    """One timed configuration: a model (or its decoder stack, `layers_only`) with its own KV cache.

    Eager: a `DynamicCache`, as Hugging Face decodes by default. Compiled (`compile_options`): a `StaticCache`
    (every decode step has the same shapes), an explicit cache position per step, the prefill run eagerly and the
    decode steps through the compiled forward (the model's own, from `rotsparse.compile`; the decoder stack's
    compiled here the same way).
    """

    def __init__(self, model: nn.Module, layers_only: bool, compile_options: dict | None, max_cache_len: int):
        self.model = model
        module = get_family(model).decoder if layers_only else model
        self.static = compile_options is not None
        self.prefill = self.step = module
        # the cache's keyword: `cache` in newer transformers, where `past_key_values` is deprecated
        self.cache_keyword = "cache" if "cache" in inspect.signature(type(module).forward).parameters \
            else "past_key_values"
        if self.static and layers_only:
            self.step = compile_function(module.__call__, **compile_options)
        elif self.static:
            compile_model(model, **compile_options)  # (again, from its eager forward, if it was compiled before)
            self.prefill = eager_forward(model)
        self.max_cache_len = max_cache_len

    def start(self, prompt: torch.Tensor):
        """A fresh KV cache after a prefill of `prompt` (1, p): the state of one timed sequence."""
        if self.static:
            cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        else:
            cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.prefill(input_ids=prompt, use_cache=True, **{self.cache_keyword: cache})
        return [cache, prompt.shape[1]]

    def step_ms(self, token: torch.Tensor, state) -> float:
        """One timed single-token decode step (ms); on an accelerator, from launch until the step has finished."""
        cache, position = state
        extra = {"cache_position": torch.tensor([position], device=token.device)} if self.static else {}
        synchronize = torch.cuda.synchronize if token.device.type == "cuda" else (lambda: None)
        with torch.no_grad():
            synchronize()
            start = time.perf_counter()
            self.step(input_ids=token, use_cache=True, **{self.cache_keyword: cache}, **extra)
            synchronize()
            elapsed = (time.perf_counter() - start) * 1000
        state[1] = position + 1
        return elapsed


@dataclass(frozen=True)
class DecodeBenchmark:
    dense_ms_per_token: float
    sparse_ms_per_token: float
    speedup: float
    dense_layers_ms_per_token: float
    sparse_layers_ms_per_token: float
    layers_speedup: float
    kernel_dense_ms_per_token: float | None
    speedup_vs_kernel_dense: float | None
    kernel_dense_layers_ms_per_token: float | None
    layers_speedup_vs_kernel_dense: float | None
    effective_sparsity: float
    bytes_limit_speedup: float | None
    layers_bytes_limit_speedup: float | None
    dtype: str
    device: str
    tokens: int
    repeats: int
    threads: int
    compiled: bool = False
    compile_mode: str | None = None
    batch_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark_decode(dense: nn.Module, sparse: nn.Module, tokens: int = 64, repeats: int = 5, prompt_length: int = 16,
                     warmup_tokens: int = 8, seed: int = 0, kernel_dense: nn.Module | None = None,
                     compile_mode: str | None = None, compile_backend: str = "inductor",
                     batch_size: int = 1) -> DecodeBenchmark:
    """Interleave dense and sparse decode timings (whole model and decoder stack) step by step; medians over
    `repeats`.

    kernel_dense: optionally, the dense model run through rotsparse's own kernel at K = in (see
    `structural_sparse_copy` at sparsity 0), a baseline that isolates what sparsity buys from what a
    better GEMV buys.
    compile_mode: time compiled decode instead (`rotsparse.compile` with this mode, fullgraph, on every model
    alike, in place; a static KV cache): every speed-up is then compiled sparse vs compiled dense.
    compile_backend: the ``torch.compile`` backend of `compile_mode` (tests use ``"aot_eager"``).
    batch_size: sequences decoded together (each step one token of each); above 1 the bytes limits are None,
    as a batch reads the union of its tokens' kept rows, which depends on the tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_of(sparse)
    vocab = dense.config.vocab_size
    prompt = torch.randint(0, vocab, (batch_size, prompt_length), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(dense.get_input_embeddings().weight.device)
    models = {"dense": dense, "sparse": sparse} | ({"kernel_dense": kernel_dense} if kernel_dense else {})
    compile_options = None if compile_mode is None else dict(mode=compile_mode, backend=compile_backend)
    max_cache_len = prompt_length + max(tokens, warmup_tokens)
    configs = [(name, layers_only) for name in models for layers_only in (False, True)]
    runners = {config: DecodeRunner(models[config[0]], config[1], compile_options, max_cache_len) for config in configs}
    next_token = prompt[:, -1:]
    for runner in runners.values():  # warm-up (and, compiled, the compilation of every decode step)
        state = runner.start(prompt)
        for _ in range(warmup_tokens):
            runner.step_ms(next_token, state)
    # Interleaved step by step: every timed configuration (model x whole/layers) has its own KV cache and
    # they take turns one decode step at a time (order reversed every step), so load from other jobs and
    # drifts in memory bandwidth hit all of them alike. One repeat = `tokens` steps of each; its mean is one
    # sample, and the medians over repeats are reported.
    timings = {key: [] for name in models for key in (name, f"{name}_layers")}
    for _ in range(repeats):
        states = {config: runners[config].start(prompt) for config in configs}
        totals = dict.fromkeys(configs, 0.0)
        for step in range(tokens):
            for config in (configs if step % 2 == 0 else configs[::-1]):
                totals[config] += runners[config].step_ms(next_token, states[config])
        for (name, layers_only), total in totals.items():
            timings[f"{name}_layers" if layers_only else name].append(total / tokens)
        del states
    median = {key: statistics.median(values) for key, values in timings.items()}
    kernel_dense_ms = median.get("kernel_dense")
    kernel_dense_layers_ms = median.get("kernel_dense_layers")
    dense_bytes, sparse_bytes = weight_bytes(dense), weight_bytes(sparse)
    dtype = next(sparse.parameters()).dtype
    return DecodeBenchmark(
        dense_ms_per_token=median["dense"], sparse_ms_per_token=median["sparse"],
        speedup=median["dense"] / median["sparse"],
        dense_layers_ms_per_token=median["dense_layers"], sparse_layers_ms_per_token=median["sparse_layers"],
        layers_speedup=median["dense_layers"] / median["sparse_layers"],
        kernel_dense_ms_per_token=kernel_dense_ms,
        speedup_vs_kernel_dense=None if kernel_dense_ms is None else kernel_dense_ms / median["sparse"],
        kernel_dense_layers_ms_per_token=kernel_dense_layers_ms,
        layers_speedup_vs_kernel_dense=(None if kernel_dense_layers_ms is None
                                        else kernel_dense_layers_ms / median["sparse_layers"]),
        effective_sparsity=plan.effective_sparsity,
        bytes_limit_speedup=dense_bytes["model"] / sparse_bytes["model"] if batch_size == 1 else None,
        layers_bytes_limit_speedup=dense_bytes["layers"] / sparse_bytes["layers"] if batch_size == 1 else None,
        dtype=str(dtype).removeprefix("torch."), device=str(prompt.device), tokens=tokens, repeats=repeats,
        threads=torch.get_num_threads(), compiled=compile_mode is not None, compile_mode=compile_mode,
        batch_size=batch_size,
    )


def sparse_copy(dense: nn.Module, sparsify_kwargs: dict) -> nn.Module:
    """Sparsify a deep copy of `dense` (the dense model stays untouched for side-by-side timing)."""
    return sparsify(copy.deepcopy(dense), **sparsify_kwargs)


def structural_sparse_copy(dense: nn.Module, config: SparsifyConfig, adapter_every: int = 1) -> nn.Module:
    """A copy of `dense` with the run-time structure `sparsify(config)` gives, without calibration or folding.

    Top-K linears at the plan's K, and (for calibrated, rotating methods) a d x d residual rotation after every
    `adapter_every`-th layer but the last: 1 is the worst case (a basis per layer), G the structure of
    ``auto``'s run<G> bases (residual rotations only between runs of G layers). Values are not rotated: for
    timing random weights, values do not matter under fixed Top-K.
    """
    if isinstance(adapter_every, bool) or not isinstance(adapter_every, int) or adapter_every < 1:
        raise ValueError(f"adapter_every must be an integer >= 1, got {adapter_every!r}")
    model = copy.deepcopy(dense)
    family = get_family(model)
    site_sizes = site_sizes_for(family)
    keep_k = allocate_keep_k(site_sizes, config.topk_sparsity, config.coefficients)
    rotated = config.spec.calibrated
    if rotated and not family.spec.calibrated:
        raise ValueError(f"method {config.method!r} does not support model_type={model.config.model_type!r} (batched "
                         f"mixture-of-experts weights); use method='topk'")
    plan = SparsityPlan(keep_k=keep_k, site_sizes=site_sizes, rotated=rotated, config=config)
    if rotated:
        width, weight = family.hidden_size, family.embed_tokens.weight
        for layer in list(family.layers)[adapter_every - 1 : -1 : adapter_every]:
            attach_output_rotation(layer, torch.eye(width, dtype=weight.dtype, device=weight.device))
    install_topk(family, plan)
    attach_plan(model, plan)
    return model
