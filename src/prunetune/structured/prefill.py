"""A unit shrink sized by this machine's prefill time instead of by weights (``shrink --target prefill``).

A plan removes the same units from every decoder layer, so the model's prefill time is ``L · t_layer(plan) +
t_rest`` (embeddings, final norm, the LM head on the last position: what ``bench`` times, untouched by the cut).
Both terms are measured on a one-layer copy built from the config with random weights (time does not depend on
their values; memory is one layer and the embeddings, so a 7B target is timed in a few GB): forward hooks split
one forward into the layer and the rest, then the dense layer and each candidate's layer run in back-to-back pairs
on the captured layer inputs; the ratio of their fastest runs (what other processes add to a run is never
negative) gives the share of prefill time the plan removes. The plan is chosen from a fit of those shares against
the share of weights removed (``plan_for_time``); every plan timed is recorded in the report.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ..errors import PrunetuneError
from .neurons import UnitPlan, geometry, new_config, plan_for_ratio

#: the shape ``--target prefill`` times: ``bench``'s batch 8 x 128 tokens (the issue's prefill goal)
PREFILL_SHAPE = (8, 128)
TARGETS = ("params", "prefill")


def one_layer_config(config):
    """The config of the same model with one decoder layer (per-layer lists cut to their first entry)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 1
    for key in ("layer_types", "sliding_window_pattern_list"):
        if isinstance(getattr(cfg, key, None), (list, tuple)):
            setattr(cfg, key, list(getattr(cfg, key))[:1])
    cfg.use_cache = False
    return cfg


