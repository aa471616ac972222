"""SPP's maths: one frozen sparse linear with trainable factors that only ever scale its weights (DESIGN.md §4).

Each frozen sparse linear ``W`` (out × in) gets two trainable tensors: ``w_alpha`` (g × in, Kaiming-uniform)
and ``w_beta`` (out × 1, zeros). The output rows are split into ``g`` contiguous blocks and every row of a
block shares one row of ``w_alpha``: ``A = repeat_interleave(w_alpha, block_sizes, dim=0)`` (out × in).

    y  = x Wᵀ + s · dropout(x) · [(A ⊙ w_beta) ⊙ W]ᵀ (+ bias),      s = alpha / r
    W' = W ⊙ (1 + s · A ⊙ w_beta)                                    (merge)

The update is an element-wise multiple of ``W``: a zero of ``W`` stays zero during training and after the
merge, so every unstructured or N:M pattern is kept exactly. At init ``w_beta = 0`` and the model is
unchanged.

Block sizes when ``out % g != 0`` (stated rule, same as ``torch.tensor_split``): with
``q, rem = divmod(out, g)`` the first ``rem`` blocks hold ``q + 1`` rows and the other ``g - rem`` hold
``q`` rows. When ``g > out`` the number of blocks is lowered to ``out`` (one row per block), so no row of
``w_alpha`` is ever unused; ``w_alpha`` then has ``out`` rows.

Two forwards give the same result (to float rounding):

- ``"materialise"`` builds the out × in delta ``(A ⊙ w_beta) ⊙ W`` and runs one extra matmul. When dropout is
  inactive (eval mode or ``dropout = 0``) base and delta are fused into one matmul with
  ``W ⊙ (1 + s · A ⊙ w_beta)`` — the very weight the merge produces.
- ``"grouped"`` never builds an out × in tensor: per block k, ``(x ⊙ w_alpha_k) · W_kᵀ`` scaled by the block's
  ``w_beta`` rows (two batched matmuls, one per block size); a custom autograd function keeps only the
  dropped-out input and the pre-scale output (N × out) for the backward.
- ``"auto"`` (default) picks, per call, the one that needs less memory for the backward: grouped when
  ``N · (g · in + out) < 2 · out · in`` (N = number of tokens in the call: grouped keeps an N × out tensor and
  briefly an g × N × in one; materialise keeps two out × in tensors), else materialise. In training with
  thousands of tokens per micro-batch this is materialise for small and mid-size models; grouped wins for
  very wide layers and short inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import PrunetuneError
from .config import FORWARD_MODES, SPPConfig



def block_sizes(out_features: int, groups: int) -> list[int]:
    """Rows per block: the first ``out % g`` blocks get one extra row (``g`` lowered to ``out`` if larger)."""
    g = min(groups, out_features)
    q, rem = divmod(out_features, g)
    return [q + 1] * rem + [q] * (g - rem)


def _block_parts(out_features: int, groups: int):
    """The blocks as at most two runs of equal size: [(first_block, n_blocks, rows_per_block, first_row)]."""
    g = min(groups, out_features)
    q, rem = divmod(out_features, g)
    parts = []
    if rem:
        parts.append((0, rem, q + 1, 0))
    if g - rem:
        parts.append((rem, g - rem, q, rem * (q + 1)))
    return parts


def _grouped_z(xd: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, parts) -> torch.Tensor:
    """z[n, o] = Σ_i xd[n, i] · alpha[block(o), i] · W[o, i], without an out × in tensor. xd: (N, in)."""
    n = xd.shape[0]
    outs = []
    for b0, nb, rows, r0 in parts:
        wb = weight[r0:r0 + nb * rows].view(nb, rows, -1)  # (nb, rows, in), a view
        xs = xd.unsqueeze(0) * alpha[b0:b0 + nb].unsqueeze(1)  # (nb, N, in)
        z = torch.bmm(xs, wb.transpose(1, 2))  # (nb, N, rows)
        outs.append(z.permute(1, 0, 2).reshape(n, nb * rows))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class _GroupedDelta(torch.autograd.Function):
    """s · beta ⊙ z with z from ``_grouped_z``; the backward recomputes per-block products."""

    @staticmethod
    def forward(ctx, xd, weight, alpha, beta, parts, scale):
        z = _grouped_z(xd, weight, alpha, parts)
        ctx.save_for_backward(xd, weight, alpha, beta, z)
        ctx.parts, ctx.scale = parts, scale
        return z * beta.view(1, -1) * scale

    @staticmethod
    def backward(ctx, gy):
        xd, weight, alpha, beta, z = ctx.saved_tensors
        parts, scale = ctx.parts, ctx.scale
        n = xd.shape[0]
        grad_beta = (gy * z).sum(0).mul_(scale).view_as(beta) if ctx.needs_input_grad[3] else None
        g = gy * beta.view(1, -1) * scale  # (N, out)
        grad_x = torch.zeros_like(xd) if ctx.needs_input_grad[0] else None
        grad_alpha = torch.zeros_like(alpha) if ctx.needs_input_grad[2] else None
        for b0, nb, rows, r0 in parts:
            wb = weight[r0:r0 + nb * rows].view(nb, rows, -1)
            gb = g[:, r0:r0 + nb * rows].reshape(n, nb, rows).permute(1, 0, 2)  # (nb, N, rows)
            p = torch.bmm(gb, wb)  # (nb, N, in)
            a = alpha[b0:b0 + nb]
            if grad_x is not None:
                grad_x += torch.einsum("gi,gni->ni", a, p)
            if grad_alpha is not None:
                grad_alpha[b0:b0 + nb] = torch.einsum("ni,gni->gi", xd, p)
        return grad_x, None, grad_alpha, grad_beta, None, None


class SPPLinear(nn.Module):
    """A frozen (sparse) ``nn.Linear`` plus SPP's trainable ``w_alpha`` / ``w_beta``."""

    def __init__(self, base: nn.Linear, config=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SPPLinear wraps nn.Linear, got {type(base).__name__}")
        if config is None:
            config = SPPConfig()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.sizes = block_sizes(self.out_features, config.groups)
        self.groups = len(self.sizes)
        self.parts = _block_parts(self.out_features, config.groups)
        self.scaling = config.scaling
        self.forward_mode = config.forward
        dev = base.weight.device
        pdtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32
        self.w_alpha = nn.Parameter(torch.empty(self.groups, self.in_features, device=dev, dtype=pdtype))
        self.w_beta = nn.Parameter(torch.zeros(self.out_features, 1, device=dev, dtype=pdtype))
        nn.init.kaiming_uniform_(self.w_alpha, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_buffer(
            "_counts", torch.tensor(self.sizes, dtype=torch.long, device=dev), persistent=False
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, groups={self.groups}, "
                f"scaling={self.scaling}, forward={self.forward_mode}")

    def expanded_alpha(self) -> torch.Tensor:
        """A = w_alpha repeated over the rows of each block (out × in)."""
        return torch.repeat_interleave(self.w_alpha, self._counts, dim=0, output_size=self.out_features)

    def choose_mode(self, n_tokens: int) -> str:
        if self.forward_mode != "auto":
            return self.forward_mode
        grouped_cost = n_tokens * (self.groups * self.in_features + self.out_features)
        return "grouped" if grouped_cost < 2 * self.out_features * self.in_features else "materialise"

    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        w = self.base.weight
        dt = x.dtype
        n_tokens = x.numel() // self.in_features
        mode = mode or self.choose_mode(n_tokens)
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        alpha = self.w_alpha.to(dt)
        beta = self.w_beta.to(dt)
        if mode == "materialise":
            a = torch.repeat_interleave(alpha, self._counts, dim=0, output_size=self.out_features)
            delta = (a * beta) * w.to(dt)
            if not dropout_active:  # fused: one matmul with W ⊙ (1 + s·A⊙β), the merged weight
                return F.linear(x, w.to(dt) + self.scaling * delta, self.base.bias)
            return F.linear(x, w.to(dt), self.base.bias) + self.scaling * F.linear(self.dropout(x), delta)
        if mode == "grouped":
            y = F.linear(x, w.to(dt), self.base.bias)
            xd = self.dropout(x).reshape(-1, self.in_features)
            d = _GroupedDelta.apply(xd, w.to(dt), alpha, beta.view(-1), self.parts, self.scaling)
            return y + d.view(*x.shape[:-1], self.out_features)
        raise PrunetuneError(f"unknown SPP forward '{mode}' (use {', '.join(FORWARD_MODES)})")

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        factor = 1.0 + self.scaling * (self.expanded_alpha().double() * self.w_beta.double())
        if not torch.isfinite(factor).all():
            raise PrunetuneError("SPP merge: adapter weights are not finite (training diverged)")
        return (w.double() * factor).to(w.dtype)

    def merge(self) -> nn.Linear:
        """Return the base ``nn.Linear`` holding ``W ⊙ (1 + s · A ⊙ w_beta)`` (zeros of W stay zero)."""
        merged = self.merged_weight()
        self.base.weight.data.copy_(merged)
        return self.base


