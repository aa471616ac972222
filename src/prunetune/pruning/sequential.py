"""The layer-by-layer calibrated driver shared by every pruning method.

For each decoder layer: capture the inputs of its linears with hooks (true-sequential sub-groups:
q/k/v, then o, then gate/up, then down, re-running the layer between groups so later groups see the
already-pruned earlier ones), prune them with the chosen method, then run the pruned layer to make the
next layer's inputs. Only one layer is on the accelerator at a time; cached activations stay on CPU, in RAM
or — past a budget — on disk, read back one batch at a time (``activations.py``). After each layer its
weights go to their own shard file and a small journal records it (the layer's outputs are already in the
activation cache's file), so a killed run continues from the last finished layer with bit-identical results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import PrunetuneError
from ..io import all_finite
from ..manifest import trim_heap
from ..models import get_adapter
from . import experts
from .hessian import layer_error_stats
from .masks import SparsitySpec, sparsity_of

log = logging.getLogger("prunetune")


#: input rows of one linear kept for its layer-error report when that is cheaper from them than from H, or when
#: the method needs no H (a uniform, deterministic subsample: every k-th calibration token)
ERROR_SAMPLE = 1024


class InputStats:
    """What the driver collects about one linear's calibration inputs ``X`` (in × N tokens), no more than the
    method ``needs``: ``H = 2 X Xᵀ / N`` (float64 where in ≤ 4096, else float32) for ``"hessian"``, the column
    energies ``2 Σ x_j² / N`` (float64) for ``"norms"``, nothing for ``"none"``; plus, for the layer-error report,
    every ``k``-th input row when that is the cheaper exact or sampled basis (see :meth:`error_basis`)."""

    def __init__(self, in_features: int, device, need: str, total_tokens: int):
        self.need, self.n, self.total = need, 0, int(total_tokens)
        self.H = self.sq = None
        if need == "hessian":
            dtype = torch.float64 if in_features <= 4096 else torch.float32
            self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        elif need == "norms":
            self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.basis = self.error_basis(in_features, need, total_tokens)
        self.every = max(1, -(-self.total // ERROR_SAMPLE))  # ceil
        self.rows: list[torch.Tensor] = []

    @staticmethod
    def error_basis(in_features: int, need: str, total_tokens: int) -> str:
        """``"hessian"`` (exact, ``tr(ΔW H ΔWᵀ)``: ``out·in²`` per product), ``"activations"`` (exact, from every
        calibration row: ``out·in·N``) or ``"sampled"`` (every k-th row, about ERROR_SAMPLE of them:
        ``out·in·ERROR_SAMPLE``) — whichever is cheapest of those available."""
        if total_tokens <= ERROR_SAMPLE and (need != "hessian" or total_tokens < in_features):
            return "activations"
        if need == "hessian" and in_features <= ERROR_SAMPLE:
            return "hessian"
        return "sampled"

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        b = x.shape[0]
        if b == 0:
            return
        if self.basis != "hessian":
            idx = torch.arange(self.n, self.n + b, device=x.device)
            self.rows.append(x[(idx % self.every) == 0].float().cpu())
        n_new = self.n + b
        if self.H is not None:
            self.H *= self.n / n_new
            xs = x.to(self.H.dtype) * (2.0 / n_new) ** 0.5
            self.H.addmm_(xs.t(), xs)
        elif self.sq is not None:
            self.sq *= self.n / n_new
            self.sq += x.double().pow(2).sum(0) * (2.0 / n_new)
        self.n = n_new

    def for_method(self) -> torch.Tensor | None:
        if self.H is not None:
            return self.H.float()
        return self.sq.float() if self.sq is not None else None

    def error(self, W_old: torch.Tensor, W_new: torch.Tensor) -> tuple[float, float]:
        """``(layer error, relative error)`` on the chosen basis (the sampled one estimates the same quantity)."""
        if self.basis == "hessian":
            return layer_error_stats(W_old, W_new, self.H)
        return activation_error_stats(W_old, W_new, torch.cat(self.rows) if self.rows else W_old.new_zeros(0, W_old.shape[1]))


def activation_error_stats(W_old: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor,
                           chunk_elems: int = 1 << 22) -> tuple[float, float]:
    """``((2/n)·||ΔW Xᵀ||², ||ΔW Xᵀ||² / ||W Xᵀ||²)`` over the ``n`` input rows ``X`` (n × in), in row chunks of the
    weight: with ``X`` all calibration rows this is the layer error ``tr(ΔW H ΔWᵀ)`` exactly."""
    n = X.shape[0]
    if n == 0:
        return 0.0, 0.0
    Xt = X.to(device=W_old.device, dtype=torch.float32).t()
    rows, cols = W_old.shape
    step = max(1, chunk_elems // max(1, cols))
    num = den = 0.0
    for r0 in range(0, rows, step):
        w = W_old[r0:r0 + step].float()
        num += float(((W_new[r0:r0 + step].float() - w) @ Xt).double().pow(2).sum())
        den += float((w @ Xt).double().pow(2).sum())
    num *= 2.0 / n
    den *= 2.0 / n
    if den <= 0:
        return num, (0.0 if num == 0 else float("inf"))
    return num, num / den


@dataclass
class LayerResult:
    name: str
    shape: tuple
    sparsity_target: float
    sparsity: float
    error: float
    rel_error: float
    #: how ``error`` was computed: "hessian" / "activations" (exact) or "sampled" (every k-th calibration token)
    error_basis: str = "hessian"
    #: mixture-of-experts matrices: calibration tokens routed to the expert, and the weight of its own statistics
    #: against the identity they were dampened towards (pruning/experts.py)
    routed_tokens: int | None = None
    own_data_weight: float | None = None
    #: whole-unit removal (``structured/neurons.py``): the units of this reader that were kept (MLP neurons, or
    #: query heads), as indices of the input model
    kept_units: list | None = None


@dataclass
class DriverConfig:
    method: object  # PruneMethod
    spec: SparsitySpec
    damp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    method_opts: dict = field(default_factory=dict)
    layer_specs: list | None = None  # per-layer SparsitySpec (OWL), else ``spec`` everywhere
    #: dtype the layer's forwards run in (None: its stored dtype). The layer is cast to it only for its forwards
    #: and kept in the stored dtype in between (half the memory while a matrix is pruned); each pruned matrix is
    #: rounded to the stored dtype, so the next layer's inputs match the written checkpoint
    compute_dtype: torch.dtype | None = None
    #: ``fn(layer, layer_idx, adapter, hidden, kwargs, cfg, device) -> [LayerResult]`` run instead of the
    #: per-linear pruning: the structured shrink removes whole neurons and heads in the same driver
    layer_fn: object = None


class _GroupDone(Exception):
    """Raised once every hooked linear has seen its input: the rest of the layer need not run."""


def token_count(hidden) -> int:
    """Calibration tokens in a list of (batch, seq, d) tensors or an activation-cache slot (not read)."""
    if hasattr(hidden, "tokens"):
        return hidden.tokens()
    return sum(int(h.shape[0] * h.shape[1]) for h in hidden)


def _bank_args(args, kwargs):
    """``(hidden, top_k_index)`` of a call ``experts(hidden_states, top_k_index, top_k_weights)``."""
    vals = list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index") if k in kwargs]
    return vals[0], vals[1]


def _capture_stats(layer, names, hidden, kwargs, device, adapter, need: str, dtype=None) -> dict:
    """Run the layer over all cached batches with hooks on ``names``; linears fed the same tensor share stats.

    The forward stops as soon as the last hooked linear has its input, so capturing q/k/v costs almost
    nothing and true-sequential pruning costs well under one extra layer forward per group."""
    total = token_count(hidden)
    accs: dict[str, InputStats] = {}
    seen: dict[int, tuple] = {}  # id(input) -> (input, stats), reset for every batch
    fired: set[str] = set()
    hooks = []

    def make_hook(name):
        def hook(mod, args, output=None):
            x = args[0] if output is None else adapter.derive_input(layer, name, output)
            hit = seen.get(id(x))
            if hit is not None and hit[0] is x:  # q/k/v (gate/up) read the same tensor: one accumulator for all
                accs[name] = hit[1]
            else:
                acc = accs.get(name)
                if acc is None:
                    acc = accs[name] = InputStats(x.shape[-1], device, need, total)
                acc.add(x.detach())
                seen[id(x)] = (x, acc)
            fired.add(name)
            if len(fired) == len(names):
                raise _GroupDone

        return hook

    def make_bank_hook(name, bank_path, param):
        def hook(mod, args, kwargs):
            hidden, top_k = _bank_args(args, kwargs)
            if name not in accs:
                accs[name] = [InputStats(x.shape[-1], device, need, total)
                              for _, x in experts.expert_inputs(mod, param, hidden[:0], top_k[:0])]
            for e, x in experts.expert_inputs(mod, param, hidden, top_k):
                accs[name][e].add(x.detach())
            fired.add(name)
            if len(fired) == len(names):
                raise _GroupDone

        return hook

    for n in names:
        bank = experts.parse(n)
        if bank is not None:
            hooks.append(layer.get_submodule(bank[0]).register_forward_pre_hook(make_bank_hook(n, *bank),
                                                                                with_kwargs=True))
        elif n in adapter.derived_inputs:
            hooks.append(layer.get_submodule(adapter.derived_inputs[n]).register_forward_hook(make_hook(n)))
        else:
            hooks.append(layer.get_submodule(n).register_forward_pre_hook(make_hook(n)))
    try:
        with torch.no_grad():
            for h in hidden:
                seen.clear()
                fired.clear()
                try:
                    adapter.run_layer(layer, h.to(device=device, dtype=dtype or h.dtype), kwargs)
                except _GroupDone:
                    pass
    finally:
        for hk in hooks:
            hk.remove()
        seen.clear()
    return accs


class _RunsIn:
    """Cast ``layer`` to ``dtype`` for the ``with`` block and every tensor back to its own stored dtype after
    (exact: each weight holds a value of that dtype, pruned ones were rounded to it); a no-op when ``dtype`` is
    None or already the dtype of every floating tensor."""

    def __init__(self, layer, dtype):
        self.layer, self.dtype = layer, dtype
        tensors = list(layer.named_parameters()) + list(layer.named_buffers())
        self.stored = {n: t.dtype for n, t in tensors if t.is_floating_point()}
        self.active = dtype is not None and any(d != dtype for d in self.stored.values())

    def __enter__(self):
        if self.active:
            self.layer.to(self.dtype)
        return self.dtype if self.active else None

    def __exit__(self, *exc):
        if self.active:
            for n, t in list(self.layer.named_parameters()) + list(self.layer.named_buffers()):
                if n in self.stored and t.dtype != self.stored[n]:
                    t.data = t.data.to(self.stored[n])
            trim_heap()


def prune_layer(layer, layer_idx: int, adapter, hidden, kwargs, cfg: DriverConfig, device) -> list[LayerResult]:
    """Prune every linear of one decoder layer in place; return per-linear statistics."""
    if cfg.layer_fn is not None:
        return cfg.layer_fn(layer, layer_idx, adapter, hidden, kwargs, cfg, device)
    spec = cfg.layer_specs[layer_idx] if cfg.layer_specs else cfg.spec
    groups = adapter.prune_groups() if cfg.true_sequential else [[n for g in adapter.prune_groups() for n in g]]
    results = []
    for group in groups:
        with _RunsIn(layer, cfg.compute_dtype) as dtype:
            stats = _capture_stats(layer, group, hidden, kwargs, device, adapter, cfg.method.needs, dtype)
        for name in group:
            if experts.parse(name) is not None:
                results += _prune_bank(layer, layer_idx, name, stats.pop(name, None), adapter, cfg, spec)
                continue
            lin = layer.get_submodule(name)
            full = f"{adapter.layer_prefix(layer_idx)}{name}"
            W = lin.weight.data.float()
            st = stats[name]
            H = st.for_method()
            newW = _prune_one(W, H, spec, cfg, full)
            err, rel = st.error(W, newW)
            results.append(LayerResult(full, tuple(W.shape), spec.sparsity, sparsity_of(newW), err, rel, st.basis))
            lin.weight.data.copy_(newW)  # casts in place: no second full-size copy
            del stats[name], W, H, newW, st
            trim_heap()
    return results


def _prune_one(W: torch.Tensor, H, spec, cfg: DriverConfig, full: str) -> torch.Tensor:
    if not all_finite(W):
        raise PrunetuneError(f"weights of '{full}' contain NaN/Inf")
    if H is not None and not all_finite(H):
        raise PrunetuneError(f"calibration activations entering '{full}' contain NaN/Inf")
    newW = cfg.method.fn(W, H, spec, damp=cfg.damp, blocksize=cfg.blocksize, **cfg.method_opts)
    if not all_finite(newW):
        raise PrunetuneError(f"pruning '{full}' produced NaN/Inf (try a larger --damp)")
    return newW


def _prune_bank(layer, layer_idx: int, name: str, stats, adapter, cfg: DriverConfig, spec) -> list[LayerResult]:
    """Every expert of a bank's ``gate_up_proj`` or ``down_proj`` with its own routed tokens (``experts.py``)."""
    bank_path, pname = experts.parse(name)
    param = getattr(layer.get_submodule(bank_path), pname)
    if stats is None:  # the bank was never called: no expert saw a token
        stats = [InputStats(param.shape[-1], param.device, cfg.method.needs, 0) for _ in range(param.shape[0])]
    weights = experts.blend_toward_identity(stats) if cfg.method.needs != "none" else [1.0] * len(stats)
    out = []
    for e, st in enumerate(stats):
        full = f"{adapter.layer_prefix(layer_idx)}{bank_path}.{pname}[{e}]"
        W = param.data[e].float()
        newW = _prune_one(W, st.for_method(), spec, cfg, full)
        err, rel = st.error(W, newW) if st.n else (0.0, 0.0)
        r = LayerResult(full, tuple(W.shape), spec.sparsity, sparsity_of(newW), err, rel,
                        st.basis if st.n else "no routed token")
        r.routed_tokens, r.own_data_weight = int(st.n), round(float(weights[e]), 6)
        out.append(r)
        param.data[e].copy_(newW)
        del W, newW
    trim_heap()
    return out


