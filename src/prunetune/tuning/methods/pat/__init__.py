"""PAT — pruning-aware tuning (DESIGN.md §5): learn which hidden channels to drop while fine-tuning, then
remove them physically to get a plain Hugging Face checkpoint with a smaller ``hidden_size``.

- ``mask.py``   the Unified Sparsification Mask (one gate over the hidden channels, shared by every HSM)
- ``hsm.py``    Hybrid Sparsification Modules ``z = m ⊙ D y`` on the embedding and every residual writer
- ``shrink.py`` the exact shrink (merge LoRA, fold D, slice readers, rescale RMSNorm gains and eps)
- ``method.py`` ``PATConfig`` and ``PATMethod``, the hooks the shared training loop calls
"""

from .hsm import HSM, PATModules, default_rank
from .mask import UnifiedMask, n_keep_for
from .method import PATConfig, PATMethod, check_model, hsm_paths
from .shrink import find_pat, save_shrunk, shrink_model

__all__ = ["HSM", "PATConfig", "PATMethod", "PATModules", "UnifiedMask", "check_model", "default_rank",
           "find_pat", "hsm_paths", "n_keep_for", "save_shrunk", "shrink_model"]