class PrefillClock:
    """Times one decoder layer of ``config`` (dense and shrunk by a plan) on this machine's prefill shape."""

    def __init__(self, config, *, shape=PREFILL_SHAPE, repeats: int = 5, dtype=torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        from ..evaluation.timing import forward_kwargs, syncer
        from ..models import get_adapter

        self.shape, self.repeats, self.dtype, self.device = tuple(shape), int(repeats), dtype, device
        self.layers = int(config.num_hidden_layers)
        self._sync = syncer(device)
        torch.manual_seed(0)
        self._cfg1 = one_layer_config(config)
        model = AutoModelForCausalLM.from_config(self._cfg1).to(device=device, dtype=dtype).eval()
        layer = get_adapter(model).layers[0]
        ids = torch.randint(0, int(config.vocab_size), self.shape, generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        kw, _ = forward_kwargs(model)
        stamps, captured = {}, {}

        def pre(mod, args, kwargs):
            captured.setdefault("call", (args, kwargs))
            self._sync()
            stamps["in"] = time.perf_counter()

        def post(mod, args, out):
            self._sync()
            stamps["out"] = time.perf_counter()

        hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
        whole, inside = [], []
        with torch.inference_mode():
            for rep in range(1 + self.repeats):
                self._sync()
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=False, **kw)
                self._sync()
                if rep:
                    whole.append(time.perf_counter() - t0)
                    inside.append(stamps["out"] - stamps["in"])
        for h in hooks:
            h.remove()
        self._args, self._kwargs = captured["call"]
        self.dense_layer = layer
        #: seconds of the dense layer and of one forward outside the decoder layers (embeddings, final norm, the
        #: LM head): minima over the repeats, the least disturbed by other processes
        self.layer_s = min(inside)
        self.rest_s = max(0.0, min(whole) - min(inside))
        #: dense/shrunk pairs timed per plan: at least ``repeats``, and about two seconds of the dense layer
        self.pairs = max(self.repeats, min(100, math.ceil(2.0 / max(self.layer_s, 1e-4))))
        self._cache: dict[tuple, dict] = {}
        del model

    def _layer_for(self, plan: UnitPlan):
        """The shrunk layer alone (the decoder-layer class built from the new config: no embeddings to allocate,
        which at a 262k vocabulary are larger than the layer), else from a one-layer model."""
        cfg = new_config(self._cfg1, plan)
        torch.manual_seed(0)
        try:
            layer = type(self.dense_layer)(cfg, layer_idx=0)
        except TypeError:
            from transformers import AutoModelForCausalLM

            from ..models import get_adapter

            layer = get_adapter(AutoModelForCausalLM.from_config(cfg)).layers[0]
        return layer.to(device=self.device, dtype=self.dtype).eval()

    def _time(self, layer) -> float:
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            layer(*self._args, **self._kwargs)
            self._sync()
            return time.perf_counter() - t0

    def measure(self, plan: UnitPlan) -> dict:
        """The shrunk layer's time relative to the dense one (the ratio of the two minima over back-to-back pairs:
        what other processes add to a run is never negative, so the fastest run of each is the least disturbed)
        and the share of prefill time the plan removes."""
        key = (plan.neurons, plan.kv_heads, plan.q_heads)
        if key not in self._cache:
            small = self._layer_for(plan)
            pairs = []
            for rep in range(1 + self.pairs):  # the first round warms both up
                d, s = self._time(self.dense_layer), self._time(small)
                if rep:
                    pairs.append((d, s))
            ratio = min(s for _, s in pairs) / min(d for d, _ in pairs)
            td, L = self.layer_s, self.layers
            self._cache[key] = {"structure": str(plan), "layer_time_vs_dense": round(ratio, 4),
                                "prefill_share_removed": L * td * (1 - ratio) / (L * td + self.rest_s)}
        return self._cache[key]


def _candidates(config, structure: str, head_share, align: int, opts) -> list[tuple[float, UnitPlan]]:
    """(share of weights, plan) for every distinct plan on a 0.5% grid of weights, the MLP's kept width rounded
    down to a multiple of ``align`` (widths the kernels tile well: on SmolLM2-135M an odd width of about 1400
    neurons runs 10-15% slower than the multiple of 64 below it, BENCHMARKS §9), sorted by the share of weights."""
    from .neurons import check_plan, params_removed_share

    geo = geometry(config)
    seen = {}
    for i in range(1, 200):
        try:
            plan = plan_for_ratio(config, i / 200, structure, head_share=head_share, **opts)
            if plan.neurons and align:
                kept = (geo.intermediate - plan.neurons) // align * align
                plan = UnitPlan(neurons=geo.intermediate - max(kept, align), kv_heads=plan.kv_heads,
                                q_heads=plan.q_heads, **opts)
            check_plan(config, plan)
        except PrunetuneError:
            continue
        seen.setdefault((plan.neurons, plan.kv_heads, plan.q_heads), plan)
    return sorted(((params_removed_share(config, p), p) for p in seen.values()), key=lambda x: x[0])


def plan_for_time(config, share: float, structure: str, measure, *, head_share=None, step: float = 0.05,
                  align: int = 64, **opts) -> tuple[UnitPlan, dict]:
    """The plan of ``structure`` with the fewest weights removed whose prefill share removed reaches ``share``,
    by a fit: ``measure(plan)["prefill_share_removed"]`` is taken at plans about ``step`` of the weights apart
    (upwards, until two are past the target), the share of time is fitted as ``slope × share of weights``
    (least squares through the origin: a single timing on a busy machine is off by ±10%, the fit over several is
    not), and the first candidate whose fitted share reaches the target is chosen and timed too. Returns the plan
    and the search: slope, fitted and measured share of the plan, every plan timed."""
    from .slicing import check_ratio

    check_ratio(share, "--ratio")
    cands = _candidates(config, structure, head_share, align, opts)
    if not cands:
        raise PrunetuneError(f"--structure {structure}: no plan the config can express removes prefill time")
    probes: dict[tuple, dict] = {}

    def timed(w: float, plan: UnitPlan) -> dict:
        key = (plan.neurons, plan.kv_heads, plan.q_heads)
        if key not in probes:
            probes[key] = dict(measure(plan), weights_share_removed=w)
        return probes[key]

    next_w, past = step, 0
    for w, plan in cands:  # about one plan per ``step`` of weights, upwards
        if w + 1e-9 < next_w and (w, plan) != cands[-1]:
            continue
        next_w = w + step
        past += timed(w, plan)["prefill_share_removed"] >= share
        if past >= 2:
            break
    pts = [(p["weights_share_removed"], p["prefill_share_removed"]) for p in probes.values()]
    slope = sum(w * t for w, t in pts) / sum(w * w for w, _ in pts)
    if slope * cands[-1][0] < share:
        raise PrunetuneError(f"--target prefill --ratio {share}: {structure} removes at most "
                             f"{slope * cands[-1][0]:.3f} of this machine's prefill time (fitted over {len(pts)} "
                             f"plans up to {cands[-1][0]:.2f} of the decoder weights)")
    w, plan = next((w, p) for w, p in cands if slope * w >= share)
    chosen = timed(w, plan)
    search = {"fit": "prefill share removed = slope x share of decoder weights removed (least squares through 0)",
              "slope": slope, "prefill_share_removed_fitted": slope * w,
              "prefill_share_removed_measured": chosen["prefill_share_removed"], "align": align,
              "probes": sorted(probes.values(), key=lambda p: p["weights_share_removed"])}
    return plan, search


def target_info(share: float, search: dict, clock: PrefillClock) -> dict:
    """What the report says about a prefill-time target: the ask, the fit, the plan's share, every plan timed."""
    return {"kind": "prefill", "share_asked": share, **search, "shape": list(clock.shape),
            "threads": torch.get_num_threads(), "device": clock.device, "dtype": str(clock.dtype).replace("torch.", ""),
            "layer_ms": round(1e3 * clock.layer_s, 3), "rest_ms": round(1e3 * clock.rest_s, 3),
            "layers": clock.layers, "pairs_per_plan": clock.pairs,
            "clock": "one-layer copy, dense and shrunk layers timed in back-to-back pairs (ratio of the minima); "
                     "prefill = layers x layer + rest"}
