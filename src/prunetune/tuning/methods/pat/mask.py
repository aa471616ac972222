"""The Unified Sparsification Mask (UMS) of PAT: one channel gate shared by every HSM.

Gate of hidden channel ``i`` at optimiser step ``s`` (DESIGN.md §5)::

    m_i(s) = sigmoid(τ(s) · W_M[i]) + β(s)
    τ(s)   = 1 / (1 − ln s / ln s0)   for 0 < s < s0,   τ(0) = 0 (the limit of the formula as s → 0)
    β(s)   = max(0, 0.5 − s / s0)
    m_i(s) = 1[i ∈ top-N_keep(W_M)]   for s ≥ s0 (the hard step τ → ∞ reaches at s0)

``s0`` is the milestone (by default a third of all steps, at least 1). ``τ(0) = 0`` and ``β(0) = 0.5`` give
``m = 0.5 + 0.5 = 1`` exactly at step 0 whatever ``W_M`` holds, so the wrapped model starts unchanged; ``s = 1``
gives ``τ = 1`` (``ln 1 = 0``) and ``s0 = 1`` never divides by ``ln 1`` (only ``s = 0`` lies before it), so no
step produces NaN or inf. After the milestone the forward gate is binary; its gradient is the straight-through
sigmoid surrogate ``∂m_i/∂W_M[i] := σ'(W_M[i]) = σ(W_M[i])·(1 − σ(W_M[i]))``, so the task loss keeps ranking
the channels (a dropped channel still learns whether turning it back on would help).

Deviation from the paper, on purpose: its hard gate is ``1[W_M[i] > 0]`` with ``L_active`` steering the count of
live channels towards ``N_keep``, and the export keeps the top ``N_keep``. With a small learning rate the count
drifts (441 live for 432 kept after 30 steps in BENCHMARKS.md §5b), so the export cut channels the model was
still using. Here the hard gate is the top ``N_keep`` of ``W_M`` from the milestone on: the count cannot drift
and the model trained after the milestone is the model exported. ``L_active`` still acts before the milestone.

Live channels: channel ``i`` is live when its binarised gate ``1[W_M[i] > 0]`` is non-zero. That is the
``1[m_i > 0]`` of the paper evaluated on the gate the soft mask converges to (before the milestone the soft
gate itself is always positive, so counting it would always give ``d``). The active-channel loss

    L_active = | N_keep − Σ_i 1[W_M[i] > 0] | / N_keep

gets the same straight-through surrogate for the indicator: forward ``1[W_M > 0]``, backward
``σ'(W_M)`` (unit temperature; 1/4 at ``W_M = 0``). Its gradient is ``−sign(N_keep − live) · σ'(W_M) / N_keep``:
it pushes every logit up while too few channels are live and down while too many are, and is zero when the
count is on target.

At the end (:meth:`UnifiedMask.finalize`) exactly ``N_keep = round((1 − ratio) · d)`` channels are kept:
the ``N_keep`` largest ``W_M``, ties broken by the lower channel index (a stable descending sort). From then
on the forward gate is that binary vector, so the trained model and the shrunk model compute the same thing.

Frozen-mask ablation (``frozen=True``): ``W_M`` is a fixed buffer, ``+1`` on the first ``N_keep`` channels and
``−1`` on the last ``d − N_keep``, with the same ``τ``/``β`` schedule; nothing in the mask trains and
``L_active`` is a constant 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ....structured.slicing import n_keep_for, topk_keep  # noqa: F401  (n_keep_for re-exported)

#: value logged for τ once the gate is a hard step (τ = ∞); keeps training logs valid JSON
TAU_HARD = 1e6


def milestone(total_steps: int, frac: float) -> int:
    """The step ``s0`` at which the mask becomes binary: ``max(1, round(frac · total_steps))``."""
    return max(1, int(round(frac * max(0, total_steps))))


def tau(step: int, s0: int) -> float:
    """Temperature ``τ(s)``: 0 at ``s = 0``, 1 at ``s = 1``, growing to ∞ at ``s0``; ``math.inf`` from ``s0`` on."""
    if step >= s0:
        return math.inf
    if step <= 0:
        return 0.0
    return 1.0 / (1.0 - math.log(step) / math.log(s0))  # 0 < s < s0 implies s0 ≥ 2, so ln s0 > 0


def beta(step: int, s0: int) -> float:
    """Offset ``β(s) = max(0, 0.5 − s / s0)``."""
    return max(0.0, 0.5 - step / s0)


def _ste_sigmoid(w: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward ``hard``; backward the gradient of ``sigmoid(w)``."""
    soft = torch.sigmoid(w)
    return hard + (soft - soft.detach())


