"""Mixture-of-experts banks: every expert's matrices pruned with the Hessian of the tokens routed to it.

transformers stores the experts of a layer as two 3-D tensors (``gate_up_proj``: E × 2I × H, ``down_proj``:
E × H × I) and calls ``experts(hidden (N × H), top_k_index (N × k), top_k_weights)``. The driver sees a bank as
two virtual linears, ``<bank>[gate_up_proj]`` then ``<bank>[down_proj]`` (true-sequential: the second is captured
after the first is pruned). A forward pre-hook on the bank gives the routed tokens: expert ``e``'s
``gate_up_proj[e]`` reads ``hidden[rows_e]`` and its ``down_proj[e]`` reads ``act(gate) ⊙ up`` of those rows,
computed here from the current (already pruned) ``gate_up_proj[e]``. The router stays dense.

An expert that saw few tokens has a rank-deficient Hessian (none at all: zero, which would zero its weights as
"dead inputs"). Its statistics are dampened towards the identity scaled by the bank's mean diagonal:
``H' = w · H_e + (1 − w) · c · I`` with ``w = n_e / (n_e + in)`` — nearly the data alone when ``n_e ≫ in``,
magnitude pruning (OBS with ``H = I``) when no token reached it. The report gives each expert's token count
and ``w``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

BANK_NAME = re.compile(r"^(?P<bank>.+)\[(?P<param>gate_up_proj|down_proj)\]$")


def virtual_names(bank: str) -> list[str]:
    return [f"{bank}[gate_up_proj]", f"{bank}[down_proj]"]


def parse(name: str) -> tuple[str, str] | None:
    m = BANK_NAME.match(name)
    return (m["bank"], m["param"]) if m else None


def routed_rows(top_k_index: torch.Tensor, e: int) -> torch.Tensor:
    return (top_k_index == e).any(-1)


@torch.no_grad()
def expert_inputs(bank: nn.Module, param: str, hidden: torch.Tensor, top_k_index: torch.Tensor):
    """``[(e, X_e)]``: the input rows of expert ``e``'s ``param`` matrix for this batch (every expert, even one
    that got no token: an empty X)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    idx = top_k_index.reshape(x.shape[0], top_k_index.shape[-1])
    out = []
    for e in range(int(bank.num_experts)):
        xe = x[routed_rows(idx, e)]
        if param == "down_proj" and xe.shape[0]:
            gate, up = torch.nn.functional.linear(xe, bank.gate_up_proj[e]).chunk(2, dim=-1)
            xe = bank.act_fn(gate) * up
        elif param == "down_proj":
            xe = xe.new_zeros(0, bank.down_proj.shape[-1])
        out.append((e, xe))
    return out


def blend_toward_identity(stats_list) -> list[float]:
    """Dampen each expert's statistics towards ``c · I`` by its token count (module docstring); returns each
    expert's weight ``w`` on its own data. ``stats_list``: the experts' ``InputStats`` (same input size)."""
    diags = [s.H.diagonal() if s.H is not None else s.sq for s in stats_list if s.n > 0 and
             (s.H is not None or s.sq is not None)]
    c = float(torch.stack([d.double().mean() for d in diags]).mean()) if diags else 1.0
    c = c if c > 0 else 1.0
    weights = []
    for s in stats_list:
        in_f = s.H.shape[0] if s.H is not None else (s.sq.shape[0] if s.sq is not None else 0)
        w = s.n / (s.n + in_f) if in_f else 1.0
        if s.H is not None:
            s.H.mul_(w)
            s.H.diagonal().add_((1 - w) * c)
        elif s.sq is not None:
            s.sq.mul_(w).add_((1 - w) * c)
        weights.append(w)
    return weights
