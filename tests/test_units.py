"""Whole MLP neurons and heads removed with the exact reader refit: the algebra (float64), the shrunk model
equal to the masked one, plain loading, resume, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_clean_error, float_tol, run_cli, save_tiny, weights
from prunetune.errors import PrunetuneError
from prunetune.pruning.hessian import prepare_hessian
from prunetune.structured.units import refit, removal_error, select_units


def _problem(out=12, m=30, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.rand(m, 1, generator=g, dtype=torch.float64) * 3
    X[4] = 0.8 * X[2] + 0.2 * X[4]  # correlated inputs: the refit has something to do
    H = 2 * X @ X.T / n
    W = torch.randn(out, m, generator=g, dtype=torch.float64)
    return W, H, X


def _hinv(W, H, damp):
    return torch.cholesky_inverse(prepare_hessian(H, W, damp, dtype=torch.float64).L)


def test_refit_is_the_least_squares_optimum_and_its_error_is_closed_form():
    W, H, X = _problem()
    S = torch.tensor([1, 4, 9, 17])
    keep = torch.tensor([j for j in range(W.shape[1]) if j not in S.tolist()])
    Wn, err, rel = refit(W, H, keep, damp=0.0)
    # normal equations: the residual is orthogonal to every kept input
    D = W.clone()
    D[:, keep] -= Wn
    grad = D @ H[:, keep]
    assert grad.abs().max() < 1e-9 * H.abs().max() * W.abs().max() * W.shape[1]
    # the error equals tr(W_S [(H^-1)_SS]^-1 W_S^T) and the relative error is against tr(W H W^T)
    assert err == pytest.approx(removal_error(W, _hinv(W, H, 0.0), S), rel=1e-9)
    assert rel == pytest.approx(err / float((W @ H * W).sum()), rel=1e-12)
    # and is below plain slicing (the same columns removed, no refit)
    plain = W[:, S] @ H[S][:, S] @ W[:, S].T
    assert err < float(plain.trace())


def test_selection_orders_of_quality():
    W, H, _ = _problem(seed=1)
    groups = [torch.tensor([j]) for j in range(W.shape[1])]
    Hinv = _hinv(W, H, 0.01)
    E = {}
    for sel in ("magnitude", "obs", "swap"):
        S = select_units(W, H, groups, 10, select=sel, damp=0.01)
        assert len(S) == 10 and len(set(S)) == 10
        E[sel] = removal_error(W, Hinv, torch.tensor(S))
    assert E["swap"] <= E["obs"] * (1 + 1e-12)  # the search only accepts exchanges that lower the exact error
    # one unit: the greedy choice is the exhaustive optimum
    one = select_units(W, H, groups, 1, select="obs", damp=0.01)[0]
    costs = [removal_error(W, Hinv, torch.tensor([j])) for j in range(W.shape[1])]
    assert one == min(range(len(costs)), key=costs.__getitem__)


def test_obs_downdates_match_a_fresh_inverse():
    """Greedy OBS removing in blocks equals its own definition: each block is the cheapest given the rest."""
    W, H, _ = _problem(seed=2)
    groups = [torch.tensor([j]) for j in range(W.shape[1])]
    S = select_units(W, H, groups, 2, select="obs", damp=0.01)
    Hinv = _hinv(W, H, 0.01)
    first = min(range(W.shape[1]), key=lambda j: removal_error(W, Hinv, torch.tensor([j])))
    second = min((j for j in range(W.shape[1]) if j != first),
                 key=lambda j: removal_error(W, Hinv, torch.tensor([first, j])))
    assert sorted([first, second]) == S


def test_head_selection_keeps_gqa_uniform():
    W, H, _ = _problem(m=32, seed=3)
    groups = [torch.arange(i * 4, (i + 1) * 4) for i in range(8)]
    group_of = torch.arange(8) // 4
    for sel in ("magnitude", "obs", "swap"):
        S = select_units(W, H, groups, 4, select=sel, capacity=torch.tensor([2, 2]), group_of=group_of)
        assert sum(1 for s in S if s < 4) == 2 and sum(1 for s in S if s >= 4) == 2
    with pytest.raises(PrunetuneError):
        select_units(W, H, groups, 8, select="obs")


def _masked(orig: dict, small: dict, report: dict, cfg) -> dict:
    """The input model with the removed units switched off and each reader's refit scattered back in."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    sd = {k: v.clone() for k, v in orig.items()}
    for r in report["readers"]:
        name = r["name"]
        prefix = name.rsplit(".", 2)[0]
        kept = torch.tensor(r["kept_units"])
        W = torch.zeros_like(sd[name + ".weight"])
        if name.endswith("down_proj"):
            W[:, kept] = small[name + ".weight"]
            for p in ("gate_proj", "up_proj"):
                rows = torch.ones(W.shape[1], dtype=torch.bool)
                rows[kept] = False
                sd[f"{prefix}.mlp.{p}.weight"][rows] = 0.0
        else:
            cols = (kept[:, None] * hd + torch.arange(hd)).flatten()
            W[:, cols] = small[name + ".weight"]
        sd[name + ".weight"] = W
    return sd


