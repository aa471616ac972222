"""Structured pruning of the hidden dimension without training: the baselines PAT is measured against.

*Prune-then-tune* removes channels from the dense model and then recovers with LoRA; *tune-then-prune*
tunes the dense model with LoRA, merges, and then removes channels. Both choose the channels with one
data-driven structured importance and remove them with PAT's exact shrink, so the only thing that differs
from PAT is *how the channels are chosen and when the model adapts to losing them*.

Importance of hidden channel ``j`` (``activation``): every reader of the residual stream (q/k/v, gate/up,
the LM head) sees it through an RMSNorm, so the natural measure is the energy the readers receive,

    score_j = Σ_norms  mean_tokens  y_j²          (y = the output of that RMSNorm, gain included)

summed over every layer norm and the final norm on calibration windows. ``magnitude`` instead scores
``Σ_norms g_j²`` plus the squared column norms of every reader (no data). The ``round((1 − ratio) · d)``
highest scores are kept (ties to the lower index, as PAT's final top-k; the count moves to the nearest hidden
size the model family can load, as PAT's does).

Removal: the model gets PAT's modules with identity ``D`` (no training) and a binary gate on the kept
channels; :func:`~prunetune.tuning.pat.shrink.shrink_model` then slices writers, readers and norms and
rescales the norm gains and epsilon, so the smaller model computes exactly what the masked model computes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PrunetuneError
from .slicing import check_ratio, check_sliceable, keep_count, slice_hidden, topk_keep

IMPORTANCE = ("activation", "magnitude")


@torch.no_grad()
def channel_scores(model: nn.Module, importance: str = "activation", calib=None, batch_size: int = 4) -> torch.Tensor:
    """Importance (d,) of each hidden channel; ``calib`` for ``activation``: token ids, (n, seqlen), a list of
    1-D sequences of any length (run one at a time) or a list of (batch, seq) tensors."""
    a = check_sliceable(model, "channel pruning")
    norm_paths = [f"{a.layers_path}.{i}.{n}" for i in range(a.num_layers) for n in a.layer_norms]
    norm_paths.append(a.final_norm_path)
    d = a.hidden_size
    if importance == "magnitude":
        s = torch.zeros(d, dtype=torch.float64)
        for p in norm_paths:
            s += model.get_submodule(p).weight.detach().double().cpu() ** 2
        readers = [f"{a.layers_path}.{i}.{r}" for i in range(a.num_layers) for r in a.residual_readers]
        for p in readers + [a.lm_head_path]:
            s += (model.get_submodule(p).weight.detach().double().cpu() ** 2).sum(0)
        return s
    if importance != "activation":
        raise PrunetuneError(f"unknown channel importance '{importance}' (use {', '.join(IMPORTANCE)})")
    calib = _batches(calib, batch_size)
    if not calib:
        raise PrunetuneError("activation-based channel importance needs calibration token ids")
    device = a.embedding.weight.device
    sums = torch.zeros(d, dtype=torch.float64)
    count = 0

    def hook(_m, _i, out):
        y = out[0] if isinstance(out, tuple) else out
        sums.add_(y.detach().double().pow(2).reshape(-1, d).sum(0).cpu())

    handles = [model.get_submodule(p).register_forward_hook(hook) for p in norm_paths]
    was_training = model.training
    model.eval()
    try:
        for ids in calib:
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums / max(1, count)


def keep_channels(scores: torch.Tensor, ratio: float, model_config=None) -> torch.Tensor:
    """The kept channels (ascending) by score, ties to the lower index: ``round((1 − ratio) · d)`` of them,
    or with ``model_config`` the count PAT keeps (moved to a hidden size the family can load)."""
    check_ratio(ratio, "channel pruning ratio")
    d = scores.numel()
    k = keep_count(model_config, d, ratio, what="channel pruning ratio") if model_config is not None \
        else int(round((1.0 - ratio) * d))
    if k >= d or k < 1:
        raise PrunetuneError(f"ratio {ratio} of hidden size {d} keeps {k} channels: nothing (or everything) removed")
    return topk_keep(scores, k)


def remove_channels(model: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A new plain model with hidden size ``len(keep)`` equal to ``model`` with the other channels zeroed
    at every writer of the residual stream (exact)."""
    shrunk = slice_hidden(model, keep)
    shrunk._prunetune_shrink_info["method"] = "channel-prune"
    return shrunk


def prune_channels(model: nn.Module, ratio: float, *, importance: str = "activation",
                   calib: torch.Tensor | None = None, batch_size: int = 4) -> tuple[nn.Module, dict]:
    """Remove the fraction ``ratio`` of hidden channels with the lowest ``importance``; returns
    ``(smaller plain model, info)``."""
    scores = channel_scores(model, importance, calib, batch_size=batch_size)
    keep = keep_channels(scores, ratio, model.config)
    shrunk = remove_channels(model, keep)
    info = {"method": "channel-prune", "importance": importance, "ratio": ratio,
            "hidden_size_before": int(scores.numel()), "hidden_size": int(keep.numel()),
            "removed_share": 1 - keep.numel() / scores.numel(),
            "kept_channels": keep.tolist(),
            "calibration_tokens": _tokens(calib) if importance == "activation" else 0}
    return shrunk, info


def _batches(calib, batch_size: int) -> list[torch.Tensor]:
    """Token ids as a list of (batch, seq) tensors: from one (n, seq) tensor, or a list of 1-D sequences (one
    batch each, any lengths) or of 2-D batches."""
    if isinstance(calib, torch.Tensor):
        return [calib[b:b + batch_size] for b in range(0, calib.shape[0], batch_size)] if calib.numel() else []
    out = []
    for c in calib or []:
        t = torch.as_tensor(c, dtype=torch.long)
        if t.numel():
            out.append(t if t.dim() == 2 else t.reshape(1, -1))
    return out


def _tokens(calib) -> int:
    return sum(int(b.numel()) for b in _batches(calib, 1))
