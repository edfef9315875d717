"""rotsparse: training-free activation sparsity for Hugging Face causal LMs.

    import rotsparse
    model = rotsparse.sparsify(model, tokenizer, sparsity=0.4)
    rotsparse.compile(model)  # optional: torch.compile'd decode, with generate(..., cache_implementation="static")
"""

from .api import calibrate, set_kernels, sparsify
from .compiled import compile
from .config import AutoOptions, SparsifyConfig
from .evaluation import perplexity, zero_shot
from .hf_quantizer import RotsparseConfig  # registers quant_method "rotsparse" with transformers
from .io import load, plan_of, save
from .plan import SparsityPlan
from .recovery import recover

__all__ = ["AutoOptions", "RotsparseConfig", "SparsifyConfig", "SparsityPlan", "calibrate", "compile", "load",
           "perplexity", "plan_of", "recover", "save", "set_kernels", "sparsify", "zero_shot"]
__version__ = "0.1.0"