@pytest.mark.parametrize("family,structure,ratio", [("llama", "mlp", 0.25), ("llama", "heads", 0.25),
                                                    ("llama", "mlp+heads", 0.3), ("gemma3_text", "mlp+heads", 0.3),
                                                    ("gemma2", "mlp+heads", 0.3), ("granite", "mlp+heads", 0.3)])
def test_shrunk_model_equals_masked_model_and_loads_plainly(tmp_path, family, structure, ratio):
    """Also for families found from the module tree and laid out like Llama (Gemma-2/3: sandwich norms, a
    per-head q/k norm, alternating sliding-window attention)."""
    from transformers import AutoModelForCausalLM

    import prunetune as pt

    src = save_tiny(family, tmp_path / "src")
    out = tmp_path / "out"
    rep = pt.shrink(str(src), ratio=ratio, out=str(out), structure=structure, calib="tinystories", nsamples=8,
                    seqlen=64, progress=False)
    small = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no custom code
    cfg = small.config
    s = rep["shrink"]["sizes_after"]
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"])
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert sum(p.numel() for p in small.parameters()) == rep["parameters"]["after"] < rep["parameters"]["before"]
    if structure != "heads":
        assert cfg.intermediate_size < 64
    if structure != "mlp":
        assert cfg.num_attention_heads < 4
    share = rep["shrink"]["decoder_linear_weights_removed_share"]
    assert abs(share - ratio) < 0.12  # the nearest feasible plan
    full = AutoModelForCausalLM.from_pretrained(src).eval()
    masked = _masked(weights(src), weights(out), rep, full.config)
    full.load_state_dict(masked, strict=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(ids).logits, small(ids).logits
    assert torch.allclose(a, b, rtol=0, atol=float_tol(a, 4096)), float((a - b).abs().max())
    man = json.loads((out / "shrink_report.json").read_text())["manifest"]
    assert man["command"] == "shrink" and man["units"]["structure"] == rep["shrink"]["structure"]


def test_refit_lowers_the_end_to_end_loss_against_plain_slicing(tmp_path, stories_dir):
    import prunetune as pt
    from prunetune.evaluation.perplexity import perplexity
    from prunetune.io import load_model

    out_obs = tmp_path / "obs"
    pt.shrink(str(stories_dir), ratio=0.25, out=str(out_obs), structure="mlp", calib="tinystories", nsamples=16,
              seqlen=256, progress=False)
    m, tok, _ = load_model(str(out_obs))
    ppl_refit = perplexity(m, tok, "tinystories", seqlen=256, max_windows=8, progress=False)["ppl"]
    out_mag = tmp_path / "mag"
    pt.shrink(str(stories_dir), ratio=0.25, out=str(out_mag), structure="mlp", select="magnitude",
              calib="tinystories", nsamples=16, seqlen=256, progress=False)
    m2, _, _ = load_model(str(out_mag))
    ppl_mag = perplexity(m2, tok, "tinystories", seqlen=256, max_windows=8, progress=False)["ppl"]
    dense, _, _ = load_model(str(stories_dir))
    ppl_dense = perplexity(dense, tok, "tinystories", seqlen=256, max_windows=8, progress=False)["ppl"]
    assert ppl_dense < ppl_refit < ppl_mag


def test_units_sigkill_and_resume_identical(tmp_path, stories_dir):
    args = ["shrink", "--model", stories_dir, "--structure", "mlp+heads", "--ratio", "0.2", "--calib", "tinystories",
            "--nsamples", "8", "--seqlen", "64"]
    ref = tmp_path / "ref"
    assert run_cli(*args, "--out", ref).returncode == 0
    out = tmp_path / "out"
    p = run_cli(*args, "--out", out, kill_at=("layer", 2))
    assert p.returncode != 0 and not out.exists()
    r = run_cli(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,needle", [
    (["--ratio", "0"], "between 0 and 1"),
    (["--ratio", "1"], "between 0 and 1"),
    (["--ratio", "0.99", "--structure", "mlp"], "cannot remove"),
    (["--ratio", "0.2", "--structure", "mlp", "--damp", "-1"], "--damp"),
])
def test_bad_unit_targets_fail_cleanly(tmp_path, stories_dir, extra, needle):
    out = tmp_path / "out"
    args = ["shrink", "--model", stories_dir, "--calib", "tinystories", "--nsamples", "4", "--seqlen", "32",
            "--out", out]
    if "--structure" not in extra:
        extra = extra + ["--structure", "mlp"]
    assert_clean_error(run_cli(*args, *extra), needle)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_family_is_refused_before_loading(tmp_path):
    src = save_tiny("opt", tmp_path / "opt")
    out = tmp_path / "out"
    p = run_cli("shrink", "--model", src, "--structure", "mlp", "--ratio", "0.25", "--calib", "tinystories",
                "--nsamples", "4", "--seqlen", "32", "--out", out)
    assert_clean_error(p, "not supported", "opt")
    assert not out.exists()


