"""Mask search by ADMM over weights and support (DESIGN.md §7; the scheme of ALPS, Meng et al., 2024).

Layer problem, for a dampened Hessian ``H`` and weights ``W`` (rows = outputs)::

    min_Ŵ  tr((Ŵ − W) H (Ŵ − W)ᵀ)   subject to  Ŵ ∈ S   (k zeros in the matrix, per row, or N:M)

It is solved in the coordinates where ``H`` has a unit diagonal (``s_j = sqrt(H_jj)``, ``B = W diag(s)``,
``Ĥ = diag(s)⁻¹ H diag(s)⁻¹``), where a magnitude projection ranks weights by ``|W_ij| · ||X_j||`` — the
input-aware score — rather than by ``|W_ij|``. Splitting ``B' = Z`` (scaled dual ``U``)::

    B' ← (B Ĥ + ρ (Z − U)) (Ĥ + ρ I)⁻¹          (two triangular solves with the Cholesky factor for this ρ)
    Z  ← Proj_S(B' + U)                          (keep the largest magnitudes: per matrix, row or N:M group)
    U  ← U + B' − Z

with ``ρ`` rising while the support still moves (every ``check`` iterations: ×1.3 while more than 10% of the
kept entries changed, ×1.2 above 0.5%, ×1.1 below; divided by 5 when nothing moved before it ever rose), and
stopping when the support no longer changes (or after ``max_iter``). The support of ``Z`` is the mask; the
weights are then refit exactly on it by the caller (``apt.exact_solve`` / ``warm_solve``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import _lowest_mask

SCOPES = ("matrix", "row")


def project(X: Tensor, keep: int | None, *, scope: str = "matrix", n: int = 0, m: int = 0) -> Tensor:
    """Boolean mask of the entries kept by the magnitude projection onto the sparsity set (True = kept).

    Unstructured: the ``keep`` largest ``|X|`` of the matrix (``scope="matrix"``) or ``keep`` per row
    (``scope="row"``), found by selection (``kthvalue``, ties to the earlier position: ~2x faster than
    ``topk`` on a whole matrix, and it runs once per iteration); N:M (``n`` kept of every ``m`` consecutive
    inputs): the ``n`` largest of each group."""
    a = X.abs()
    if m:
        rows, cols = a.shape
        g = a.reshape(rows, cols // m, m)
        idx = torch.topk(g, n, dim=2).indices
        return torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    drop = (a.shape[1] if scope == "row" else a.numel()) - keep
    if drop <= 0:
        return torch.ones_like(a, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    return ~_lowest_mask(a if scope == "row" else a.reshape(-1), drop).view_as(a)


def admm_mask(W: Tensor, H: Tensor, *, keep: int | None = None, scope: str = "matrix", n: int = 0, m: int = 0,
              rho: float = 0.1, max_iter: int = 300, check: int = 3, min_iter: int = 30,
              tol: float = 3e-4) -> tuple[Tensor, Tensor, dict]:
    """``(mask, B', info)``: True = pruned; ``B'`` the last ADMM iterate back in the original coordinates (a
    warm start for the exact refit); ``info``: iterations, final ρ, last support change.

    ``H`` must be dampened (positive definite). ``keep``: weights kept (unstructured, per matrix or per row);
    ``n``/``m``: N:M. ``tol``: stop once fewer than this share of the kept entries changed in a check (after
    ``min_iter``), or when none did."""
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    s = H.diagonal().to(dt).clamp_min(torch.finfo(dt).tiny).sqrt()
    Hn = (H.to(dt) / s[:, None]) / s[None, :]
    B = W.to(dt) * s
    BH = B @ Hn
    L, L_rho = None, None
    Z = B * project(B, keep, scope=scope, n=n, m=m)
    U = torch.zeros_like(B)
    supp = Z != 0
    kept = int(supp.sum()) or 1
    rose, moved_once, it, change = False, False, 0, 1.0
    for it in range(1, max_iter + 1):
        if rho != L_rho:  # ρ changes at most once per check: one Cholesky factor serves those iterations
            L = None  # the old factor goes before the new one is made
            L = Hn.clone()
            L.diagonal().add_(rho)
            L, L_rho = torch.linalg.cholesky(L, out=L), rho
        Bp = torch.cholesky_solve((BH + rho * (Z - U)).t(), L).t()
        V = Bp + U
        sel = project(V, keep, scope=scope, n=n, m=m)
        Z = V * sel
        U = V - Z
        if it % check == 0:
            changed = int((sel != supp).sum())
            change = changed / kept
            supp = sel
            if changed:
                moved_once = True
            if change > 0.1:
                rho, rose = rho * 1.3, True
            elif change > 0.005:
                rho, rose = rho * 1.2, True
            elif changed:
                rho *= 1.1
            elif not rose and not moved_once and rho > 1e-6:
                rho /= 5  # ρ too large from the start: the support is frozen at the first projection
                Z = B * project(B, keep, scope=scope, n=n, m=m)
                U = torch.zeros_like(B)
                continue
            rho = min(rho, 1e6)
            if it >= min_iter and (changed == 0 or change < tol):
                break
    return ~sel, (Bp / s).to(W.dtype), {"iterations": it, "rho": rho, "last_support_change": change}
