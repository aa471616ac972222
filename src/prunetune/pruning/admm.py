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


def _drop_flat(a: Tensor, drop: int, state: dict | None) -> Tensor:
    """True for the ``drop`` smallest entries of the 1-D ``a``, ties to the earlier position (the set of
    `masks._lowest_mask`). The threshold of the previous call (``state["t"]``) is a good guess: the k-th
    value is then selected among the entries of a narrow band around it, not among all of them — at a 7B
    MLP's 45M entries that avoids the full selection's value and int64 index copies (~0.5 GB) and on a
    SmolLM2 layer halves the projection's time. Same mask either way."""
    t = None
    hint = state.get("t") if state is not None else None
    if hint is not None and hint > 0:
        for width in (0.02, 0.2):
            lo, hi = hint * (1 - width), hint * (1 + width)
            n_lo = int((a < lo).sum())
            if n_lo < drop:
                band = (a >= lo) & (a <= hi)
                if n_lo + int(band.sum()) >= drop:
                    t = a[band].kthvalue(drop - n_lo).values
                    break
    if t is None:
        t = a.kthvalue(drop).values
    if state is not None:
        state["t"] = float(t)
    less = a < t
    eq = a == t
    need = drop - int(less.sum())
    if int(eq.sum()) == need:  # no tie beyond the threshold's own entries: no running count needed
        return less | eq
    return less | (eq & (eq.cumsum(0) <= need))


def project(X: Tensor, keep: int | None, *, scope: str = "matrix", n: int = 0, m: int = 0,
            state: dict | None = None) -> Tensor:
    """Boolean mask of the entries kept by the magnitude projection onto the sparsity set (True = kept).

    Unstructured: the ``keep`` largest ``|X|`` of the matrix (``scope="matrix"``) or ``keep`` per row
    (``scope="row"``), found by selection (``kthvalue``, ties to the earlier position: ~2x faster than
    ``topk`` on a whole matrix, and it runs once per iteration; over the matrix, ``state`` carries the last
    threshold from one call to the next, see `_drop_flat`); N:M (``n`` kept of every ``m`` consecutive
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
    if scope == "row":
        return ~_lowest_mask(a, drop)
    return ~_drop_flat(a.reshape(-1), drop, state).view_as(a)


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
    state: dict = {}  # the projection's last threshold (matrix scope)
    Z = B * project(B, keep, scope=scope, n=n, m=m, state=state)
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
        sel = project(V, keep, scope=scope, n=n, m=m, state=state)
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
                Z = B * project(B, keep, scope=scope, n=n, m=m, state=state)
                U = torch.zeros_like(B)
                continue
            rho = min(rho, 1e6)
            if it >= min_iter and (changed == 0 or change < tol):
                break
    return ~sel, (Bp / s).to(W.dtype), {"iterations": it, "rho": rho, "last_support_change": change}