def test_config_that_cannot_express_the_heads_is_refused(tmp_path):
    from prunetune.structured.neurons import UnitPlan, check_plan
    from conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim = 42, 6, 8  # 6 query heads in 2 KV groups of 3
    check_plan(cfg, UnitPlan(kv_heads=1))  # 3 heads divide 42
    with pytest.raises(PrunetuneError, match="cannot express"):  # 4 heads do not: Llama's config refuses
        check_plan(cfg, UnitPlan(q_heads=1))
    with pytest.raises(PrunetuneError, match="GQA"):
        check_plan(cfg, UnitPlan(q_heads=3))
    with pytest.raises(PrunetuneError, match="KV heads"):
        check_plan(cfg, UnitPlan(kv_heads=2))


def test_plans_for_smollm2_geometry():
    """SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 query / 3 KV heads of 64): the plans the benchmarks use."""
    import transformers as T

    from prunetune.structured.neurons import new_config, params_removed_share, plan_for_ratio

    cfg = T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                        num_hidden_layers=30, vocab_size=49152, head_dim=64)
    mlp = plan_for_ratio(cfg, 0.25, "mlp")
    assert (mlp.neurons, mlp.kv_heads, mlp.q_heads) == (512, 0, 0)  # a third of the MLP is a quarter of a layer
    assert params_removed_share(cfg, mlp) == pytest.approx(0.25)
    # kept widths rounded to a multiple of 8 (1126 -> 1128 at 20%, 860 -> 864 at 33%: 11-12% faster prefill)
    assert [plan_for_ratio(cfg, r, "mlp").neurons for r in (0.2, 0.33, 0.5)] == [408, 672, 1024]
    odd = T.LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=8, num_key_value_heads=4,
                        num_hidden_layers=5, vocab_size=512)
    assert plan_for_ratio(odd, 0.25, "mlp").neurons == 59  # the model's own width is not aligned: as asked
    mixed = plan_for_ratio(cfg, 0.25, "mlp+heads", head_share=0.25)
    assert (mixed.q_heads, mixed.kv_heads) == (1, 0)  # one query head of every group: 9 -> 6 heads, 3 KV
    assert params_removed_share(cfg, mixed) == pytest.approx(0.25, abs=0.002)
    small = new_config(cfg, mixed)
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (6, 3, 64)
    with pytest.raises(PrunetuneError, match="between 0 and 1"):
        plan_for_ratio(cfg, 1.0, "mlp")
    with pytest.raises(PrunetuneError, match="unknown structure"):
        plan_for_ratio(cfg, 0.25, "experts")


def test_auto_keeps_the_mix_with_the_lowest_held_out_loss(tmp_path, stories_dir):
    import prunetune as pt

    out = tmp_path / "out"
    rep = pt.shrink(str(stories_dir), ratio=0.25, out=str(out), structure="auto", calib="tinystories", nsamples=8,
                    seqlen=64, progress=False)
    cut = rep["where_to_cut"]
    alts = cut["alternatives"]
    assert len(alts) >= 2 and len({a["structure"] for a in alts}) == len(alts)
    best = min(alts, key=lambda a: a["held_out_loss"])
    assert cut["chosen"] == best["structure"] == rep["shrink"]["structure"]
    assert all(abs(a["decoder_linear_weights_removed_share"] - 0.25) < 0.05 for a in alts)
    on_disk = json.loads((out / "shrink_report.json").read_text())
    assert on_disk["where_to_cut"]["chosen"] == cut["chosen"]
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".out*"))


def test_unit_shrink_calibrates_on_windows_of_the_served_length_by_default():
    from prunetune.structured.api import calib_size

    assert calib_size("mlp", None, None) == (256, 512)
    assert calib_size("mlp+heads", None, None) == calib_size("auto", None, None) == (256, 512)
    assert calib_size("hidden", None, None) == (128, 2048)
    assert calib_size("mlp", 32, None) == (32, 512) and calib_size("hidden", None, 256) == (128, 256)
