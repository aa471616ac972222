"""Remove MLP neurons and attention heads layer by layer, refitting each reader exactly (``units.py``).

An MLP neuron is one row of every producer (gate_proj, up_proj) and one column of the reader (down_proj); an
attention unit is either a whole KV head with its query heads (rows of q/k/v, columns of o_proj) or one query
head (rows of q, columns of o_proj) taken *equally from every KV group*, so GQA stays valid and the result is
the family's own architecture: the same counts leave every layer, written as ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads`` (and an explicit ``head_dim``) in config.json. Plain
transformers (and vLLM) load it with no custom code; per-layer sizes are not offered because the Llama-family
configs cannot express them.

The layers run in prune's streamed, resumable driver (``pruning/api.py``): each layer sees the already
shrunk previous layers; within a layer the attention is cut first, then the MLP's statistics are taken with the
new attention in place (true-sequential), so ``down_proj`` is refit on the inputs it will really receive.
Greedy OBS removes MLP neurons ``ceil(n / 128)`` at a time (4 of SmolLM2's 512): 128 downdates per layer
whatever the width, so a 7B MLP's selection stays minutes, not hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ..errors import PrunetuneError
from .units import SELECTORS, refit, select_units

STRUCTURES = ("mlp", "heads", "mlp+heads")


@dataclass
class UnitPlan:
    """What leaves every decoder layer (the same in each, so the config can say it)."""

    neurons: int = 0        # MLP neurons removed per layer
    kv_heads: int = 0       # KV heads removed per layer, each with its query heads
    q_heads: int = 0        # query heads removed from every remaining KV group
    select: str = "obs"
    damp: float = 0.01
    block: int | None = None
    swap_rounds: int | None = None
    #: how the counts were sized when not by weights (``shrink --target prefill``): reported, never compared,
    #: and outside ``describe()`` so that a resume's fingerprint does not depend on timings
    target: dict | None = field(default=None, compare=False, repr=False)

    # the pruning driver reads these of a method
    name = "units"
    needs = "hessian"
    kind = "units"

    @property
    def sparsity(self) -> float:  # the driver's progress bar and journal; the report has the real shares
        return 0.0

    def __str__(self) -> str:
        parts = []
        if self.neurons:
            parts.append(f"-{self.neurons} neurons")
        if self.kv_heads:
            parts.append(f"-{self.kv_heads} kv heads")
        if self.q_heads:
            parts.append(f"-{self.q_heads} q heads/group")
        return ", ".join(parts) or "nothing"

    def describe(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "target"}
        d["structure"] = str(self)
        return d


@dataclass
class Geometry:
    """The unit counts of a Llama-family config (per layer)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def layer_params(self, neurons=None, heads=None, kv=None) -> int:
        """Weights of the linears of one layer (biases and norms are negligible and left out)."""
        n = self.intermediate if neurons is None else neurons
        h = self.heads if heads is None else heads
        k = self.kv_heads if kv is None else kv
        return 3 * self.hidden * n + 2 * self.hidden * self.head_dim * (h + k)

    def after(self, plan: UnitPlan) -> tuple[int, int, int]:
        """(intermediate, heads, kv heads) once ``plan`` is applied."""
        kv = self.kv_heads - plan.kv_heads
        return self.intermediate - plan.neurons, kv * (self.group - plan.q_heads), kv


