"""SPP on a whole model: wrap the targeted linears of every decoder layer, merge them back, save the adapters."""

from __future__ import annotations

import torch
from torch import nn

from ....errors import PrunetuneError
from ....models import get_adapter
from .config import SPPConfig
from .layer import SPPLinear

def _targets(adapter, targets) -> list[str]:
    return adapter.select_linears(targets, "SPP target")


def _set_child(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def spp_modules(model: nn.Module) -> dict[str, SPPLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SPPLinear)}


def weight_sparsity(model: nn.Module, targets: list[str] | None = None) -> float:
    """Share of exact zeros over the targeted decoder-layer linears (SPP-wrapped ones included)."""
    adapter = get_adapter(model)
    zeros = total = 0
    for layer in adapter.layers:
        for name in _targets(adapter, targets):
            w = layer.get_submodule(name).weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def apply_spp(model: nn.Module, config=None, targets: list[str] | None = None) -> nn.Module:
    """Wrap the targeted linears of every decoder layer in ``SPPLinear``; freeze everything else. In place."""
    if config is None:
        config = SPPConfig()
    if spp_modules(model):
        raise PrunetuneError("model already has SPP adapters")
    adapter = get_adapter(model)
    names = _targets(adapter, targets if targets is not None else config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter.layers:
        for name in names:
            wrapper = SPPLinear(layer.get_submodule(name), config)
            wrapper.train(layer.training)  # follow the model's train/eval mode
            _set_child(layer, name, wrapper)
    model.spp_config = config
    return model


def merge_spp(model: nn.Module) -> nn.Module:
    """Replace every ``SPPLinear`` by a plain ``nn.Linear`` with the merged weight. In place."""
    for name, mod in list(spp_modules(model).items()):
        _set_child(model, name, mod.merge())
    if hasattr(model, "spp_config"):
        del model.spp_config
    return model


def spp_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``{<module path>.w_alpha, <module path>.w_beta}``, detached, on CPU."""
    sd = {}
    for name, mod in spp_modules(model).items():
        sd[f"{name}.w_alpha"] = mod.w_alpha.detach().cpu().contiguous()
        sd[f"{name}.w_beta"] = mod.w_beta.detach().cpu().contiguous()
    return sd


def load_spp_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    mods = spp_modules(model)
    expected = {f"{n}.{p}" for n in mods for p in ("w_alpha", "w_beta")}
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        what = sorted(missing)[:1] or sorted(unexpected)[:1]
        raise PrunetuneError(
            f"SPP adapters do not match the model ({len(missing)} missing, {len(unexpected)} unexpected, e.g. {what[0]})"
        )
    with torch.no_grad():
        for name, mod in mods.items():
            for p in ("w_alpha", "w_beta"):
                src = sd[f"{name}.{p}"]
                dst = getattr(mod, p)
                if src.shape != dst.shape:
                    raise PrunetuneError(f"SPP adapter {name}.{p} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(src)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


