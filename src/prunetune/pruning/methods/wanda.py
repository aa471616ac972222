"""Wanda (Sun et al., 2024): prune by ``|W_ij| · ||X_j||₂`` within each output row, no weight update."""

from __future__ import annotations

import torch
from torch import Tensor

from ..hessian import compute_dtype
from ..masks import SparsitySpec, prune_mask_nm, prune_mask_rows, row_chunks
from . import register, reject_unknown_opts


@register("wanda", needs="norms")
def wanda(W: Tensor, H: Tensor, spec: SparsitySpec, *, damp: float = 0.01, blocksize: int = 128, **opts) -> Tensor:
    """Score |W_ij|·||X_j||₂, prune the lowest of each output row (N:M: of each group of M); weights not updated.

    ``H``: the column statistics ``2 Σ x_j² / N`` (in,) the driver collects for it, or a full ``H = 2 X Xᵀ / N``
    (its diagonal is used). ``||X_j||₂² = N/2 · H_jj``, so ``sqrt`` of them gives the same ranking. Dead inputs
    (``H_jj == 0``) score 0 and their column is zeroed. ``damp`` and ``blocksize`` are ignored.
    """
    reject_unknown_opts("wanda", opts, [])
    if H is None:
        raise ValueError("wanda needs the input column statistics (got None)")
    dtype = compute_dtype(W, H)
    Wc = W.to(dtype)
    diag = (H.diagonal() if H.dim() == 2 else H).to(device=W.device, dtype=dtype)
    norms = diag.clamp_min(0).sqrt()
    dead = diag == 0
    if spec.is_nm:
        spec.check_fits(W.shape[1], f"weight of shape {tuple(W.shape)}")
    zero = torch.zeros((), dtype=dtype, device=W.device)
    out = torch.empty_like(Wc)
    # every step is row-wise, so row chunks give the same result while the scores, the sort and the mask
    # of a whole matrix (~17 bytes per weight) never exist at once
    for sl in row_chunks(*Wc.shape):
        w = Wc[sl]
        scores = w.abs() * norms
        mask = prune_mask_nm(scores, spec.n, spec.m) if spec.is_nm else prune_mask_rows(scores, spec.sparsity)
        mask[:, dead] = True
        torch.where(mask, zero, w, out=out[sl])
    return out
