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
stopping when the support no longer changes (or after ``max_iter``); when ρ changes the scaled dual is rescaled
by ``ρ_old/ρ_new`` (the unscaled dual ``ρU`` carries over). The support of ``Z`` is the mask; the
weights are then refit exactly on it by the caller (``apt.exact_solve`` / ``warm_solve``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import _lowest_mask, row_chunks

SCOPES = ("matrix", "row")
#: the choices where the ALPS authors' code differs (see `admm_mask`), default first
CHOICES = {"support": ("z", "iterate"), "schedule": ("rise", "alps"), "dual": ("rescale", "keep")}


def bad_choice(**given) -> str | None:
    """The first of ``support`` / ``schedule`` / ``dual`` given a value outside `CHOICES`, said in one line."""
    for name, value in given.items():
        if value not in CHOICES[name]:
            return f"{name} must be {' or '.join(repr(c) for c in CHOICES[name])} (got '{value}')"
    return None


def _drop_flat(x: Tensor, drop: int) -> Tensor:
    """True for the ``drop`` entries of the 1-D ``x`` smallest in magnitude, ties to the earlier position (the
    set of `masks._lowest_mask` on ``|x|``), without a selection over all entries and without a copy of
    ``|x|``: the threshold is bracketed by two quantiles of an evenly strided sample (a prime stride, so every
    column of a weight matrix is visited), the entries between them are counted, and the exact k-th magnitude
    is selected among those only; magnitudes are compared through ``−t < x < t``. At a 7B MLP's 45M entries a
    full ``kthvalue`` copies the values and int64 indices (~0.5 GB) every iteration; this keeps a few bool
    masks. Same mask either way; if the bracket misses (never in practice), it widens, then falls back to the
    full selection. Counts use ``count_nonzero``: a bool tensor's ``sum`` makes an int64 copy."""
    numel = x.numel()
    if numel > 1 << 16:
        sample = x[::61].abs()
        ns = sample.numel()
        r = drop * ns / numel
        for width in (4.0, 32.0):
            d = width * (r * (1 - r / ns)) ** 0.5 + 16
            r_lo, r_hi = int(r - d), int(r + d) + 1
            lo = sample.kthvalue(r_lo).values if r_lo >= 1 else x.new_tensor(0.0)
            hi = sample.kthvalue(r_hi).values if r_hi <= ns else x.new_tensor(float("inf"))
            n_lo = int(torch.count_nonzero(_below(x, lo)))
            if n_lo < drop:
                band = x >= lo  # lo <= |x| <= hi, built in place: three bool masks at most at a time
                band &= x <= hi
                neg = x <= -lo
                neg &= x >= -hi
                band |= neg
                del neg
                if n_lo + int(torch.count_nonzero(band)) >= drop:
                    return _drop_at(x, drop, x[band].abs().kthvalue(drop - n_lo).values)
    return _drop_at(x, drop, x.abs().kthvalue(drop).values)


def _below(x: Tensor, t: Tensor) -> Tensor:
    """``|x| < t`` without a copy of ``|x|`` (two bool masks at a time)."""
    out = x < t
    out &= x > -t
    return out


def _drop_at(x: Tensor, drop: int, t: Tensor) -> Tensor:
    """Entries of magnitude below the k-th one ``t``, then the first of magnitude ``t``, ``drop`` in all."""
    less = _below(x, t)
    need = drop - int(torch.count_nonzero(less))
    tie = x == t
    tie |= x == -t
    ties = torch.nonzero(tie).squeeze(1)  # a handful: float32 values repeat at 45M entries
    del tie
    less[ties[:need]] = True
    return less


def project(X: Tensor, keep: int | None, *, scope: str = "matrix", n: int = 0, m: int = 0) -> Tensor:
    """Boolean mask of the entries kept by the magnitude projection onto the sparsity set (True = kept).

    Unstructured: the ``keep`` largest ``|X|`` of the matrix (``scope="matrix"``, see `_drop_flat`) or ``keep``
    per row (``scope="row"``, by selection, ties to the earlier position); N:M (``n`` kept of every ``m``
    consecutive inputs): the ``n`` largest of each group. Row-wise schemes go a chunk of rows at a time, so
    no copy of ``X``'s size is made."""
    rows, cols = X.shape
    if not m:
        drop = (cols if scope == "row" else X.numel()) - keep
        if drop <= 0:
            return torch.ones_like(X, dtype=torch.bool)
        if keep <= 0:
            return torch.zeros_like(X, dtype=torch.bool)
        if scope != "row":
            return _drop_flat(X.reshape(-1), drop).logical_not_().view_as(X)
    out = torch.empty_like(X, dtype=torch.bool)
    for sl in row_chunks(rows, cols):
        a = X[sl].abs()
        if m:
            g = a.reshape(a.shape[0], cols // m, m)
            idx = torch.topk(g, n, dim=2).indices
            out[sl] = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True).reshape(a.shape)
        else:
            out[sl] = ~_lowest_mask(a, drop)
    return out


def admm_mask(W: Tensor, H: Tensor, *, keep: int | None = None, scope: str = "matrix", n: int = 0, m: int = 0,
              rho: float = 0.1, max_iter: int = 300, check: int = 3, min_iter: int = 30,
              tol: float = 3e-4, support: str = "z", schedule: str = "rise",
              dual: str = "rescale") -> tuple[Tensor, Tensor, dict]:
    """``(mask, B', info)``: True = pruned; ``B'`` the last ADMM iterate back in the original coordinates (a
    warm start for the exact refit); ``info``: iterations, final ρ, last support change.

    ``H`` must be dampened (positive definite). ``keep``: weights kept (unstructured, per matrix or per row);
    ``n``/``m``: N:M. ``tol``: stop once fewer than this share of the kept entries changed in a check (after
    ``min_iter``), or when none did.

    Two choices where the ALPS authors' code (mazumder-lab/ALPS ``alps.py``) differs, kept selectable to
    measure them (``benchmarks/apt_layers.py``): ``support`` — the mask is the support of ``Z`` (``"z"``,
    default) or the projection of the last ``B'`` (``"iterate"``, as ALPS); ``schedule`` — ``"rise"`` (default,
    above) or ``"alps"``: before ρ ever rose, a small support change divides ρ by 5 and restarts from ``B``, no
    change divides it by 5 and goes on; once it rose, no change stops; ``dual`` — when ρ changes, the scaled
    dual ``U`` is rescaled by ``ρ_old/ρ_new`` so the unscaled dual ``ρU`` carries over (``"rescale"``, default:
    the textbook rule for a varying penalty, and what ALPS's unscaled ``V`` does) or kept as it is (``"keep"``,
    the default until every end-to-end run on SmolLM2 measured it behind ``rescale``: BENCHMARKS §13)."""
    bad = bad_choice(support=support, schedule=schedule, dual=dual)
    if bad:
        raise ValueError(f"admm {bad}")
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    s = H.diagonal().to(dt).clamp_min(torch.finfo(dt).tiny).sqrt()

    def normalised(out=None):  # Ĥ, remade for each factor rather than kept: one in × in fewer through the loop
        return torch.div(H.to(dt), s[:, None], out=out).div_(s[None, :])

    # (Z, U) are held as (V, S): Z = V·S, U = V·¬S — the projection splits V = B' + U into exactly these two —
    # so three matrices of W's size live through the loop (BH, V, B') and the factor, not four
    def start():  # Z₀ = Proj(B) and U₀ = 0, i.e. V = Z₀ with S all True
        B = W.to(dt) * s
        V = B * project(B, keep, scope=scope, n=n, m=m)
        return V, torch.ones_like(V, dtype=torch.bool)

    BH = (W.to(dt) * s) @ normalised()
    L, L_rho = None, None
    V, S = start()
    supp = V != 0
    kept = int(torch.count_nonzero(supp)) or 1
    rose, moved_once, it, change = False, False, 0, 1.0
    Bp = torch.empty_like(V)  # the right-hand side, solved in place into B'
    info = torch.empty((), dtype=torch.int32, device=W.device)
    for it in range(1, max_iter + 1):
        if rho != L_rho:  # ρ changes at most once per check: one Cholesky factor serves those iterations
            # Ĥ + ρI is written into a column-major buffer and factored there: LAPACK works in place, where a
            # row-major one is copied first (one in × in more at the peak, same factor bit for bit)
            L = None  # the old factor goes before the new one is made
            L = normalised(out=BH.new_empty(H.shape).mT)
            L.diagonal().add_(rho)
            torch.linalg.cholesky_ex(L, check_errors=True, out=(L, info))
            L_rho = rho
        # B' (Ĥ + ρI) = B Ĥ + ρ (Z − U), i.e. B' L Lᵀ = rhs: two triangular solves from the right, in place
        # (the same numbers as cholesky_solve, without its copies of the factor and the right-hand side)
        torch.where(S, V, torch.neg(V, out=Bp), out=Bp).mul_(rho).add_(BH)  # Z − U = ±V
        torch.linalg.solve_triangular(L.mT, Bp, upper=True, left=False, out=Bp)
        torch.linalg.solve_triangular(L, Bp, upper=False, left=False, out=Bp)
        V.masked_fill_(S, 0.0).add_(Bp)  # V = U + B'
        S = sel = project(V, keep, scope=scope, n=n, m=m)
        if it % check == 0:
            rho_was = rho
            changed = int(torch.count_nonzero(sel != supp))
            change = changed / kept
            supp = sel
            if changed:
                moved_once = True
            if change > 0.1:
                rho, rose = rho * 1.3, True
            elif change > 0.005:
                rho, rose = rho * 1.2, True
            elif schedule == "alps" and not rose:
                rho /= 5
                if changed:  # ALPS: ρ too large for the support to explore: smaller, from the start again
                    V, S = start()
                    supp = V != 0
                    continue
            elif schedule == "alps" and not changed:
                break
            elif changed:
                rho *= 1.1
            elif not rose and not moved_once and rho > 1e-6:
                rho /= 5  # ρ too large from the start: the support is frozen at the first projection
                V, S = start()
                continue
            rho = min(rho, 1e6)
            if dual == "rescale" and rho != rho_was:  # the unscaled dual ρU is what carries over
                torch.where(S, V, V * (rho_was / rho), out=V)
            if it >= min_iter and (changed == 0 or change < tol):
                break
    del BH, V, L  # B' goes back to the original coordinates in place, with nothing else of its size held
    if support == "iterate":
        sel = project(Bp, keep, scope=scope, n=n, m=m)
    return ~sel, Bp.div_(s).to(W.dtype), {"iterations": it, "rho": rho, "last_support_change": change}
