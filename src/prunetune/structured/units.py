"""Remove whole units feeding one reader linear and refit the reader exactly: APT's closed form on columns.

A *unit* is a group of input columns of a reader ``W`` (out × in) — one MLP neuron is one column of
``down_proj``; one attention head is ``head_dim`` columns of ``o_proj`` — whose producers (rows of gate/up,
rows of q/k/v) exist only to feed it. Removing a unit removes its producer rows too, and nothing else changes:
every kept unit computes what it computed before. The whole error of removing a set ``S`` of columns (kept
``K``) is therefore the reader's, on its calibration inputs ``X`` with ``H = 2 X Xᵀ / N`` (dampened as every
method here: ``H + λ·mean(diag H)·I``)::

    E(S) = min_{W'} tr((W' P_K − W) H (W' P_K − W)ᵀ) = tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)
    W'   = W H_{·K} H_KK⁻¹                                  (the optimal refit of every kept column)

Selection (which units form ``S``; ``select=``):

- ``magnitude``: input-aware magnitude, ``score(g) = Σ_{j∈g} ||W[:, j]||² H_jj`` — the error of removing ``g``
  alone *without* refit; the ``n`` lowest go.
- ``obs`` (default; group OBS, greedy): remove the unit of least ``E`` given the units already removed, with every
  other column refit. After each removal ``H⁻¹`` of the kept columns is the Schur complement
  ``H⁻¹_KK − H⁻¹_KG (H⁻¹_GG)⁻¹ H⁻¹_GK`` and ``W_K`` takes its OBS update ``−W_G (H⁻¹_GG)⁻¹ H⁻¹_GK``, so the next
  costs are exact. ``block`` units leave per step (the ``block`` cheapest by the current costs): 1 is the exact
  greedy; larger blocks trade a little of it for time at 7B widths.
- ``swap``: ``obs``, then a local search over the set, in the spirit of APT's search over the support:
  exchange a removed and a kept unit while that lowers ``E(S)`` exactly (candidates ranked by first-order
  terms, the best few scored exactly), at most ``swap_rounds`` exchanges (default: a quarter of the units
  removed, between 8 and 32).

The refit is always the closed form above (float64 Cholesky), whatever chose ``S``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PrunetuneError
from ..pruning.hessian import prepare_hessian

SELECTORS = ("magnitude", "obs", "swap")


def _cols(groups: list[Tensor], ids) -> Tensor:
    return torch.cat([groups[g] for g in ids]) if len(ids) else torch.zeros(0, dtype=torch.long)


def removal_error(W: Tensor, Hinv: Tensor, cols: Tensor) -> float:
    """``E(S) = tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)``: the least error with which columns ``cols`` can leave (float64)."""
    if cols.numel() == 0:
        return 0.0
    Ws = W[:, cols].double()
    A = Hinv[cols][:, cols].double()
    L = torch.linalg.cholesky(A)
    Z = torch.cholesky_solve(Ws.t(), L)
    return float((Ws.t() * Z).sum())


def refit(W: Tensor, H: Tensor, keep: Tensor, damp: float) -> tuple[Tensor, float, float]:
    """``(W' on the kept columns, E, E / tr(W H Wᵀ))``: the exact least-squares refit of ``W`` (out × in) on the
    columns ``keep`` for the dampened ``H`` (float64; ``W'`` returned in W's dtype)."""
    ph = prepare_hessian(H, W, damp, dtype=torch.float64)
    Hd, W0 = ph.H, ph.W
    keep = keep.to(W.device)
    HK = Hd[:, keep]
    L = torch.linalg.cholesky(HK[keep])
    Wn = torch.cholesky_solve((W0 @ HK).t(), L).t()
    D = W0.clone()
    D[:, keep] -= Wn
    # error on the undampened H, as every layer error the driver reports
    Hu = H.to(device=W.device, dtype=torch.float64)
    err = float((D @ Hu * D).sum())
    base = float((W0 @ Hu * W0).sum())
    return Wn.to(W.dtype), err, (err / base if base > 0 else 0.0)


def select_units(W: Tensor, H: Tensor, groups: list[Tensor], n_remove: int, *, select: str = "obs",
                 damp: float = 0.01, block: int | None = None, swap_rounds: int | None = None,
                 capacity: Tensor | None = None, group_of: Tensor | None = None) -> list[int]:
    """Indices of the ``n_remove`` groups (lists of column indices of ``W``) to remove, sorted.

    ``capacity`` / ``group_of``: at most ``capacity[c]`` removed groups may belong to class ``group_of[g] = c``
    (attention: the same number of query heads leaves every KV group, so GQA stays valid)."""
    n = len(groups)
    if not 0 <= n_remove < n:
        raise PrunetuneError(f"cannot remove {n_remove} of {n} units")
    if select not in SELECTORS:
        raise PrunetuneError(f"unknown unit selection '{select}' (use {', '.join(SELECTORS)})")
    if n_remove == 0:
        return []
    if capacity is not None:
        capacity = capacity.clone()
        if int(capacity.sum()) < n_remove:
            raise PrunetuneError(f"cannot remove {n_remove} units within the per-class limits {capacity.tolist()}")
    ph = prepare_hessian(H, W, damp, dtype=torch.float64)
    W64 = ph.W
    if select == "magnitude":
        col = (W64 ** 2).sum(0) * ph.H.diagonal()
        score = torch.stack([col[g].sum() for g in groups])
        return _take_lowest(score, n_remove, capacity, group_of)
    Hinv = torch.cholesky_inverse(ph.L)
    removed = _greedy_obs(W64.clone(), Hinv.clone(), groups, n_remove, block,
                          capacity.clone() if capacity is not None else None, group_of)
    if select == "swap":
        removed = _swap_search(W64, Hinv, groups, removed, capacity, group_of,
                               swap_rounds if swap_rounds is not None else max(8, min(32, n_remove // 4)))
    return sorted(removed)


def _pick(order: list[int], k: int, capacity, group_of) -> list[int]:
    """The first ``k`` groups of ``order`` whose class still has room (``capacity`` is decremented)."""
    out = []
    for g in order:
        if capacity is not None:
            c = int(group_of[g])
            if capacity[c] <= 0:
                continue
            capacity[c] -= 1
        out.append(g)
        if len(out) == k:
            break
    return out


def _take_lowest(score: Tensor, k: int, capacity, group_of) -> list[int]:
    return sorted(_pick(torch.sort(score, stable=True).indices.tolist(), k, capacity, group_of))


def _group_costs(W: Tensor, Hinv: Tensor, groups: list[Tensor], alive: list[int], pos: Tensor) -> Tensor:
    """OBS cost of removing each alive group alone from the current state (positions ``pos`` map columns)."""
    if all(groups[g].numel() == 1 for g in alive):  # single columns: ||w_j||² / H⁻¹_jj, all at once
        j = pos[torch.cat([groups[g] for g in alive])]
        return (W[:, j] ** 2).sum(0) / Hinv.diagonal()[j]
    costs = []
    for g in alive:
        j = pos[groups[g]]
        costs.append(removal_error(W, Hinv, j))
    return torch.tensor(costs, dtype=torch.float64)


def _greedy_obs(W: Tensor, Hinv: Tensor, groups, n_remove, block, capacity, group_of) -> list[int]:
    """Greedy group OBS with Schur-complement downdates of ``H⁻¹`` and OBS updates of ``W`` (see module doc)."""
    n = len(groups)
    block = max(1, int(block)) if block else 1
    alive = list(range(n))
    removed: list[int] = []
    pos = torch.arange(W.shape[1])  # original column -> its position in the current W / H⁻¹ (-1: removed)
    while len(removed) < n_remove:
        cand = alive
        if capacity is not None:
            cand = [g for g in alive if capacity[int(group_of[g])] > 0]
        costs = _group_costs(W, Hinv, groups, cand, pos)
        order = [cand[i] for i in torch.sort(costs, stable=True).indices.tolist()]
        take = _pick(order, min(block, n_remove - len(removed)), capacity, group_of)
        S = pos[_cols(groups, take)]
        keep = torch.ones(W.shape[1], dtype=torch.bool)
        keep[S] = False
        K = keep.nonzero().squeeze(1)
        L = torch.linalg.cholesky(Hinv[S][:, S])
        B = Hinv[S][:, K]  # |S| × |K|
        C = torch.cholesky_solve(B, L)  # (H⁻¹_SS)⁻¹ H⁻¹_SK
        W = W[:, K] - W[:, S] @ C
        Hinv = Hinv[K][:, K] - B.t() @ C
        remap = torch.full((keep.numel(),), -1, dtype=torch.long)
        remap[K] = torch.arange(K.numel())
        pos = torch.where(pos >= 0, remap[pos.clamp_min(0)], pos)
        removed += take
        gone = set(take)
        alive = [g for g in alive if g not in gone]
    return removed


def _swap_search(W: Tensor, Hinv: Tensor, groups, removed: list[int], capacity, group_of, rounds: int,
                 exact_pairs: int = 16) -> list[int]:
    """Exchanges of one removed and one kept unit while one lowers ``E(S)``, each checked exactly.

    Candidates come from first-order terms of ``E(S) = Σ_rows w_S M⁻¹ w_Sᵀ`` (``M = (H⁻¹)_SS``): bringing back
    column ``a`` lowers ``E`` by ``||(W_S M⁻¹)_{·a}||² / (M⁻¹)_aa``; removing a kept column ``h`` besides ``S`` raises
    it by ``||w_h − W_S M⁻¹ H⁻¹_Sh||² / (H⁻¹_hh − H⁻¹_hS M⁻¹ H⁻¹_Sh)``. The ``exact_pairs`` pairs with the best sum
    (every pair, when there are no more than that many: heads) are scored exactly and the best is taken."""
    removed = list(removed)
    n = len(groups)
    cls = (lambda g: int(group_of[g])) if group_of is not None else (lambda g: 0)
    best = removal_error(W, Hinv, _cols(groups, removed))
    single = all(g.numel() == 1 for g in groups)
    for _ in range(rounds):
        out = set(removed)
        kept = [h for h in range(n) if h not in out]
        pairs = [(a, h) for a in range(len(removed)) for h in kept
                 if capacity is None or cls(h) == cls(removed[a]) or not capacity_full(removed, removed[a], h,
                                                                                         capacity, cls)]
        if len(pairs) > exact_pairs and single:
            S = _cols(groups, removed)
            Kc = _cols(groups, kept)
            Minv = torch.cholesky_inverse(torch.linalg.cholesky(Hinv[S][:, S]))
            Y = W[:, S] @ Minv
            gain = (Y ** 2).sum(0) / Minv.diagonal()
            B = Hinv[S][:, Kc]
            T = Minv @ B
            u = W[:, Kc] - W[:, S] @ T
            sc = Hinv.diagonal()[Kc] - (B * T).sum(0)
            add = (u ** 2).sum(0) / sc.clamp_min(1e-300)
            hpos = {h: i for i, h in enumerate(kept)}
            est = torch.tensor([add[hpos[h]] - gain[a] for a, h in pairs], dtype=torch.float64)
            pairs = [pairs[i] for i in torch.sort(est, stable=True).indices[:exact_pairs].tolist()]
        move = None
        for a, h in pairs:
            trial = removed[:a] + [h] + removed[a + 1:]
            try:
                e = removal_error(W, Hinv, _cols(groups, trial))
            except RuntimeError:
                continue
            if e < best * (1 - 1e-9) and (move is None or e < move[0]):
                move = (e, a, h)
        if move is None:
            break
        best, a, h = move
        removed[a] = h
    return removed


def capacity_full(removed: list[int], g: int, h: int, capacity: Tensor, cls) -> bool:
    """Whether exchanging ``g`` (leaving S) for ``h`` (entering) breaks the per-class limit of ``h``'s class."""
    used = sum(1 for r in removed if r != g and cls(r) == cls(h))
    return used + 1 > int(capacity[cls(h)])