def geometry(config, adapter=None) -> Geometry:
    if adapter is not None and (adapter.mlp_units is None or adapter.head_units is None):
        raise PrunetuneError(f"removing MLP neurons and heads is not supported for model type "
                             f"'{config.model_type}': prunetune has no adapter saying which linears produce and read "
                             "them (supported: llama, mistral, qwen2, qwen3 and families laid out like them, e.g. gemma2, "
                             "gemma3)")
    try:
        nh = int(config.num_attention_heads)
        nkv = int(getattr(config, "num_key_value_heads", None) or nh)
        hd = int(getattr(config, "head_dim", None) or config.hidden_size // nh)
        return Geometry(int(config.hidden_size), int(config.intermediate_size), nh, nkv, hd,
                        int(config.num_hidden_layers))
    except (AttributeError, TypeError):
        raise PrunetuneError(f"removing MLP neurons and heads is not supported for model type "
                             f"'{config.model_type}': its config does not name intermediate_size, heads and KV "
                             "heads as the Llama family does") from None


def plan_for_ratio(config, ratio: float, structure: str = "mlp", *, head_share: float | None = None,
                   **opts) -> UnitPlan:
    """The plan that removes the share ``ratio`` of decoder-layer linear weights closest to it.

    ``mlp``: neurons only; ``heads``: the (KV heads, query heads per group) pair nearest the target;
    ``mlp+heads``: ``head_share`` of the removed weights from heads (nearest feasible), the rest from neurons."""
    from .slicing import check_ratio

    check_ratio(ratio, "--ratio")
    if structure not in STRUCTURES:
        raise PrunetuneError(f"unknown structure '{structure}' (use hidden, {', '.join(STRUCTURES)})")
    geo = geometry(config)
    total = geo.layer_params()
    target = ratio * total
    per_neuron = 3 * geo.hidden
    if structure == "mlp":
        plan = UnitPlan(neurons=_aligned(geo, int(round(target / per_neuron))), **opts)
    else:
        share = 1.0 if structure == "heads" else (0.5 if head_share is None else float(head_share))
        if not 0 <= share <= 1:
            raise PrunetuneError(f"--head-share must be in [0, 1] (got {share})")
        want = share * target
        best = None
        for kv in range(geo.kv_heads):
            for q in range(geo.group):
                if (kv or q) and not _loadable(config, UnitPlan(kv_heads=kv, q_heads=q)):
                    continue
                _, h, k = geo.after(UnitPlan(kv_heads=kv, q_heads=q))
                removed = geo.layer_params() - geo.layer_params(heads=h, kv=k)
                key = (abs(removed - want), kv + q)
                if best is None or key < best[0]:
                    best = (key, kv, q, removed)
        _, kv, q, removed = best
        neurons = 0 if structure == "heads" else _aligned(geo, int(round(max(0.0, target - removed) / per_neuron)))
        plan = UnitPlan(neurons=neurons, kv_heads=kv, q_heads=q, **opts)
    check_plan(config, plan)
    return plan


#: MLP widths kept at a multiple of this where the model's own width is one: on SmolLM2-135M a layer with 1126
#: neurons (20% of the weights) runs 12% slower than one with 1128 (BENCHMARKS §9)
WIDTH_ALIGN = 8


def _aligned(geo: Geometry, neurons: int) -> int:
    """``neurons`` moved by at most ``WIDTH_ALIGN / 2`` so that the kept width is a multiple of ``WIDTH_ALIGN``
    (when the model's width is one and a multiple is left to keep; otherwise unchanged)."""
    if neurons <= 0 or geo.intermediate % WIDTH_ALIGN or geo.intermediate - neurons < 2 * WIDTH_ALIGN:
        return neurons
    kept = int(round((geo.intermediate - neurons) / WIDTH_ALIGN)) * WIDTH_ALIGN
    return geo.intermediate - kept


def _loadable(config, plan: UnitPlan) -> bool:
    try:
        type(config).from_dict(new_config(config, plan).to_dict())
    except Exception:  # the config classes raise ValueError or strict-dataclass errors
        return False
    return True


def check_plan(config, plan: UnitPlan) -> None:
    """One clear line if the plan removes nothing, too much, breaks GQA, or gives a config the family refuses."""
    geo = geometry(config)
    if plan.select not in SELECTORS:
        raise PrunetuneError(f"unknown unit selection '{plan.select}' (use {', '.join(SELECTORS)})")
    if min(plan.neurons, plan.kv_heads, plan.q_heads) < 0:
        raise PrunetuneError("unit counts must be non-negative")
    if plan.neurons == plan.kv_heads == plan.q_heads == 0:
        raise PrunetuneError("the target removes no neuron and no head (raise --ratio)")
    if plan.neurons >= geo.intermediate:
        raise PrunetuneError(f"cannot remove {plan.neurons} of {geo.intermediate} MLP neurons per layer")
    if plan.kv_heads >= geo.kv_heads:
        raise PrunetuneError(f"cannot remove {plan.kv_heads} of {geo.kv_heads} KV heads per layer (one must stay)")
    if plan.q_heads >= geo.group:
        raise PrunetuneError(f"cannot remove {plan.q_heads} query heads from KV groups of {geo.group} (GQA needs "
                             "at least one query head per KV head)")
    cfg = new_config(config, plan)
    try:
        type(config).from_dict(cfg.to_dict())
    except Exception as e:  # the config classes raise ValueError or strict-dataclass errors
        why = " ".join(x.strip() for x in str(e).splitlines() if x.strip())[:300]
        raise PrunetuneError(f"model type '{config.model_type}' cannot express {plan} in its config: {why}") from None


def new_config(config, plan: UnitPlan):
    import copy

    geo = geometry(config)
    inter, heads, kv = geo.after(plan)
    cfg = copy.deepcopy(config)
    cfg.intermediate_size = inter
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv
    cfg.head_dim = geo.head_dim
    return cfg


def params_removed_share(config, plan: UnitPlan) -> float:
    geo = geometry(config)
    inter, heads, kv = geo.after(plan)
    return 1 - geo.layer_params(inter, heads, kv) / geo.layer_params()


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    rg = lin.weight.requires_grad
    lin.weight = nn.Parameter(weight.to(lin.weight.dtype).contiguous(), requires_grad=rg)
    if lin.bias is not None:
        lin.bias = nn.Parameter((bias if bias is not None else lin.bias.data).to(lin.bias.dtype).contiguous(),
                                requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = weight.shape


def _keep_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(lin.weight.device)
    _set_linear(lin, lin.weight.data[rows], lin.bias.data[rows] if lin.bias is not None else None)


def _span(idx, width: int) -> torch.Tensor:
    """Columns (rows) ``[i·width, (i+1)·width)`` of every ``i`` in ``idx``."""
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    return (idx[:, None] * width + torch.arange(width)).flatten()


def _stats(layer, name, hidden, kwargs, device, adapter, cfg):
    from ..pruning.sequential import _capture_stats, _RunsIn

    with _RunsIn(layer, cfg.compute_dtype) as dtype:
        return _capture_stats(layer, [name], hidden, kwargs, device, adapter, "hessian", dtype)[name]


def _result(full, W, removed_cols, err, rel, kept):
    from ..pruning.sequential import LayerResult

    share = removed_cols / W.shape[1]
    return LayerResult(full, tuple(W.shape), share, share, err, rel, "hessian", kept_units=[int(k) for k in kept])


def prune_units_layer(layer, layer_idx: int, adapter, hidden, kwargs, cfg, device) -> list:
    """Remove ``cfg.method``'s units (a :class:`UnitPlan`) from one decoder layer in place: heads first, then
    MLP neurons on inputs that already pass through the new attention. Returns the readers' layer errors."""
    plan: UnitPlan = cfg.method
    prefix = adapter.layer_prefix(layer_idx)
    opts = dict(select=plan.select, damp=plan.damp, block=plan.block, swap_rounds=plan.swap_rounds)
    results = []
    if plan.kv_heads or plan.q_heads:
        attn_path, reader, qn, kvn = adapter.head_units
        attn = layer.get_submodule(attn_path)
        o, q = layer.get_submodule(reader), layer.get_submodule(qn)
        hd = int(attn.head_dim)
        nh, nkv = q.out_features // hd, layer.get_submodule(kvn[0]).out_features // hd
        g = nh // nkv
        st = _stats(layer, reader, hidden, kwargs, device, adapter, cfg)
        W = o.weight.data.float()
        H = st.H
        kv_keep = torch.arange(nkv)
        if plan.kv_heads:  # a KV unit: its g query heads' columns of o_proj
            groups = [_span([j], g * hd) for j in range(nkv)]
            gone = select_units(W, H, groups, plan.kv_heads, **opts)
            kv_keep = torch.tensor([j for j in range(nkv) if j not in gone])
        q_cand = _span(kv_keep, g)  # query heads of the kept KV heads
        q_keep = q_cand
        if plan.q_heads:
            cols = _span(q_cand, hd)
            sub_W, sub_H = W[:, cols], H[cols][:, cols]
            groups = [torch.arange(i * hd, (i + 1) * hd) for i in range(q_cand.numel())]
            group_of = torch.arange(q_cand.numel()) // g
            cap = torch.full((kv_keep.numel(),), plan.q_heads)
            gone = select_units(sub_W, sub_H, groups, plan.q_heads * kv_keep.numel(), capacity=cap,
                                group_of=group_of, **opts)
            q_keep = torch.tensor([int(q_cand[i]) for i in range(q_cand.numel()) if i not in gone])
        keep_cols = _span(q_keep, hd)
        Wn, err, rel = refit(W, H, keep_cols, plan.damp)
        results.append(_result(prefix + reader, W, W.shape[1] - keep_cols.numel(), err, rel, q_keep))
        _set_linear(o, Wn)
        _keep_rows(q, keep_cols)
        for name in kvn:
            _keep_rows(layer.get_submodule(name), _span(kv_keep, hd))
        attn.num_key_value_groups = q_keep.numel() // kv_keep.numel()
        del st, W, H, Wn
    if plan.neurons:
        reader, producers, _ = adapter.mlp_units
        down = layer.get_submodule(reader)
        st = _stats(layer, reader, hidden, kwargs, device, adapter, cfg)
        W = down.weight.data.float()
        m = W.shape[1]
        groups = [torch.tensor([j]) for j in range(m)]
        block = plan.block if plan.block else max(1, math.ceil(plan.neurons / 128))
        gone = set(select_units(W, st.H, groups, plan.neurons, **{**opts, "block": block}))
        keep = torch.tensor([j for j in range(m) if j not in gone])
        Wn, err, rel = refit(W, st.H, keep, plan.damp)
        results.append(_result(prefix + reader, W, len(gone), err, rel, keep))
        _set_linear(down, Wn)
        for name in producers:
            _keep_rows(layer.get_submodule(name), keep)
        del st, W, Wn
    return results


def _param_count(config) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        m = AutoModelForCausalLM.from_config(config)
    m.tie_weights()  # a tied head is the embedding: counted once, as the loaded model counts it
    return sum(p.numel() for p in m.parameters())


def units_report(report: dict, config, plan, model_info: dict) -> dict:
    """The prune driver's report of a unit shrink (``config``: the input's), in the shrink report's terms:
    sizes before and after, the share of decoder-layer weights removed, each reader's refit error."""
    small = new_config(config, plan)
    sizes = lambda c: {k: int(getattr(c, k)) for k in ("intermediate_size", "num_attention_heads",  # noqa: E731
                                                       "num_key_value_heads")}
    errs = report.get("layers", [])
    kinds = sorted({r["name"].rsplit(".", 1)[-1] for r in errs})
    info = {"structure": str(plan), "plan": plan.describe(), "sizes_before": sizes(config),
            "sizes_after": sizes(small), "decoder_linear_weights_removed_share": params_removed_share(config, plan),
            "mean_rel_error": {k: sum(r["rel_error"] for r in errs if r["name"].endswith("." + k)) /
                               max(1, sum(1 for r in errs if r["name"].endswith("." + k))) for k in kinds}}
    if plan.target is not None:
        info["target"] = plan.target
    out = {"shrink": info, "model": model_info,
           "parameters": {"before": _param_count(config), "after": _param_count(small)}, "readers": errs}
    for k in ("activation_cache", "manifest", "eval"):
        if k in report:
            out[k] = report[k]
    out["calibration"] = out["manifest"].get("calibration")
    return out
