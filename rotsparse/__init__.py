"""rotsparse: training-free activation sparsity for Hugging Face causal LMs.

    import rotsparse
    model = rotsparse.sparsify(model, tokenizer, sparsity=0.4)
"""

from .api import set_kernels, sparsify
from .config import SparsifyConfig, SparsityPlan

__all__ = ["SparsifyConfig", "SparsityPlan", "set_kernels", "sparsify"]
__version__ = "0.1.0"
