"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2024).

Layers with more activation outliers keep more weights. Outlier ratio of layer l: the share of
scores |W_ij|·||X_j||₂ over all its linears that exceed ``m`` times the layer's mean score. Ratios are
min-max normalised to [0, 2λ] and re-centred so the mean layer sparsity equals the target.
"""

from __future__ import annotations

import torch

from ..errors import PrunetuneError
from ..models import get_adapter
from .masks import SparsitySpec


def outlier_ratios(model, hidden, layer_kwargs, device, m: float = 5.0, materialize_layer=None,
                   release_layer=None, scratch=None) -> list[float]:
    """One dense pass over the layers (layer ``i`` with ``layer_kwargs[i]``); returns each layer's outlier ratio.
    ``hidden``: the first layer's inputs (a list, or an activation-cache slot, left unchanged); ``scratch``: two
    cache slots the pass alternates between (else the outputs are kept in a list)."""
    adapter = get_adapter(model)
    layer_kwargs = adapter.kwargs_to(layer_kwargs, device)
    ratios = []
    for i, layer in enumerate(adapter.layers):
        kwargs = layer_kwargs[i]
        if materialize_layer is not None:
            materialize_layer(i, layer)
        layer.to(device)
        sq = {}
        hooks = []
        for name, lin in adapter.linears(layer).items():
            def hook(mod, args, output=None, name=name):
                x = args[0] if output is None else adapter.derive_input(layer, name, output)
                x = x.detach().float().reshape(-1, x.shape[-1])
                sq[name] = sq.get(name, 0) + (x * x).sum(0)
            if name in adapter.derived_inputs:
                hooks.append(layer.get_submodule(adapter.derived_inputs[name]).register_forward_hook(hook))
            else:
                hooks.append(lin.register_forward_pre_hook(hook))
        out_slot = scratch[i % 2] if scratch is not None else None
        with torch.no_grad():
            try:
                outs = []
                for j in range(len(hidden)):
                    y = adapter.run_layer(layer, hidden[j].to(device), kwargs).to("cpu")
                    if out_slot is None:
                        outs.append(y)
                    else:
                        out_slot.write(j, y)
                outs = out_slot if out_slot is not None else outs
            finally:
                for hk in hooks:
                    hk.remove()
        scores = torch.cat([(lin.weight.float().abs() * sq[n].sqrt()).flatten()
                            for n, lin in adapter.linears(layer).items()])
        ratios.append((scores > m * scores.mean()).float().mean().item())
        hidden = outs
        if release_layer is not None:
            release_layer(i, layer)
        else:
            layer.to("cpu")
    return ratios


def owl_layer_specs(ratios: list[float], spec: SparsitySpec, lam: float = 0.08) -> list[SparsitySpec]:
    if spec.kind != "unstructured":
        raise PrunetuneError("OWL sets per-layer unstructured sparsity; it cannot be combined with N:M")
    r = torch.tensor(ratios, dtype=torch.float64)
    span = (r.max() - r.min()).item()
    norm = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    density = norm - norm.mean() + (1 - spec.sparsity)
    sparsities = (1 - density).clamp(0.0, 0.99)
    return [SparsitySpec("unstructured", float(s)) for s in sparsities]
