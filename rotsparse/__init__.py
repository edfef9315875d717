"""rotsparse: training-free activation sparsity for Hugging Face causal LMs.

    import rotsparse
    model = rotsparse.sparsify(model, tokenizer, sparsity=0.4)
"""

from .api import set_kernels, sparsify
from .config import SparsifyConfig, SparsityPlan
from .io import load, plan_of, save

__all__ = ["SparsifyConfig", "SparsityPlan", "load", "plan_of", "save", "set_kernels", "sparsify"]
__version__ = "0.1.0"
