"""Registry of one-shot pruning methods.

A method is a function ``fn(W, H, spec, *, damp=<its default>, blocksize=128, **opts) -> Tensor``:

* ``W``: float32 weight (out × in); never modified in place;
* ``H``: what the method declared it ``needs`` of the calibration inputs ``X`` (in × N tokens):
  ``"hessian"`` — ``2 X Xᵀ / N`` (in × in, undampened); ``"norms"`` — its diagonal ``2 Σ x_j² / N`` (in,), so
  no in × in matrix is ever built; ``"none"`` — None (the driver runs no calibration statistics for it);
* ``spec``: a `SparsitySpec`;
* returns the new weight (same shape, working dtype), pruned entries exactly 0.0.

``damp`` is the Hessian dampening λ (``H + λ·mean(diag H)·I``); each method registers its default (0.01, as
SparseGPT; APT's is larger, see its docstring), used when the caller gives none.

Adding a method = adding one module to this package that decorates its function with `register`;
modules here are discovered automatically (names starting with ``_`` are skipped).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ...errors import PrunetuneError

__all__ = ["PruneMethod", "register", "get_method", "available", "reject_unknown_opts", "check_options"]


NEEDS = ("hessian", "norms", "none")


@dataclass
class PruneMethod:
    name: str
    fn: Callable
    needs: str
    doc: str
    damp: float = 0.01  # default Hessian dampening

    @property
    def needs_hessian(self) -> bool:
        return self.needs == "hessian"


_REGISTRY: dict[str, PruneMethod] = {}


def register(name: str, needs: str = "hessian", damp: float = 0.01):
    """Decorator: register ``fn`` under ``name`` (its docstring's first paragraph becomes ``doc``); ``needs``:
    ``"hessian"``, ``"norms"`` or ``"none"`` (see the module docstring); ``damp``: its default dampening."""
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS} (got {needs!r})")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"pruning method '{name}' registered twice")
        doc = (fn.__doc__ or "").strip().split("\n\n")[0]
        _REGISTRY[name] = PruneMethod(name, fn, needs, " ".join(doc.split()), float(damp))
        return fn

    return deco


def available() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> PruneMethod:
    """The method called ``name`` (case-insensitive); `PrunetuneError` listing the choices otherwise."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise PrunetuneError(f"unknown method '{name}' (choose from: {', '.join(available())})")
    return _REGISTRY[key]


def reject_unknown_opts(method: str, opts: dict, allowed) -> None:
    """`PrunetuneError` if a method got options it does not understand (they come from the user)."""
    if opts:
        bad = ", ".join(f"'{k}'" for k in sorted(opts))
        ok = ", ".join(sorted(allowed)) or "none"
        raise PrunetuneError(f"method '{method}' does not take option(s) {bad} (it takes: {ok})")


def check_options(method: PruneMethod, spec, opts: dict, *, damp: float, blocksize: int) -> None:
    """Run ``method`` once with the user's options on a tiny synthetic layer of the asked sparsity kind, so that
    an option it does not take, a value out of range or a scheme that does not fit the sparsity is one clear
    error before any weight of the model is read (the methods themselves are the one place that validates)."""
    import torch

    cols = spec.m * 8 if spec.is_nm else 32
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, cols, generator=g)
    X = torch.randn(cols, 4 * cols, generator=g)
    stat = {"hessian": 2 * X @ X.T / X.shape[1], "norms": X.square().sum(1), "none": None}[method.needs]
    try:
        method.fn(W, stat, spec, damp=damp, blocksize=blocksize, **opts)
    except PrunetuneError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:  # e.g. a value of the wrong type
        shown = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        raise PrunetuneError(f"{method.name}: options {shown} (damp={damp}, blocksize={blocksize}) do not work: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_discover()
