"""Hybrid Sparsification Modules (HSM): ``z = m ⊙ D · y`` on every writer of the residual stream.

``D = I + L1 · diag(v) · L0`` is the Hybrid-Identity-Operator: ``L0`` (r × d, Kaiming-uniform like
``nn.Linear``), ``L1`` (d × r, zeros) and ``v`` (r, ones), so ``D = I`` at init. ``m`` is the shared gate of
:class:`~prunetune.tuning.pat.mask.UnifiedMask`. The product is applied to the last dimension of ``y`` without
ever forming ``D``: ``D·y = y + ((y L0ᵀ) ⊙ v) L1ᵀ``, ``2·d·r`` multiply-adds per token.

Placement (DESIGN.md §5): the output of the token embedding and of every residual writer of every layer
(``o_proj`` and ``down_proj`` for Llama): ``2L + 1`` modules. They are attached with forward hooks on the
module found at each path *after* LoRA is injected, so for a LoRA-wrapped writer the hook sees
``W x + s·B A x`` (HSM after LoRA) and peft's module tree and parameter names stay untouched.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .mask import UnifiedMask


def default_rank(d: int) -> int:
    """About 5% of the hidden size, at least 1."""
    return max(1, int(round(0.05 * d)))


class HSM(nn.Module):
    """One Hybrid Sparsification Module over a hidden size ``d`` with HIO rank ``r``."""

    def __init__(self, d: int, r: int, mask: UnifiedMask, device=None):
        super().__init__()
        if r < 1:
            raise ValueError(f"HIO rank must be at least 1 (got {r})")
        self.d, self.r = d, r
        self.L0 = nn.Parameter(torch.empty(r, d, device=device))
        self.L1 = nn.Parameter(torch.zeros(d, r, device=device))
        self.v = nn.Parameter(torch.ones(r, device=device))
        nn.init.kaiming_uniform_(self.L0, a=math.sqrt(5))
        # the shared mask is not a child of every HSM (it would appear 2L+1 times in the state dict)
        object.__setattr__(self, "_mask", mask)

    @property
    def mask(self) -> UnifiedMask:
        return self._mask

    def apply_d(self, y: torch.Tensor) -> torch.Tensor:
        """``D · y`` along the last dimension."""
        dt = y.dtype
        low = (y @ self.L0.to(dt).t()) * self.v.to(dt)
        return y + low @ self.L1.to(dt).t()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.apply_d(y) * self.mask().to(y.dtype)

    def output_hook(self, module, inputs, output):
        """Forward hook for the writer this HSM belongs to: replaces its output ``y`` by ``m ⊙ D y``.
        (A bound method, so a deep copy of the model hooks the copied HSM, not the original.)"""
        if isinstance(output, tuple):  # a writer returning (hidden, extras): transform the hidden part
            return (self(output[0]),) + tuple(output[1:])
        return self(output)

    @torch.no_grad()
    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``D = I + L1 diag(v) L0`` (d × d)."""
        L0, L1, v = self.L0.to(dtype), self.L1.to(dtype), self.v.to(dtype)
        return torch.eye(self.d, device=L0.device, dtype=dtype) + (L1 * v) @ L0

    @torch.no_grad()
    def rows(self, keep: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``D[keep, :]`` (k × d) without forming ``D``."""
        keep = keep.to(self.L0.device)
        out = (self.L1.to(dtype)[keep] * self.v.to(dtype)) @ self.L0.to(dtype)
        out[torch.arange(keep.numel(), device=out.device), keep] += 1
        return out

    def identity_loss(self) -> torch.Tensor:
        """``||L0 L0ᵀ − I||_F + ||L1ᵀ L1 − I||_F`` (finite, with a finite gradient, everywhere)."""
        eye = torch.eye(self.r, device=self.L0.device)
        a = self.L0.float() @ self.L0.float().t() - eye
        b = self.L1.float().t() @ self.L1.float() - eye
        return _fro(a) + _fro(b)

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}"


def _fro(x: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0; clamping keeps the gradient finite (zero) there
    return (x * x).sum().clamp_min(1e-12).sqrt()


class PATModules(nn.Module):
    """The shared mask and the ``2L + 1`` HSMs, registered on the model so optimisers, DDP and
    ``.to()`` see them; ``paths[i]`` is the module whose output ``hsms[i]`` transforms."""

    def __init__(self, d: int, r: int, n_keep: int, paths: list[str], frozen: bool, milestone_frac: float,
                 device=None):
        super().__init__()
        self.mask = UnifiedMask(d, n_keep, frozen=frozen, milestone_frac=milestone_frac).to(device)
        self.hsms = nn.ModuleList(HSM(d, r, self.mask, device=device) for _ in paths)
        self.paths = list(paths)
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        """(Re-)register one forward hook per path; the hook replaces the module's output by ``HSM(output)``."""
        self.detach()
        for path, hsm in zip(self.paths, self.hsms):
            module = model.get_submodule(path)
            self._handles.append(module.register_forward_hook(hsm.output_hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def identity_loss(self) -> torch.Tensor:
        """Sum of every HSM's identity loss (0 when there are none)."""
        if len(self.hsms) == 0:
            return torch.zeros((), device=self.mask.W_M.device)
        return torch.stack([h.identity_loss() for h in self.hsms]).sum()

