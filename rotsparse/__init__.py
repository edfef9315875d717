"""rotsparse: training-free activation sparsity for Hugging Face causal LMs.

    import rotsparse
    model = rotsparse.sparsify(model, tokenizer, sparsity=0.4)
"""

from .api import set_kernels, sparsify
from .config import SparsifyConfig, SparsityPlan
from .evaluation import perplexity, zero_shot
from .io import load, plan_of, save

__all__ = ["SparsifyConfig", "SparsityPlan", "load", "perplexity", "plan_of", "save", "set_kernels", "sparsify",
           "zero_shot"]
__version__ = "0.1.0"
