"""The layer-by-layer calibrated driver shared by every pruning method.

For each decoder layer: capture the inputs of its linears with hooks (true-sequential sub-groups:
q/k/v, then o, then gate/up, then down, re-running the layer between groups so later groups see the
already-pruned earlier ones), prune them with the chosen method, then run the pruned layer to make the
next layer's inputs. Only one layer is on the accelerator at a time; cached activations stay on CPU.
After each layer its weights go to their own shard file and the activations to a resume file, so a
killed run continues from the last finished layer with bit-identical results.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import PrunetuneError
from ..io import all_finite, trim_heap
from ..models import get_adapter
from .hessian import layer_error_stats
from .masks import SparsitySpec, sparsity_of

log = logging.getLogger("prunetune")


class HessianAccumulator:
    """Running H = 2/N · Σ x xᵀ over all calibration tokens (float64 where in ≤ 4096, else float32)."""

    def __init__(self, in_features: int, device):
        dtype = torch.float64 if in_features <= 4096 else torch.float32
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        b = x.shape[0]
        self.H *= self.n / (self.n + b)
        self.n += b
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)

    def hessian(self) -> torch.Tensor:
        return self.H.float()


@dataclass
class LayerResult:
    name: str
    shape: tuple
    sparsity_target: float
    sparsity: float
    error: float
    rel_error: float


@dataclass
class DriverConfig:
    method: object  # PruneMethod
    spec: SparsitySpec
    damp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    method_opts: dict = field(default_factory=dict)
    layer_specs: list | None = None  # per-layer SparsitySpec (OWL), else ``spec`` everywhere


class _GroupDone(Exception):
    """Raised once every hooked linear has seen its input: the rest of the layer need not run."""


def _capture_hessians(layer, names, hidden, kwargs, device, adapter):
    """Run the layer over all cached batches with hooks on ``names``; share H between linears fed the same tensor.

    The forward stops as soon as the last hooked linear has its input, so capturing q/k/v costs almost
    nothing and true-sequential pruning costs well under one extra layer forward per group."""
    accs: dict[str, HessianAccumulator] = {}
    seen: dict[int, tuple] = {}  # id(input) -> (input, accumulator), reset for every batch
    fired: set[str] = set()
    hooks = []

    def make_hook(name):
        def hook(mod, args, output=None):
            x = args[0] if output is None else adapter.derive_input(layer, name, output)
            hit = seen.get(id(x))
            if hit is not None and hit[0] is x:  # q/k/v (gate/up) read the same tensor: one H for all
                accs[name] = hit[1]
            else:
                acc = accs.get(name)
                if acc is None:
                    acc = accs[name] = HessianAccumulator(x.shape[-1], device)
                acc.add(x.detach())
                seen[id(x)] = (x, acc)
            fired.add(name)
            if len(fired) == len(names):
                raise _GroupDone

        return hook

    for n in names:
        if n in adapter.derived_inputs:
            hooks.append(layer.get_submodule(adapter.derived_inputs[n]).register_forward_hook(make_hook(n)))
        else:
            hooks.append(layer.get_submodule(n).register_forward_pre_hook(make_hook(n)))
    try:
        with torch.no_grad():
            for h in hidden:
                seen.clear()
                fired.clear()
                try:
                    adapter.run_layer(layer, h.to(device), kwargs)
                except _GroupDone:
                    pass
    finally:
        for hk in hooks:
            hk.remove()
        seen.clear()
    return {n: accs[n].hessian() for n in names}


def prune_layer(layer, layer_idx: int, adapter, hidden, kwargs, cfg: DriverConfig, device) -> list[LayerResult]:
    """Prune every linear of one decoder layer in place; return per-linear statistics."""
    spec = cfg.layer_specs[layer_idx] if cfg.layer_specs else cfg.spec
    groups = adapter.linear_groups if cfg.true_sequential else [adapter.linear_names()]
    results = []
    for group in groups:
        hessians = _capture_hessians(layer, group, hidden, kwargs, device, adapter)
        for name in group:
            lin = layer.get_submodule(name)
            full = f"{adapter.layer_prefix(layer_idx)}{name}"
            W = lin.weight.data.float()
            if not all_finite(W):
                raise PrunetuneError(f"weights of '{full}' contain NaN/Inf")
            H = hessians[name]
            if not all_finite(H):
                raise PrunetuneError(f"calibration activations entering '{full}' contain NaN/Inf")
            newW = cfg.method.fn(W, H, spec, damp=cfg.damp,
                                 blocksize=cfg.blocksize, **cfg.method_opts)
            if not all_finite(newW):
                raise PrunetuneError(f"pruning '{full}' produced NaN/Inf (try a larger --damp)")
            err, rel = layer_error_stats(W, newW, H)
            results.append(LayerResult(full, tuple(W.shape), spec.sparsity, sparsity_of(newW), err, rel))
            lin.weight.data.copy_(newW)  # casts in place: no second full-size copy
            del hessians[name], W, H, newW
            trim_heap()
    return results


def run_layers(layer_outputs_fn, hidden, kwargs, device):
    with torch.no_grad():
        return [layer_outputs_fn(h.to(device), kwargs).to("cpu") for h in hidden]


def sequential_prune(model, *, batches, cfg: DriverConfig, device, on_layer_done=None, start_layer: int = 0,
                     start_hidden=None, kwargs=None, materialize_layer=None, progress: bool = True):
    """Drive pruning over all layers from ``start_layer``.

    ``materialize_layer(i, layer)`` loads a layer's weights when the model is a streamed skeleton;
    ``on_layer_done(i, layer, results, outputs, kwargs)`` persists the finished layer (shards + resume).
    Returns the list of per-linear results (of the layers run now)."""
    adapter = get_adapter(model)
    if start_hidden is None:
        inputs = adapter.first_layer_inputs(batches, device)
        hidden, kwargs = inputs.hidden, inputs.kwargs
    else:
        hidden = start_hidden
    kwargs = adapter.kwargs_to(kwargs, device)
    all_results = []
    layers = adapter.layers
    bar = tqdm(range(start_layer, len(layers)), desc=f"prune {cfg.method.name} {cfg.spec}", unit="layer",
               disable=not progress, initial=start_layer, total=len(layers))
    for i in bar:
        layer = layers[i]
        if materialize_layer is not None:
            materialize_layer(i, layer)
        layer.to(device)
        results = prune_layer(layer, i, adapter, hidden, kwargs, cfg, device)
        hidden = run_layers(lambda h, kw: adapter.run_layer(layer, h, kw), hidden, kwargs, device)
        if not all(all_finite(h) for h in hidden):
            raise PrunetuneError(f"activations after layer {i} contain NaN/Inf")
        layer.to("cpu") if materialize_layer is None else None
        all_results.extend(results)
        bar.set_postfix(rel_err=f"{sum(r.rel_error for r in results) / max(len(results), 1):.4f}")
        if on_layer_done is not None:
            on_layer_done(i, layer, results, hidden, kwargs)
        trim_heap()
    return all_results
