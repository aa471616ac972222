"""Sparsity specs and pruning masks.

Conventions used everywhere in this package:

* a mask is a bool tensor shaped like the weight, ``True`` = **prune** (set to zero);
* unstructured sparsity ``s`` prunes exactly ``num_pruned(n, s) = round(s * n)`` entries (halves round up)
  of each row (``prune_mask_rows``) or of the whole matrix (``prune_mask_matrix``);
* ``N:M`` keeps ``N`` of every ``M`` consecutive input weights (``2:4`` keeps 2 of 4, i.e. 50% sparse):
  each group of ``M`` columns of a row has exactly ``M - N`` pruned entries.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PrunetuneError

__all__ = [
    "SparsitySpec", "parse_sparsity", "num_pruned", "prune_mask_rows", "prune_mask_matrix", "prune_mask_nm",
    "is_nm_valid", "sparsity_of",
]


@dataclass(frozen=True)
class SparsitySpec:
    """What to prune. ``kind`` is ``"unstructured"`` or ``"nm"``.

    ``sparsity`` is the fraction of zeros (for N:M it is ``1 - n/m``); ``n`` is the number of weights
    **kept** in each group of ``m`` consecutive input weights (only for ``"nm"``).
    """

    kind: str
    sparsity: float
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.kind not in ("unstructured", "nm"):
            raise ValueError(f"SparsitySpec.kind must be 'unstructured' or 'nm', not {self.kind!r}")
        if self.kind == "nm" and not (0 < self.n < self.m):
            raise ValueError(f"N:M spec needs 0 < n < m (got n={self.n}, m={self.m})")

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else str(float(self.sparsity))

    def check_fits(self, in_features: int, name: str) -> None:
        """Raise `PrunetuneError` naming layer ``name`` if N:M groups do not tile its input features."""
        if self.is_nm and in_features % self.m != 0:
            raise PrunetuneError(
                f"cannot apply N:M sparsity {self} to '{name}': its {in_features} input features are not a "
                f"multiple of M={self.m}")


_NM = re.compile(r"^\s*([^:]*?)\s*:\s*([^:]*?)\s*$")


def parse_sparsity(value) -> SparsitySpec:
    """Parse ``0.5``, ``"0.5"``, ``"50%"`` (unstructured) or ``"2:4"``, ``"4:8"`` (N:M, N kept of every M)."""
    text = str(value).strip()
    if isinstance(value, bool):
        raise PrunetuneError(f"invalid sparsity '{text}': expected a fraction such as 0.5, '50%' or N:M such as '2:4'")
    if ":" in text:
        mt = _NM.match(text)
        try:
            if mt is None:
                raise ValueError
            n, m = int(mt.group(1)), int(mt.group(2))
        except ValueError:
            raise PrunetuneError(
                f"invalid sparsity '{text}': N:M needs two integers, e.g. '2:4' (2 weights kept of every 4)") from None
        if not (0 < n < m):
            raise PrunetuneError(
                f"invalid sparsity '{text}': N:M needs 0 < N < M (N = weights kept per group of M)")
        return SparsitySpec("nm", 1.0 - n / m, n, m)
    try:
        if isinstance(value, (int, float)):
            s = float(value)
        elif text.endswith("%"):
            s = float(text[:-1].strip()) / 100.0
        else:
            s = float(text)
    except ValueError:
        raise PrunetuneError(
            f"invalid sparsity '{text}': expected a fraction such as 0.5, a percentage such as '50%' "
            f"or N:M such as '2:4'") from None
    if not math.isfinite(s) or not (0.0 <= s < 1.0):
        raise PrunetuneError(
            f"invalid sparsity '{text}': must be in [0, 1) (the fraction of weights set to zero)")
    return SparsitySpec("unstructured", s)


def num_pruned(total: int, sparsity: float) -> int:
    """``round(sparsity * total)`` with halves rounded up; the exact count every mask function uses."""
    return min(int(total), max(0, int(math.floor(sparsity * total + 0.5))))


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` lowest entries along the last dim (ties broken by position)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def _lowest_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` lowest entries along the last dim, ties broken by position — the same set as
    `_lowest`, from a selection (``kthvalue``) instead of a full sort: ~2.5x faster on long rows."""
    t = scores.kthvalue(k, dim=-1, keepdim=True).values
    less = scores < t
    eq = scores == t
    return less | (eq & (eq.cumsum(-1) <= k - less.sum(-1, keepdim=True)))


#: elements per row chunk of the row-wise mask functions: the selection behind them makes values, int64 indices
#: and bool tensors (~15 bytes per score), ~670 MB for a whole 11008 x 4096 matrix, ~15 MB per chunk
CHUNK_ELEMS = 1 << 20


def row_chunks(rows: int, cols: int, chunk_elems: int = CHUNK_ELEMS):
    """Row slices of about ``chunk_elems`` elements; row-wise work done per slice gives identical results."""
    step = max(1, chunk_elems // max(1, cols))
    return [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def prune_mask_rows(scores: Tensor, sparsity: float) -> Tensor:
    """Per row, mark exactly ``round(sparsity * in)`` lowest-scoring entries (True = prune)."""
    k = num_pruned(scores.shape[-1], sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        s2, m2 = scores.reshape(-1, scores.shape[-1]), mask.view(-1, scores.shape[-1])
        for sl in row_chunks(*s2.shape):
            m2[sl] = _lowest_mask(s2[sl], k)
    return mask


def prune_mask_matrix(scores: Tensor, sparsity: float) -> Tensor:
    """Mark exactly ``round(sparsity * numel)`` lowest-scoring entries over the whole matrix (True = prune)."""
    k = num_pruned(scores.numel(), sparsity)
    if not k:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return _lowest_mask(scores.reshape(-1), k).view(scores.shape)


def prune_mask_nm(scores: Tensor, n: int, m: int) -> Tensor:
    """Per row and per group of ``m`` consecutive columns, mark the ``m - n`` lowest entries (``n`` kept)."""
    rows, cols = scores.reshape(-1, scores.shape[-1]).shape
    if not (0 < n < m) or cols % m:
        raise ValueError(f"N:M {n}:{m} does not fit {cols} columns")
    g = scores.reshape(rows, cols // m, m)
    mask = torch.zeros(g.shape, dtype=torch.bool, device=scores.device)
    for sl in row_chunks(rows, cols):
        mask[sl].scatter_(-1, _lowest(g[sl], m - n), True)
    return mask.view(scores.shape)


def is_nm_valid(W: Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights of every row has at least ``m - n`` zeros."""
    cols = W.shape[-1]
    if m <= 0 or cols % m:
        return False
    zeros = (W.reshape(-1, cols // m, m) == 0).sum(-1)
    return bool((zeros >= m - n).all())


def sparsity_of(W: Tensor) -> float:
    """Fraction of entries that are exactly zero.

    Counted by row chunks: ``(W == 0).sum()`` on a whole matrix makes an int64 copy of it (8 bytes per entry)."""
    if not W.numel():
        return 0.0
    flat = W.reshape(-1, W.shape[-1]) if W.dim() > 1 else W.reshape(1, -1)
    zeros = sum(int((flat[sl] == 0).sum()) for sl in row_chunks(*flat.shape))
    return float(zeros / W.numel())
