"""SPP — sparsity-preserving fine-tuning (DESIGN.md §4).

- ``layer.py``  the maths: ``SPPLinear`` (``y = x Wᵀ + s · dropout(x) · [(A ⊙ w_beta) ⊙ W]ᵀ``) and its merge
- ``model.py``  wrapping every targeted linear of a model, merging back, the adapters' state dict
- ``method.py`` the registered tuning method (options, dense-input check, adapter files, export)
"""

from .config import FORWARD_MODES, SPPConfig
from .layer import SPPLinear, block_sizes
from .method import DENSE_SPARSITY, SPPMethod
from .model import (apply_spp, count_trainable, load_spp_state_dict, merge_spp, spp_modules, spp_state_dict,
                    weight_sparsity)

__all__ = ["DENSE_SPARSITY", "FORWARD_MODES", "SPPConfig", "SPPLinear", "SPPMethod", "apply_spp", "block_sizes",
           "count_trainable", "load_spp_state_dict", "merge_spp", "spp_modules", "spp_state_dict",
           "weight_sparsity"]
