"""``shrink --target prefill``: unit counts sized by this machine's prefill time. The search is tested on a
deterministic clock (what it must choose), the clock on a real tiny layer (what it measures), the flow end to end
with the clock replaced (report, resume, clean refusals)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_clean_error, run_cli, tiny_config
from prunetune.errors import PrunetuneError
from prunetune.structured.neurons import UnitPlan, params_removed_share
from prunetune.structured.prefill import PrefillClock, plan_for_time


def _smollm2_config():
    import transformers as T

    return T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30, vocab_size=49152, head_dim=64)


def _clock(curve):
    """A clock whose prefill share is ``curve(kept MLP width)``; it counts the plans it timed."""
    timed = []

    def measure(plan: UnitPlan) -> dict:
        timed.append(plan.neurons)
        return {"structure": str(plan), "prefill_share_removed": curve(1536 - plan.neurons)}
    return measure, timed


def test_prefill_target_takes_the_fewest_aligned_weights_the_fit_says_reach_the_time():
    cfg = _smollm2_config()
    # time proportional to the kept MLP width (3/4 of the layer's weights), each measurement off by up to ±8% of
    # the layer (a busy machine)
    noise = iter([0.08, -0.08, 0.05, -0.03, 0.07, -0.06, 0.02, 0.0] * 20)
    measure, timed = _clock(lambda w: 1 - w / 1536 + next(noise) * w / 1536)
    plan, search = plan_for_time(cfg, 0.25, "mlp", measure)
    assert (1536 - plan.neurons) % 64 == 0  # an aligned width
    assert search["slope"] == pytest.approx(4 / 3, abs=0.05)  # the fit sees through the noise
    # the first aligned width whose fitted share reaches 0.25: 1152 kept (384 gone) if the slope is at least 4/3
    assert plan.neurons == next(n for n in range(64, 1536, 64) if search["slope"] * params_removed_share(
        cfg, UnitPlan(neurons=n)) >= 0.25)
    assert plan.neurons in (384, 448)
    assert search["prefill_share_removed_fitted"] >= 0.25
    assert len(timed) == len(set(timed)) == len(search["probes"]) < 12  # a plan is timed once, few are timed
    ws = [p["weights_share_removed"] for p in search["probes"]]
    assert ws == sorted(ws) and sum(4 / 3 * w >= 0.25 for w in ws) >= 2  # timed upwards, until two are past it
    plan, _ = plan_for_time(cfg, 0.25, "mlp", _clock(lambda w: 1 - w / 1536)[0], align=0)
    # unaligned: the first plan of the 0.5%-of-weights grid (10.2 neurons) at or past the quarter of the MLP
    assert 384 <= plan.neurons < 384 + 11


def test_prefill_target_out_of_reach_is_refused_with_what_was_measured():
    measure, _ = _clock(lambda w: 0.3 * (1 - w / 1536))
    with pytest.raises(PrunetuneError, match="removes at most 0.2[89]"):
        plan_for_time(_smollm2_config(), 0.5, "mlp", measure)
    with pytest.raises(PrunetuneError, match="between 0 and 1"):
        plan_for_time(_smollm2_config(), 1.0, "mlp", measure)


def test_prefill_clock_times_a_real_layer():
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = 64, 512
    clock = PrefillClock(cfg, shape=(2, 32), repeats=3)
    assert clock.layer_s > 0 and clock.rest_s >= 0 and clock.pairs >= 3
    m = clock.measure(UnitPlan(neurons=448))
    assert 0 < m["layer_time_vs_dense"] and m["prefill_share_removed"] < 1
    assert clock.measure(UnitPlan(neurons=448)) is m  # a plan is timed once


def test_shrink_to_a_prefill_share_end_to_end(tmp_path, stories_dir, monkeypatch):
    """stories260K (172 neurons per layer): the clock replaced by one linear in the kept width, so the plan is
    known; the report carries the target, the plan file is gone, and a plan file left by a killed run is reused."""
    import prunetune as pt
    from prunetune.structured import api

    def measure(self, plan):
        return {"structure": str(plan), "layer_time_vs_dense": 1 - plan.neurons / 172,
                "prefill_share_removed": 0.8 * plan.neurons / 172}
    monkeypatch.setattr(PrefillClock, "measure", measure)
    out = tmp_path / "out"
    rep = pt.shrink(str(stories_dir), ratio=0.19, out=str(out), structure="mlp", target="prefill",
                    calib="tinystories", nsamples=4, seqlen=32, progress=False)
    t = rep["shrink"]["target"]
    # width 172: kept widths multiples of 64 are 128 and 64; 44 of 172 neurons (128 kept) remove 0.8 * 44 / 172
    assert rep["shrink"]["sizes_after"]["intermediate_size"] == 128
    assert t["kind"] == "prefill" and t["share_asked"] == 0.19
    assert t["prefill_share_removed_fitted"] >= 0.19 and t["prefill_share_removed_measured"] == pytest.approx(
        0.8 * 44 / 172)
    assert json.loads((out / "shrink_report.json").read_text())["shrink"]["target"]["probes"] == t["probes"]
    assert "prefill time removed" in rep["summary_table"]
    assert not list(tmp_path.glob(".out*"))

    def refuse(self, plan):
        raise AssertionError("a saved plan must not be timed again")
    job = api.ShrinkJob(str(stories_dir), 0.2, str(tmp_path / "again"), "mlp", target="prefill")
    src = api.resolve_model(job.model)
    sizer = api._Sizer(job, src, api._config_of(src))
    monkeypatch.setattr(PrefillClock, "measure", measure)
    first = sizer.plan("mlp", None)
    monkeypatch.setattr(PrefillClock, "measure", refuse)
    monkeypatch.setattr(PrefillClock, "__init__", lambda self, *a, **k: None)
    again = api._Sizer(job, src, api._config_of(src)).plan("mlp", None)
    assert again == first and again.target == first.target
    sizer.done()
    assert not list(tmp_path.glob(".again*"))


def test_bad_prefill_targets_fail_cleanly(tmp_path, stories_dir):
    """The CLI's one line for a structure the target does not apply to; the API refuses a ratio out of range and
    an existing output before anything is timed or written beside it."""
    import prunetune as pt

    out = tmp_path / "out"
    p = run_cli("shrink", "--model", stories_dir, "--target", "prefill", "--structure", "hidden", "--ratio", "0.2",
                "--out", out)
    assert_clean_error(p, "applies to --structure mlp")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(PrunetuneError, match="between 0 and 1"):
        pt.shrink(str(stories_dir), ratio=0.0, out=str(out), structure="mlp", target="prefill", progress=False)
    assert not list(tmp_path.iterdir())
    out.mkdir()
    with pytest.raises(PrunetuneError, match="already exists"):
        pt.shrink(str(stories_dir), ratio=0.2, out=str(out), structure="mlp", target="prefill", progress=False)
    assert list(tmp_path.iterdir()) == [out] and not list(out.iterdir())