class UnifiedMask(nn.Module):
    """One channel gate over the hidden dimension, shared by every HSM.

    The current step is plain state (``set_step``), set by the tuning method before each forward; the
    schedule needs ``total_steps`` (``set_schedule``). ``forward()`` returns the gate vector ``m`` (d,).
    """

    def __init__(self, d: int, n_keep: int, frozen: bool = False, milestone_frac: float = 1 / 3):
        super().__init__()
        if not 0 < n_keep <= d:
            raise ValueError(f"n_keep must be in [1, {d}] (got {n_keep})")
        self.d, self.n_keep, self.frozen = d, n_keep, frozen
        self.milestone_frac = milestone_frac
        if frozen:
            fixed = torch.full((d,), -1.0)
            fixed[:n_keep] = 1.0
            self.register_buffer("W_M", fixed)
        else:
            self.W_M = nn.Parameter(torch.zeros(d))
        # the binary gate once finalised (empty until then); persistent so saved adapters carry it
        self.register_buffer("final", torch.zeros(0))
        self.step = 0
        self.total_steps = 1

    # --- schedule ---------------------------------------------------------------------------
    def set_schedule(self, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))

    def set_step(self, step: int) -> None:
        self.step = max(0, int(step))

    @property
    def s0(self) -> int:
        return milestone(self.total_steps, self.milestone_frac)

    @property
    def tau(self) -> float:
        return tau(self.step, self.s0)

    @property
    def beta(self) -> float:
        return beta(self.step, self.s0)

    @property
    def finalized(self) -> bool:
        return self.final.numel() == self.d

    # --- the gate ---------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        if self.finalized:
            return self.final
        w = self.W_M
        t = self.tau
        if math.isinf(t):
            hard = self.binary_mask().to(w.dtype)
            return hard if self.frozen else _ste_sigmoid(w, hard)
        return torch.sigmoid(t * w) + self.beta

    def live_indicator(self) -> torch.Tensor:
        """``1[W_M > 0]`` with the straight-through sigmoid gradient (frozen: no gradient)."""
        hard = (self.W_M > 0).to(self.W_M.dtype)
        return hard if self.frozen else _ste_sigmoid(self.W_M, hard)

    def live_count(self) -> int:
        """Channels the forward gate keeps: ``N_keep`` from the milestone on, ``#{W_M > 0}`` before."""
        if self.finalized:
            return int((self.final > 0).sum())
        if math.isinf(self.tau):
            return self.n_keep
        return int((self.W_M.detach() > 0).sum())

    def active_loss(self) -> torch.Tensor:
        """``|N_keep − Σ 1[W_M > 0]| / N_keep`` (straight-through) before the milestone; 0 from it on (the gate keeps
        exactly ``N_keep`` then), once finalised, or when frozen."""
        if self.frozen or self.finalized or math.isinf(self.tau):
            return torch.zeros((), device=self.W_M.device)
        live = self.live_indicator().sum()
        return (self.n_keep - live).abs() / max(1, self.n_keep)

    # --- the end ----------------------------------------------------------------------------
    def keep_indices(self) -> torch.Tensor:
        """The ``N_keep`` kept channels (ascending): the largest ``W_M``, ties to the lower index."""
        if self.finalized:
            return torch.nonzero(self.final.detach().cpu() > 0).flatten()
        return topk_keep(self.W_M, self.n_keep)

    def binary_mask(self) -> torch.Tensor:
        m = torch.zeros(self.d, device=self.W_M.device, dtype=torch.float32)
        m[self.keep_indices().to(self.W_M.device)] = 1.0
        return m

    @torch.no_grad()
    def finalize(self) -> torch.Tensor:
        """Fix the gate to the binary top-``N_keep`` mask (idempotent); returns the kept indices."""
        if not self.finalized:
            self.final = self.binary_mask()
        return self.keep_indices()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        final = state_dict.get(prefix + "final")
        if final is not None and final.shape != self.final.shape:  # a finalised gate loads into a fresh mask
            self.final = torch.zeros(final.shape, dtype=self.final.dtype, device=self.final.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"d={self.d}, n_keep={self.n_keep}, frozen={self.frozen}, milestone_frac={self.milestone_frac:.3g}"
