"""APT: optimal multiple removal — remove a whole set of weights of a row at once, optimally.

For one output row ``w`` (1 × in), dampened Hessian ``H`` and a removal set ``P`` (kept set ``K``), the
change ``δw`` minimising ``δw H δwᵀ`` subject to ``(w + δw)_P = 0`` is

    δw* = − w_P · [(H⁻¹)_PP]⁻¹ · (H⁻¹)_{P,:}        with loss  L(P) = ½ · w_P [(H⁻¹)_PP]⁻¹ w_Pᵀ = ½ · δw* H δw*ᵀ

or, equivalently, on the kept set: ``ŵ_K = w · H_{:,K} · (H_KK)⁻¹``, ``ŵ_P = 0`` — the exact least-squares
optimum of ``||(ŵ − w) X||²`` for that mask (with ``H = 2 X Xᵀ / N`` the loss is ``(1/N)·||δw X||²``).
Every surviving weight is updated (SparseGPT only updates the columns to the right of each removed one),
so on the same mask APT's layer error is never larger. For a single weight it is the OBS update.

`exact_solve` computes this for every row: small systems directly, batched over chunks of rows that share
``|P|``, with Cholesky on the gathered ``(rows, s, s)`` systems, ``s = min(|P|, |K|)`` (K-form on ``H_KK``
or P-form on ``(H⁻¹)_PP``); large ones (``s > 512``) by conjugate gradients on ``H_KK`` shared by all rows
(one dense matmul per iteration), preconditioned by ``(H⁻¹)_KK``, to a relative residual of 1e-6 in
float32 (rows that do not converge fall back to the direct solve).

Mask selection (option ``select``):

* ``"admm"`` (default) — the mask found by ADMM over weights and support (``pruning/admm.py``, the scheme of
  ALPS): unstructured over the whole matrix (``admm_scope="matrix"``, default: exactly the asked share of the
  matrix, rows differ) or per row (``"row"``), N:M per group; the dual rescaled when ρ changes
  (``admm_dual="rescale"``: below the former ``"keep"`` in every end-to-end SmolLM2 run, in and out of the
  calibration domain, BENCHMARKS §13); then the exact refit on that support
  (`exact_solve`: batched Cholesky for systems of at most 512 weights, else PCG started from ADMM's last
  iterate to a relative residual of 1e-6, rows that do not converge solved directly). **Exact**: on 20 real
  SmolLM2 layers at 50%, 70% and 2:4 the float32 result is at most 2e-6 above the float64 direct optimum
  for its mask, 1e-7 on average (tested at 1e-4 on correlated synthetic layers). If the layer's total
  (dampened) error is not below SparseGPT's (run with the same dampening), the layer takes SparseGPT's mask
  instead, refit exactly the same way (never above that SparseGPT's error). ``admm_iter`` bounds the
  iterations (default 300; it stops at 30-40, when the support no longer moves). On SmolLM2 layers: 15-18%
  less layer error than ``"sparsegpt"`` at 50-70% and 9% at 2:4, for 22-27x SparseGPT's method time on CPU
  (``benchmarks/apt_layers.py``; BENCHMARKS.md §1 has the end-to-end numbers).
* ``"sparsegpt"`` — the mask SparseGPT's sequential procedure chooses (it adapts the mask to the weights
  already updated, block by block), with every kept weight then moved towards the optimum for that mask.
  **Approximate**: the solve is CG on ``H_KK`` started from SparseGPT's own weights (`warm_solve`), stopped
  once the estimated gain still to come is below 0.1% of a row's error; measured on 20 real SmolLM2 linears
  (``benchmarks/apt_layers.py``, 70% and 2:4) the layer error ends 0.2% above the exact optimum on average and
  0.9% at worst, for 2.5-3.0x SparseGPT's time (``solver="direct"``: exact, 4-17x). Rows keep SparseGPT's
  weights wherever the re-solve would not lower the error under both the dampened H (the one every solve
  minimises) and the caller's undampened H (the reported layer error): APT's layer error is ≤ SparseGPT's by
  construction. The fast choice.
* ``"obs"`` — unstructured: per row, the lowest saliency ``w_j² / [H⁻¹]_jj`` (optionally over ``rounds``
  rounds: each round removes a further share of the weights, ranked by the saliency of the current optimal
  weights w.r.t. the inverse Hessian of the surviving inputs). N:M: in each group of M columns, the subset
  ``P`` of size ``M − N`` minimising ``L(P)`` restricted to the group (all C(M, M−N) subsets, vectorised).
* ``"best"`` — the OBS and SparseGPT masks both solved exactly; per row the lowest error wins, under the
  same guard. Several times slower; on the layers measured so far the OBS mask rarely wins a row.

Dampening: APT solves with ``H + λ·mean(diag H)·I``, λ = ``damp`` (``--damp``), by default **0.03**, 3x
SparseGPT's 0.01. The term is a ridge that keeps each kept weight nearer its value where the calibration inputs
say little, so that the mask search and the exact refit do not fit the calibration text alone. Chosen on
scores outside the calibration domain (BENCHMARKS.md §1, "Dampening and the calibration domain"): the smallest
of 0.01, 0.03, 0.1 with which APT beats SparseGPT on every other-domain score measured. SmolLM2-135M calibrated
on TinyStories scores WikiText-2 worse than SparseGPT with λ = 0.01 (70%: 985.8 vs 893.4; 2:4: 229.7 vs
227.1) and better with 0.03 (863.1; 220.4); calibrated on C4, 0.03 scores WikiText-2 about as 0.01 does
(70%: 182.6 vs 183.0; 2:4: 91.1 vs 89.1) for a higher perplexity on C4 itself at 70% (210.9 vs 199.3).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ...errors import PrunetuneError
from ..hessian import PreparedHessian, prepare_hessian
from ..masks import SparsitySpec, num_pruned, prune_mask_rows
from . import register, reject_unknown_opts
from .sparsegpt import sparsegpt_prune

# APT's default dampening, 3x SparseGPT's (see "Dampening" in the module docstring).
APT_DAMP = 0.03
# Elements of one gathered (rows, s, s) batch; bounds the memory of the batched solves (~128 MB float32).
_BATCH_ELEMS = 1 << 25
# Elements of W per chunk of rows solved together by CG (~10 vectors of state each: ~160 MB float32; 1024 rows
# of a 4096-wide layer still make full-speed products). Rows are independent: the chunking changes no result.
_CG_CHUNK = 1 << 22
# Beyond this many subsets per N:M group, fall back to per-weight saliency within the group.
_MAX_NM_SUBSETS = 5000


def _chunk_rows(s: int, chunk_rows: int | None) -> int:
    if chunk_rows:
        return max(1, int(chunk_rows))
    return max(1, _BATCH_ELEMS // max(1, s * s))


def _gather_square(A: Tensor, idx: Tensor) -> Tensor:
    """``A[idx_r][:, idx_r]`` for each row of ``idx`` (r, s) → (r, s, s). Two ``index_select`` per row rather than
    one broadcast advanced index, which builds an int64 index of r·s·s entries (twice the result's bytes in
    float32) and runs half as fast (SmolLM2 q_proj at 2:4: 0.21 s against 0.41 s); the same numbers."""
    out = A.new_empty(idx.shape[0], idx.shape[1], idx.shape[1])
    for r in range(idx.shape[0]):
        torch.index_select(A.index_select(0, idx[r]), 1, idx[r], out=out[r])
    return out


def _batched_spd_solve(A: Tensor, b: Tensor) -> Tensor:
    """Solve ``A x = b`` for SPD ``A`` (r, s, s), ``b`` (r, s); falls back to float64 LU where Cholesky fails."""
    L, info = torch.linalg.cholesky_ex(A)
    y = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False)
    x = torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(x).all(-1)
    if bad.any():
        xb = torch.linalg.solve(A[bad].double(), b[bad].double().unsqueeze(-1)).squeeze(-1)
        x[bad] = xb.to(x.dtype)
    return x


def _pcg_solve(W: Tensor, H: Tensor, Hinv: Tensor | None, mask: Tensor, tol: float, maxiter: int,
               x0: Tensor | None = None, gap: float | None = None) -> tuple[Tensor, Tensor]:
    """All rows at once: conjugate gradients on ``H_KK x_K = (w H)_K`` (x_P = 0).

    Each iteration is one dense (rows × in) @ (in × in) product shared by all rows. Preconditioned by
    ``(H⁻¹)_KK`` when ``Hinv`` is given, else by ``diag(H)`` (Jacobi). Starts from ``x0`` when given (its
    removed entries are ignored), else from the preconditioned right-hand side. CG lowers the row error
    ``e(x) = (x − w) H (x − w)ᵀ`` monotonically (each step by ``α·rᵀz``), so every iterate is at least as good
    as ``x0``. A row stops when its relative residual reaches ``tol`` or, with ``gap``, when the estimated
    error still to gain (``rᵀ z ≈ rᵀ H_KK⁻¹ r``) is below ``gap · e(x)``. Returns the solution and a bool
    per row telling whether it stopped by either test.

    The vector updates are fused (``addcmul_``, one pass each, no temporaries): at the sizes of a layer the
    element-wise work of an iteration costs as much as its GEMM otherwise.
    """
    keep = (~mask).to(W.dtype)
    tiny = torch.finfo(W.dtype).tiny
    if Hinv is None:
        dkeep = keep / H.diagonal()  # Jacobi, restricted to the kept entries, in one multiply

        def precond(r):
            return r * dkeep
    else:
        def precond(r):
            return (r @ Hinv).mul_(keep)

    def rowdot(a, b):
        return torch.linalg.vecdot(a, b, dim=1).unsqueeze(1)

    WH = W @ H
    b = WH * keep
    bnorm = b.norm(dim=1).clamp_min(tiny)
    x = precond(b) if x0 is None else x0 * keep
    xH = x @ H
    r = b - xH * keep
    z = precond(r)
    p = z.clone()
    rz = rowdot(r, z)
    done = r.norm(dim=1) <= tol * bnorm
    if gap is not None:
        err = rowdot(xH - WH, x - W)  # e(x), tracked through the step decrements below
        done |= (rz <= gap * err).squeeze(1)
    del WH, xH, b
    for _ in range(maxiter):
        if bool(done.all()):
            break
        Ap = torch.mm(p, H).mul_(keep)
        pAp = rowdot(p, Ap)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(tiny), torch.zeros_like(pAp))
        alpha[done] = 0.0  # freeze converged rows
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, Ap, value=-1.0)
        done |= r.norm(dim=1) <= tol * bnorm
        z = precond(r)
        rz_new = rowdot(r, z)
        if gap is not None:
            err -= alpha * rz
            done |= (rz_new <= gap * err).squeeze(1)
        p.mul_(rz_new / rz.clamp_min(tiny)).add_(z)
        rz = rz_new
    return x, done


def warm_solve(W: Tensor, H: Tensor, mask: Tensor, x0: Tensor, *, tol: float | None = None,
               gap: float | None = None, maxiter: int = 200) -> Tensor:
    """Optimal weights for a fixed mask by Jacobi-preconditioned CG started from a good guess ``x0``.

    Started from SparseGPT's weights for SparseGPT's own mask, a few iterations reach the optimum (one shared
    GEMM per iteration, no per-row factorisation), and since CG never increases the error, the result is never
    worse than ``x0`` even where ``maxiter`` stops it early. A row stops at relative residual ``tol`` or when
    the estimated error still to gain is below ``gap`` times its error. Defaults: float32 ``tol`` 1e-6 and
    ``gap`` 1e-3 (measured on the seven shapes of a SmolLM2 layer: the error ends within 0.15% of the
    optimum, relative, where APT is 32-35% below SparseGPT; ``gap`` 1e-4 gets within 0.015% for 30% more
    CG time); float64 ``tol`` 1e-13 and no ``gap`` (solved to round-off). Rows go in chunks of ~4M
    elements."""
    f64 = W.dtype == torch.float64
    tol = tol if tol is not None else (1e-13 if f64 else 1e-6)
    gap = gap if gap is not None else (None if f64 else 1e-3)
    H = H.to(W.dtype)
    out = torch.empty_like(W)
    step = max(1, _CG_CHUNK // max(1, W.shape[1]))
    for r0 in range(0, W.shape[0], step):
        sl = slice(r0, r0 + step)
        x, _ = _pcg_solve(W[sl], H, None, mask[sl], tol, maxiter, x0=x0[sl].to(W.dtype), gap=gap)
        out[sl] = x.masked_fill(mask[sl], 0.0)
    return out


def cg_preconditioner(H: Tensor) -> Tensor:
    """``H⁻¹`` for preconditioning CG, in H's dtype (enough for a preconditioner), inverted in place in its
    (column-major) Cholesky factor: one ``in × in`` besides ``H``, where factor and inverse apart make two."""
    Hinv = torch.linalg.cholesky(H)
    return torch.cholesky_inverse(Hinv, out=Hinv)


# Systems of at most this size are solved directly (batched Cholesky); larger ones by shared PCG.
_DIRECT_MAX = 512


def exact_solve(W: Tensor, H: Tensor, mask: Tensor, *, Hinv: Tensor | None = None, form: str = "auto",
                chunk_rows: int | None = None, solver: str = "auto", tol: float | None = None,
                maxiter: int = 300, x0: Tensor | None = None, overwrite_x0: bool = False) -> Tensor:
    """Optimal weights for a fixed removal mask: per row ``ŵ_K = w H_{:,K} (H_KK)⁻¹``, ``ŵ_P = 0``.

    ``H`` is the (already dampened, positive definite) Hessian; ``mask`` True = removed. Rows may have
    different ``|P|`` (they are grouped). Removed entries are exactly 0.0 in the result.

    ``solver``: "direct" — batched Cholesky on ``(rows, s, s)`` gathered systems, ``s = min(|P|, |K|)``,
    ``form`` "auto" (smaller system), "K" or "P"; "cg" — preconditioned conjugate gradients shared by all
    rows to a relative residual ``tol`` (default 1e-6 in float32, 1e-12 in float64), rows that do not
    converge within ``maxiter`` are re-solved directly; "auto" — direct when ``s <= 512``, else cg. ``x0``: a
    start for cg (e.g. ADMM's last iterate: on SmolLM2 layers ~35% fewer iterations and a float32 result
    within 1e-7 of the float64 optimum instead of up to 1.3e-4 from a cold start); with ``overwrite_x0`` the cg
    result is written into ``x0`` (when it has W's dtype and shape) instead of a new weight-sized tensor.
    """
    if form not in ("auto", "K", "P"):
        raise ValueError(f"form must be 'auto', 'K' or 'P' (got {form!r})")
    if solver not in ("auto", "direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg' (got {solver!r})")
    rows, cols = W.shape
    H = H.to(W.dtype)
    p_all = mask.sum(1)
    s_max = int(torch.minimum(p_all, cols - p_all).max()) if rows else 0
    if solver == "cg" or (solver == "auto" and s_max > _DIRECT_MAX):
        if Hinv is None:
            Hinv = cg_preconditioner(H)
        tol = tol if tol is not None else (1e-12 if W.dtype == torch.float64 else 1e-6)
        reuse = (overwrite_x0 and x0 is not None and x0.dtype == W.dtype and x0.shape == W.shape
                 and x0.is_contiguous())
        out = x0 if reuse else W.clone()  # each chunk of x0 is read before its rows are written
        step = max(1, _CG_CHUNK // max(1, cols))
        for r0 in range(0, rows, step):
            sl = slice(r0, r0 + step)
            x, ok = _pcg_solve(W[sl], H, Hinv, mask[sl], tol, maxiter,
                               x0=None if x0 is None else x0[sl].to(W.dtype))
            if not bool(ok.all()):
                bad = (~ok).nonzero().squeeze(1)
                x[bad] = exact_solve(W[sl][bad], H, mask[sl][bad], form="K", solver="direct")  # H alone: exact
            out[sl] = x.masked_fill(mask[sl], 0.0)
        return out
    out = W.clone()
    for p in torch.unique(p_all).tolist():
        sel = (p_all == p).nonzero().squeeze(1)
        k = cols - p
        if p == 0:
            continue
        if k == 0:
            out[sel] = 0.0
            continue
        use_k = form == "K" or (form == "auto" and k <= p)
        if not use_k and Hinv is None:
            Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H.double())).to(W.dtype)
        s = k if use_k else p
        step = _chunk_rows(s, chunk_rows)
        for c0 in range(0, sel.numel(), step):
            r = sel[c0:c0 + step]
            w = W[r]
            # stable sort of the mask: kept (False) columns first, removed (True) last, each in column order
            order = torch.sort(mask[r].to(torch.int8), dim=1, stable=True).indices
            idx_k, idx_p = order[:, :k], order[:, k:]
            if use_k:
                b = torch.gather(w @ H, 1, idx_k)
                x = _batched_spd_solve(_gather_square(H, idx_k), b)
                new = torch.zeros_like(w).scatter_(1, idx_k, x)
            else:
                z = _batched_spd_solve(_gather_square(Hinv, idx_p), torch.gather(w, 1, idx_p))
                new = w - torch.zeros_like(w).scatter_(1, idx_p, z) @ Hinv
                new.scatter_(1, idx_p, 0.0)
            out[r] = new
    return out


def _kept_inverse_diag(H: Tensor, mask: Tensor, chunk_rows: int | None) -> Tensor:
    """Per row, ``diag((H_KK)⁻¹)`` scattered to the kept columns (removed columns: +inf)."""
    rows, cols = mask.shape
    out = torch.full((rows, cols), float("inf"), dtype=H.dtype, device=H.device)
    counts = mask.sum(1)
    for p in torch.unique(counts).tolist():
        sel = (counts == p).nonzero().squeeze(1)
        k = cols - p
        if k == 0:
            continue
        step = _chunk_rows(k, chunk_rows)
        eye = torch.eye(k, dtype=H.dtype, device=H.device)
        for c0 in range(0, sel.numel(), step):
            r = sel[c0:c0 + step]
            idx_k = torch.sort(mask[r].to(torch.int8), dim=1, stable=True).indices[:, :k]
            L, info = torch.linalg.cholesky_ex(_gather_square(H, idx_k))
            if (info != 0).any():
                d = torch.linalg.inv(_gather_square(H, idx_k).double()).diagonal(dim1=1, dim2=2).to(H.dtype)
            else:
                Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
                d = Linv.square().sum(1)  # (L⁻ᵀ L⁻¹)_jj = Σ_i (L⁻¹)_ij²
            out[r] = out[r].scatter(1, idx_k, d)
    return out


def _obs_mask_unstructured(W0: Tensor, prep: PreparedHessian, Hinv: Tensor, sparsity: float, rounds: int,
                           chunk_rows: int | None, solver: str = "auto") -> Tensor:
    rows, cols = W0.shape
    k_total = num_pruned(cols, sparsity)
    saliency = W0.square() / Hinv.diagonal()
    if rounds <= 1 or k_total == 0:
        return prune_mask_rows(saliency, sparsity)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W0.device)
    done = 0
    for r in range(1, rounds + 1):
        target = int(math.floor(k_total * r / rounds + 0.5))
        add = target - done
        if add <= 0:
            continue
        if r > 1:
            w_cur = exact_solve(W0, prep.H, mask, Hinv=Hinv, chunk_rows=chunk_rows, solver=solver)
            saliency = w_cur.square() / _kept_inverse_diag(prep.H, mask, chunk_rows)
        s = saliency.masked_fill(mask, float("inf"))
        mask.scatter_(1, torch.topk(s, add, dim=1, largest=False).indices, True)
        done = target
    return mask


def _obs_mask_nm(W0: Tensor, Hinv: Tensor, n: int, m: int, chunk_rows: int | None) -> Tensor:
    """Per group of m columns, the removal subset of size m-n with the lowest ``L(P)`` (H⁻¹ restricted to the group)."""
    rows, cols = W0.shape
    p = m - n
    G = cols // m
    mask = torch.zeros(rows, G, m, dtype=torch.bool, device=W0.device)
    if math.comb(m, p) > _MAX_NM_SUBSETS:
        sal = (W0.square() / Hinv.diagonal()).view(rows, G, m)
        mask.scatter_(2, torch.topk(sal, p, dim=2, largest=False).indices, True)
        return mask.view(rows, cols)
    subsets = torch.tensor(list(itertools.combinations(range(m), p)), device=W0.device)  # (C, p)
    C = subsets.shape[0]
    idx = torch.arange(G, device=W0.device).mul_(m)[:, None, None] + subsets[None]  # (G, C, p)
    S = Hinv.double()[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (G, C, p, p)
    Sinv = torch.linalg.inv(S).to(W0.dtype)
    step = chunk_rows or max(1, _BATCH_ELEMS // (G * C * p * 2))
    Wg = W0.view(rows, G, m)
    for r0 in range(0, rows, step):
        wP = Wg[r0:r0 + step][:, :, subsets]  # (r, G, C, p)
        loss = torch.einsum("rgcp,gcpq,rgcq->rgc", wP, Sinv, wP)
        best = subsets[loss.argmin(-1)]  # (r, G, p)
        mask[r0:r0 + step].scatter_(2, best, True)
    return mask.view(rows, cols)


def _row_err(W_old: Tensor, W_new: Tensor, H: Tensor) -> Tensor:
    """Per-row ``δw H δwᵀ`` in the working dtype (cheaper than the float64 `row_errors` used for reports), in
    chunks of rows (three temporaries of a chunk's size, not of W's)."""
    H = H.to(W_new.dtype)
    out = torch.empty(W_new.shape[0], dtype=W_new.dtype, device=W_new.device)
    step = max(1, _CG_CHUNK // max(1, W_new.shape[1]))
    for r0 in range(0, W_new.shape[0], step):
        D = W_new[r0:r0 + step] - W_old[r0:r0 + step].to(W_new.dtype)
        out[r0:r0 + step] = ((D @ H) * D).sum(1)
    return out


SELECTS = ("sparsegpt", "obs", "best", "admm")


def apt_prune(W: Tensor, H: Tensor, spec: SparsitySpec, *, damp: float = APT_DAMP, blocksize: int = 128,
              select: str = "admm", rounds: int = 1, chunk_rows: int | None = None, solver: str = "auto",
              maxiter: int = 200, admm_scope: str = "matrix", admm_iter: int = 300, admm_support: str = "z",
              admm_schedule: str = "rise", admm_dual: str = "rescale", refit_iter: int | None = None) -> Tensor:
    """See module docstring; returns the new weight."""
    if select not in SELECTS:
        raise PrunetuneError(f"apt: select must be one of {', '.join(SELECTS)} (got '{select}')")
    if admm_scope not in ("matrix", "row"):
        raise PrunetuneError(f"apt: admm_scope must be 'matrix' or 'row' (got '{admm_scope}')")
    try:
        admm_ok = int(admm_iter) >= 1
    except (TypeError, ValueError):
        admm_ok = False
    if not admm_ok:
        raise PrunetuneError(f"apt: admm_iter must be a positive integer (got '{admm_iter}')")
    admm_iter = int(admm_iter)
    from ..admm import bad_choice

    bad = bad_choice(support=admm_support, schedule=admm_schedule, dual=admm_dual)
    if bad:
        raise PrunetuneError(f"apt: admm_{bad}")
    if refit_iter is not None and (not str(refit_iter).isdigit() or int(refit_iter) < 1):
        raise PrunetuneError(f"apt: refit_iter must be a positive integer (got '{refit_iter}')")
    try:
        rounds = int(rounds)
    except (TypeError, ValueError):
        raise PrunetuneError(f"apt: rounds must be a positive integer (got '{rounds}')") from None
    if rounds < 1:
        raise PrunetuneError(f"apt: rounds must be a positive integer (got '{rounds}')")
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise PrunetuneError(f"apt: chunk_rows must be a positive integer (got '{chunk_rows}')")
    if solver not in ("auto", "direct", "cg"):
        raise PrunetuneError(f"apt: solver must be 'auto', 'direct' or 'cg' (got '{solver}')")
    if int(maxiter) < 1:
        raise PrunetuneError(f"apt: maxiter must be a positive integer (got '{maxiter}')")
    if spec.is_nm:
        spec.check_fits(W.shape[1], f"weight of shape {tuple(W.shape)}")

    def solve(mask, x0=None, overwrite_x0=False):
        out = exact_solve(W0, prep.H, mask, Hinv=Hinv, chunk_rows=chunk_rows, solver=solver, x0=x0,
                          overwrite_x0=overwrite_x0)
        out[:, prep.dead] = 0.0
        return out

    need_obs = select in ("obs", "best")
    Hinv = None
    if select == "admm":
        # The dampened H is the caller's own, its diagonal changed in place and put back before returning, and W
        # is not copied (no dead input): one in × in and one weight fewer in every phase. SparseGPT first, for
        # the error to beat; its weights and H⁻¹'s factor are not held through ADMM (remade in the rare layer
        # that falls back); the refit writes over ADMM's iterate. At a 7B down_proj: 1,361 MiB above the inputs
        # at the peak (ADMM), SparseGPT alone 1,285 MiB (benchmarks/apt_memory_7b.py).
        prep = prepare_hessian(H, W, damp, upper_inverse=True, in_place=True)
        try:
            W0 = prep.W
            W_sg, _, _ = sparsegpt_prune(W, H, spec, damp=damp, blocksize=blocksize, prepared=prep)
            e_sg = float(_row_err(W0, W_sg, prep.H).sum())
            del W_sg
            prep.U = None
            mask, last = _admm_mask(W0, prep, spec, admm_scope, admm_iter, support=admm_support,
                                    schedule=admm_schedule, dual=admm_dual)
            if refit_iter is None:
                W_admm = solve(mask, last, overwrite_x0=True)
            else:  # stopped early from ADMM's iterate, as the ALPS code's 10 CG iterations
                W_admm = warm_solve(W0, prep.H, mask, last, maxiter=int(refit_iter))
                W_admm[:, prep.dead] = 0.0
            del mask, last
            e_admm = float(_row_err(W0, W_admm, prep.H).sum())
        finally:
            prep.restore()
        if math.isfinite(e_admm) and e_admm <= e_sg:
            return W_admm
        del W_admm  # the whole layer on SparseGPT's mask, refit exactly (CG from SparseGPT's weights)
    prep = prepare_hessian(H, W, damp, upper_inverse=select != "obs")
    W0 = prep.W
    Hinv = prep.inverse() if need_obs else None
    if need_obs:
        if spec.is_nm:
            obs_mask = _obs_mask_nm(W0, Hinv, spec.n, spec.m, chunk_rows)
        else:
            obs_mask = _obs_mask_unstructured(W0, prep, Hinv, spec.sparsity, rounds, chunk_rows, solver)
        W_obs = solve(obs_mask)
        if select == "obs":
            return W_obs
    W_sg, sg_mask, _ = sparsegpt_prune(W, H, spec, damp=damp, blocksize=blocksize, prepared=prep)
    if select == "sparsegpt" and solver == "auto":  # CG from SparseGPT's weights, stopped at an estimated 0.1% gain
        W_ex = warm_solve(W0, prep.H, sg_mask | prep.dead, W_sg, maxiter=int(maxiter))
    else:  # exact (an ADMM layer that fell back keeps the default's exactness)
        W_ex = solve(sg_mask, W_sg)
    # per row, the lowest error among the candidates, and only where it is <= SparseGPT's own row under both
    # the dampened H (the one every solve minimises) and the caller's undampened H (the reported layer error)
    cands = [W_obs, W_ex] if need_obs else [W_ex]
    e_d_sg = _row_err(W0, W_sg, prep.H)
    e_u_sg = _row_err(W, W_sg, H)
    best = W_sg.clone()
    best_e = e_d_sg.clone()
    for Wc in cands:
        e_d = _row_err(W0, Wc, prep.H)
        e_u = _row_err(W, Wc, H)
        ok = (e_d <= e_d_sg) & (e_u <= e_u_sg) & (e_d <= best_e) & torch.isfinite(Wc).all(1)
        best[ok] = Wc[ok]
        best_e[ok] = e_d[ok]
    return best


def _admm_mask(W0: Tensor, prep: PreparedHessian, spec: SparsitySpec, scope: str,
               max_iter: int, **how) -> tuple[Tensor, Tensor]:
    """The ADMM support for ``spec`` (True = removed, dead inputs removed as well) and ADMM's last iterate
    (the start of the refit's CG)."""
    from ..admm import admm_mask

    rows, cols = W0.shape
    if spec.is_nm:
        mask, last, _ = admm_mask(W0, prep.H, n=spec.n, m=spec.m, max_iter=max_iter, **how)
    else:
        keep = (rows * cols - num_pruned(rows * cols, spec.sparsity) if scope == "matrix"
                else cols - num_pruned(cols, spec.sparsity))
        mask, last, _ = admm_mask(W0, prep.H, keep=keep, scope=scope, max_iter=max_iter, **how)
    return mask | prep.dead, last


@register("apt", damp=APT_DAMP)
def apt(W: Tensor, H: Tensor, spec: SparsitySpec, *, damp: float = APT_DAMP, blocksize: int = 128, **opts) -> Tensor:
    """APT: optimal multiple removal — exact least-squares update of all kept weights for the chosen mask.

    Options: ``select`` = "admm" (default: the mask searched by ADMM, ``admm_scope`` "matrix" | "row",
    ``admm_iter``, ``admm_support`` "z" | "iterate", ``admm_schedule`` "rise" | "alps", ``admm_dual`` "keep" | "rescale" (`pruning.admm`), then
    refit exactly, or with ``refit_iter`` CG iterations from ADMM's iterate (approximate, as the ALPS code); a layer where it loses to SparseGPT takes SparseGPT's mask, refit
    exactly), "sparsegpt" (SparseGPT's mask, weights re-solved by CG to within ~0.2% of the optimum, never worse
    than SparseGPT: the fast choice), "obs" or "best"; ``rounds`` (unstructured "obs" selection, default 1);
    ``chunk_rows`` (rows per batched direct solve); ``solver`` = "auto" (default: batched Cholesky or
    warm-started PCG by size; for select="sparsegpt" the approximate CG above), "direct" or "cg" (see
    `exact_solve`); ``maxiter`` (CG iterations of select="sparsegpt", default 200); ``damp``; ``blocksize``
    (for SparseGPT's mask).
    """
    allowed = {"select", "rounds", "chunk_rows", "solver", "maxiter", "admm_scope", "admm_iter", "admm_support",
               "admm_schedule", "admm_dual", "refit_iter"}
    reject_unknown_opts("apt", {k: v for k, v in opts.items() if k not in allowed}, sorted(allowed))
    if spec.is_nm and opts.get("admm_scope", "matrix") != "matrix":
        raise PrunetuneError(f"apt: admm_scope='{opts['admm_scope']}' applies to unstructured sparsity only "
                             f"(got {spec})")
    if spec.is_nm and "rounds" in opts and str(opts["rounds"]) != "1":
        raise PrunetuneError(f"apt: rounds applies to unstructured sparsity only (got {spec})")
    return apt_prune(W, H, spec, damp=damp, blocksize=blocksize, **opts)