def run_layers(layer_outputs_fn, hidden, kwargs, device, out=None, dtype=None):
    """The layer's outputs for every batch of ``hidden``: a list on CPU, or written into the slot ``out``. With
    ``dtype`` each batch runs in it and its outputs come back in the batch's own dtype."""
    results = []
    with torch.no_grad():
        for i in range(len(hidden)):
            h = hidden[i]
            y = layer_outputs_fn(h.to(device=device, dtype=dtype or h.dtype), kwargs).to("cpu", h.dtype)
            if not all_finite(y):
                raise PrunetuneError("non-finite activations")
            if out is None:
                results.append(y)
            else:
                out.write(i, y)
    return out if out is not None else results


def sequential_prune(model, *, batches, cfg: DriverConfig, device, on_layer_done=None, start_layer: int = 0,
                     start_hidden=None, layer_kwargs=None, materialize_layer=None, progress: bool = True,
                     cache=None, slot: str = "a"):
    """Drive pruning over all layers from ``start_layer``; layer ``i`` runs with ``layer_kwargs[i]``.

    The activations between layers are a list of tensors, or — with ``cache`` (``activations.ActivationCache``)
    — its two slots: ``start_hidden`` is then ignored and layer ``start_layer`` reads ``cache.slots[slot]``.
    ``materialize_layer(i, layer)`` loads a layer's weights when the model is a streamed skeleton;
    ``on_layer_done(i, layer, results, outputs, kwargs, slot)`` persists the finished layer (shards + resume).
    Returns the list of per-linear results (of the layers run now)."""
    adapter = get_adapter(model)
    if cache is not None:
        hidden = cache.slots[slot]
    elif start_hidden is None:
        inputs = adapter.first_layer_inputs(batches, device)
        hidden, layer_kwargs = inputs.hidden, inputs.layer_kwargs
    else:
        hidden = start_hidden
    layer_kwargs = adapter.kwargs_to(layer_kwargs, device, dtype=cfg.compute_dtype)
    all_results = []
    layers = adapter.layers
    bar = tqdm(range(start_layer, len(layers)), desc=f"prune {cfg.method.name} {cfg.spec}", unit="layer",
               disable=not progress, initial=start_layer, total=len(layers))
    for i in bar:
        layer, kwargs = layers[i], layer_kwargs[i]
        if materialize_layer is not None:
            materialize_layer(i, layer)
        layer.to(device)
        results = prune_layer(layer, i, adapter, hidden, kwargs, cfg, device)
        out_slot = None
        if cache is not None:
            slot = "b" if slot == "a" else "a"
            out_slot = cache.slots[slot]
        try:
            with _RunsIn(layer, cfg.compute_dtype) as dtype:
                hidden_next = run_layers(lambda h, kw: adapter.run_layer(layer, h, kw), hidden, kwargs, device,
                                         out_slot, dtype)
        except PrunetuneError:
            raise PrunetuneError(f"activations after layer {i} contain NaN/Inf") from None
        if cache is not None:
            hidden.release()
            out_slot.flush()
        hidden = hidden_next
        layer.to("cpu") if materialize_layer is None else None
        all_results.extend(results)
        bar.set_postfix(rel_err=f"{sum(r.rel_error for r in results) / max(len(results), 1):.4f}")
        if on_layer_done is not None:
            on_layer_done(i, layer, results, hidden, kwargs, slot)
        trim_heap()
    return all_results
