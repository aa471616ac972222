"""SparseGPT (Frantar & Alistarh, 2023): OBS-style sequential pruning with lazy block updates.

Algorithm (as in the reference implementation):

* ``U`` = upper Cholesky factor of ``H⁻¹`` (dampened H), so that the OBS update for removing column ``j``
  from the columns ``≥ j`` is ``W[:, j:] -= (w_j − q_j) / U_jj · U[j, j:]``;
* columns are processed in blocks of ``blocksize``; at the start of a block the mask of the block is
  chosen from the current (already updated) weights by the score ``w² / U_jj²``: unstructured — by default
  (``mask_scope="block"``, the reference) one threshold over the whole block, all rows together: the score at
  position ``int(sparsity · rows · cols_in_block)`` of the block's sorted scores, every score ``≤`` it pruned,
  so rows end with different zero counts and a block can prune one or a few (ties) more than the share
  (0.002% of a 576 × 128 block); ``mask_scope="row"`` instead takes per row the lowest-scoring share of the
  block's columns, spread over blocks so that each row ends with exactly ``round(sparsity · in)`` zeros
  (measured on SmolLM2-135M at 70%, BENCHMARKS.md §1: the row scope scored better, WikiText-2 313.5 vs 332.3
  and C4 332.9 vs 382.0; the default stays the reference's); N:M — when a group of M columns starts, its
  ``M − N`` lowest;
* inside a block, one column at a time: zero the masked weights, spread their error over the block's
  remaining columns (directly within a micro-block of 16 columns, as one product for the block's columns after
  it); after the block, apply the accumulated error to all later columns at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import PrunetuneError
from ..hessian import PreparedHessian, prepare_hessian
from ..masks import SparsitySpec, num_pruned
from . import register, reject_unknown_opts


MASK_SCOPES = ("block", "row")
#: columns per micro-block inside a block: rank-1 updates reach only the micro-block's own later columns, the
#: rest of the block gets them as one (rows x 16) @ (16 x rest) product — the same sums in another order, far
#: fewer passes over the block on a CPU
_MICRO = 16


def sparsegpt_prune(W: Tensor, H: Tensor, spec: SparsitySpec, *, damp: float = 0.01, blocksize: int = 128,
                    prepared: PreparedHessian | None = None, mask_scope: str = "block",
                    keep_prepared: bool = True) -> tuple[Tensor, Tensor, PreparedHessian | None]:
    """SparseGPT; returns ``(W_new, mask, prepared)`` (mask: True = pruned by the algorithm).

    ``prepared`` (from `prepare_hessian(..., upper_inverse=True)`) can be passed to reuse the factorization.
    ``mask_scope`` (unstructured): ``"block"`` (the reference) or ``"row"`` (see the module docstring).
    ``keep_prepared=False`` (without ``prepared``): the dampened H is never kept and the weights are updated in
    the factorization's own copy (``prepared`` comes back None): two ``in × in`` matrices fewer at the peak.
    """
    if mask_scope not in MASK_SCOPES:
        raise PrunetuneError(f"sparsegpt: mask_scope must be 'block' or 'row' (got '{mask_scope}')")
    if spec.is_nm:
        spec.check_fits(W.shape[1], f"weight of shape {tuple(W.shape)}")
    own = prepared is None and not keep_prepared
    prep = prepared if prepared is not None else prepare_hessian(H, W, damp, upper_inverse=True, keep_h=not own)
    if prep.U is None:
        raise ValueError("sparsegpt_prune needs a PreparedHessian with the upper inverse factor U")
    U = prep.U
    W = prep.W if own else prep.W.clone()
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    bs = max(1, int(blocksize))
    mb = _MICRO
    if spec.is_nm:
        m, p = spec.m, spec.m - spec.n
        bs = max(m, bs // m * m)  # groups must not straddle blocks
        mb = max(m, mb // m * m)  # nor micro-blocks: a group's mask sees every earlier column's update

    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        # the block transposed (count, rows): each column of W is a contiguous row here, so the per-column steps
        # below read and write contiguous memory
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal().unsqueeze(1)
        mask1 = torch.zeros(count, rows, dtype=torch.bool, device=W.device)
        if not spec.is_nm and mask_scope == "block":
            score = W1.square() / d.square()
            k = int(score.numel() * spec.sparsity)
            if k < score.numel():  # the (k+1)-th smallest score: element k of the sorted block, by selection
                mask1 |= score <= score.reshape(-1).kthvalue(k + 1).values
            else:
                mask1.fill_(True)
        elif not spec.is_nm:
            kb = num_pruned(i2, spec.sparsity) - num_pruned(i1, spec.sparsity)
            if kb:
                score = W1.square() / d.square()
                mask1.scatter_(0, torch.topk(score, kb, dim=0, largest=False).indices, True)
        for j1 in range(0, count, mb):
            j2 = min(j1 + mb, count)
            for i in range(j1, j2):
                if spec.is_nm and i % m == 0:
                    score = W1[i:i + m].square() / d[i:i + m].square()
                    mask1[i:i + m].scatter_(0, torch.topk(score, p, dim=0, largest=False).indices, True)
                w = W1[i]
                err = torch.mul(w, mask1[i], out=Err1[i]).div_(d[i])  # (w - q) / d: q = w where it stays
                w.masked_fill_(mask1[i], 0.0)  # w becomes q; no later step reads its old value
                if i + 1 < j2:
                    W1[i + 1:j2].addr_(U1[i, i + 1:j2], err, alpha=-1.0)
            if j2 < count:  # the micro-block's rank-1 updates of the block's later columns, as one product
                W1[j2:].addmm_(U1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)
        W[:, i1:i2] = W1.t()
        mask[:, i1:i2] = mask1.t()
        if i2 < cols:
            W[:, i2:].addmm_(Err1.t(), U[i1:i2, i2:], alpha=-1.0)

    W[:, prep.dead] = 0.0
    return W, mask, (None if own else prep)


@register("sparsegpt")
def sparsegpt(W: Tensor, H: Tensor, spec: SparsitySpec, *, damp: float = 0.01, blocksize: int = 128,
              mask_scope: str = "block", **opts) -> Tensor:
    """SparseGPT: column blocks, mask by w²/[U]_jj² (U = Cholesky factor of H⁻¹), OBS updates of later columns.

    Options: ``damp`` (relative dampening of H), ``blocksize`` (columns per lazy-update block), ``mask_scope``
    (unstructured: ``block``, one threshold per block over all rows as the reference code — default — or
    ``row``, exactly ``round(sparsity · in)`` zeros in every row).
    """
    reject_unknown_opts("sparsegpt", opts, [])
    if spec.is_nm and mask_scope != "block":
        raise PrunetuneError(f"sparsegpt: mask_scope='{mask_scope}' applies to unstructured sparsity only (got {spec})")
    return sparsegpt_prune(W, H, spec, damp=damp, blocksize=blocksize, mask_scope=mask_scope, keep_prepared=False)[0]
