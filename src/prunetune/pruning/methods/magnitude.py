"""Magnitude pruning: drop the weights with the smallest ``|W|``."""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import PrunetuneError
from ..hessian import compute_dtype
from ..masks import SparsitySpec, prune_mask_matrix, prune_mask_nm, prune_mask_rows
from . import register, reject_unknown_opts


@register("magnitude", needs="none")
def magnitude(W: Tensor, H: Tensor | None, spec: SparsitySpec, *, damp: float = 0.01, blocksize: int = 128,
              scope: str = "matrix", **opts) -> Tensor:
    """Zero the smallest |W| over the whole matrix (scope="matrix") or per output row (scope="row"); no calibration data.

    N:M: the M-N smallest |W| of each group of M consecutive input weights. ``H``, ``damp`` and
    ``blocksize`` are ignored.
    """
    reject_unknown_opts("magnitude", opts, ["scope"])
    if scope not in ("matrix", "row"):
        raise PrunetuneError(f"magnitude: scope must be 'matrix' or 'row' (got '{scope}')")
    Wc = W.to(compute_dtype(W))
    scores = Wc.abs()
    if spec.is_nm:
        spec.check_fits(W.shape[1], f"weight of shape {tuple(W.shape)}")
        mask = prune_mask_nm(scores, spec.n, spec.m)
    elif scope == "row":
        mask = prune_mask_rows(scores, spec.sparsity)
    else:
        mask = prune_mask_matrix(scores, spec.sparsity)
    return torch.where(mask, torch.zeros((), dtype=Wc.dtype, device=Wc.device), Wc)
