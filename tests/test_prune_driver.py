"""The sequential pruning driver end to end: real checkpoints out, exact sparsity, streaming, resume."""

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from prunetune.api import prune
from prunetune.errors import PrunetuneError
from prunetune.io import partial_dir_for
from prunetune.models import get_adapter
from prunetune.pruning.masks import is_nm_valid

from conftest import FAMILIES, assert_clean_error, run_cli, save_tiny

CAL = dict(calib="tinystories", nsamples=8, seqlen=64, device="cpu", progress=False)


def _linears(model):
    """Every pruned matrix as ``(state-dict name, 2-D weight)``: the linears, and each expert of an expert bank."""
    a = get_adapter(model)
    for i, layer in enumerate(a.layers):
        for name, lin in a.linears(layer).items():
            yield f"{a.layer_prefix(i)}{name}.weight", lin.weight.data
        for bank in a.expert_bank_paths:
            for pname in ("gate_up_proj", "down_proj"):
                w = getattr(layer.get_submodule(bank), pname).data
                for e in range(w.shape[0]):
                    yield f"{a.layer_prefix(i)}{bank}.{pname}", w[e]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "apt"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_prune_stories(tmp_path, stories_dir, method, sparsity):
    out = tmp_path / "out"
    rep = prune(stories_dir, method=method, sparsity=sparsity, out=out, **CAL)
    dense = AutoModelForCausalLM.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    n = 0
    for name, W in _linears(model):
        n += 1
        if sparsity == "2:4":
            assert is_nm_valid(W, 2, 4), name
            assert (W == 0).float().mean().item() == 0.5
        elif method == "magnitude":  # matrix scope: exact over the matrix
            assert (W == 0).sum().item() == round(0.5 * W.numel()), name
        elif method == "wanda":  # per output row
            assert ((W == 0).sum(1) == round(0.5 * W.shape[1])).all(), name
        else:  # SparseGPT's block-wide threshold (APT keeps its mask): the share of each block, plus its threshold
            extra = (W == 0).sum().item() - round(0.5 * W.numel())
            assert 0 <= extra <= 2 * -(-W.shape[1] // 128), (name, extra)
    assert n == 35
    # embeddings and LM head stay dense and untouched; tied embeddings stay tied
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.norm.weight, dense.model.norm.weight)
    on_disk = json.loads((out / "prune_report.json").read_text())
    man = on_disk["manifest"]
    for key in ("method", "sparsity", "sparsity_semantics", "calibration", "versions", "wall_time_s", "peak_rss_mb"):
        assert key in man, key
    assert man["calibration"]["nsamples"] == 8 and man["calibration"]["seed"] == 0
    assert len(on_disk["layers"]) == 35 and all(l["rel_error"] >= 0 for l in on_disk["layers"])
    assert (out / "prunetune_manifest.json").is_file() and not partial_dir_for(out).exists()
    total = rep["total"]["sparsity_of_pruned_matrices"]
    if sparsity == "0.5" and method in ("sparsegpt", "apt"):  # the block thresholds' few extra zeros
        assert 0.5 <= total < 0.5 + 1e-3
    else:
        assert abs(total - 0.5) < 1e-9


def test_apt_beats_sparsegpt_on_first_layer(tmp_path, stories_dir):
    """Same inputs (layer 0, first group) -> APT's layer error is never above SparseGPT's."""
    errs = {}
    for m in ("sparsegpt", "apt"):
        rep = prune(stories_dir, method=m, sparsity="2:4", out=tmp_path / m, **CAL)
        errs[m] = {l["name"]: l["error"] for l in rep["layers"]}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        assert errs["apt"][name] <= errs["sparsegpt"][name] * (1 + 1e-5), name


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_every_family(tmp_path, family):
    src = save_tiny(family, tmp_path / "src")
    out = tmp_path / "out"
    prune(src, method="sparsegpt", sparsity="0.5", out=out, **CAL)
    dense = AutoModelForCausalLM.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, W in _linears(model):  # SparseGPT's block-wide threshold: the share of each block, plus its threshold
        extra = (W == 0).sum().item() - round(0.5 * W.numel())
        assert 0 <= extra <= 2 * -(-W.shape[1] // 128), (name, extra)
    # everything that is not a pruned linear is unchanged (Mamba: conv and SSM parameters; MoE: the router)
    pruned = {n for n, _ in _linears(model)}
    dsd = dense.state_dict()
    for k, v in model.state_dict().items():
        if k not in pruned:
            assert torch.equal(v, dsd[k]), k
    ids = torch.randint(0, 128, (1, 16))
    assert torch.isfinite(model(ids).logits).all()


def test_streaming_equals_in_memory(tmp_path, stories_dir):
    prune(stories_dir, method="wanda", sparsity="0.5", out=tmp_path / "s", stream=True, **CAL)
    prune(stories_dir, method="wanda", sparsity="0.5", out=tmp_path / "m", stream=False, **CAL)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_half_precision_model_runs_its_layers_in_float32_on_cpu(tmp_path, stories_dir):
    """A bfloat16 model pruned on CPU: each layer runs in float32 (``compute_dtype="auto"``), the checkpoint stays
    bfloat16 with the exact N:M pattern, and layer 0's q/k/v (inputs identical to a float32 run of the same
    bf16-valued model) are that run's weights rounded to bfloat16. Forcing bfloat16 compute is recorded too."""
    rep = prune(stories_dir, method="sparsegpt", sparsity="2:4", out=tmp_path / "h", dtype="bfloat16", **CAL)
    assert rep["manifest"]["dtype"] == "bfloat16" and rep["manifest"]["compute_dtype"] == "float32"
    ref_dir = tmp_path / "f32src"
    AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.bfloat16).float().save_pretrained(ref_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (stories_dir / f).is_file():
            shutil.copy(stories_dir / f, ref_dir / f)
    prune(ref_dir, method="sparsegpt", sparsity="2:4", out=tmp_path / "f", **CAL)
    h = AutoModelForCausalLM.from_pretrained(tmp_path / "h", dtype=torch.bfloat16)
    f = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    assert h.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    for name in ("q_proj", "k_proj", "v_proj"):
        wh = getattr(h.model.layers[0].self_attn, name).weight
        wf = getattr(f.model.layers[0].self_attn, name).weight
        assert torch.equal(wh, wf.to(torch.bfloat16)), name
    for _, W in _linears(h):
        assert is_nm_valid(W.float(), 2, 4)
    rep = prune(stories_dir, method="wanda", sparsity="0.5", out=tmp_path / "b", dtype="bfloat16",
                compute_dtype="bfloat16", **CAL)
    assert rep["manifest"]["compute_dtype"] == "bfloat16"


def test_owl_nonuniform(tmp_path, stories_dir):
    rep = prune(stories_dir, method="wanda", sparsity="0.5", out=tmp_path / "o", owl=True, owl_lambda=0.08, **CAL)
    per_layer = {}
    for l in rep["layers"]:
        per_layer.setdefault(l["name"].split(".")[2], l["sparsity_target"])
    vals = list(per_layer.values())
    assert len(set(round(v, 6) for v in vals)) > 1  # non-uniform
    assert abs(sum(vals) / len(vals) - 0.5) < 1e-6  # mean layer sparsity is the target
    assert max(vals) - min(vals) <= 2 * 0.08 + 1e-9


def test_damp_is_the_methods_own_unless_given(tmp_path, stories_dir):
    """APT's solves are dampened more than SparseGPT's by default (a ridge that keeps its refit from fitting the
    calibration text alone); the report records the value used, and ``damp`` overrides it."""
    from prunetune.pruning.methods import get_method
    from prunetune.pruning.methods.apt import APT_DAMP

    assert get_method("sparsegpt").damp == 0.01 and get_method("apt").damp == APT_DAMP > 0.01
    opts = {"select": "sparsegpt"}
    rep = prune(stories_dir, method="apt", sparsity="0.5", out=tmp_path / "a", method_opts=opts, **CAL)
    assert rep["manifest"]["damp"] == APT_DAMP
    rep = prune(stories_dir, method="apt", sparsity="0.5", out=tmp_path / "b", method_opts=opts, damp=0.02, **CAL)
    assert rep["manifest"]["damp"] == 0.02
    rep = prune(stories_dir, method="sparsegpt", sparsity="0.5", out=tmp_path / "c", **CAL)
    assert rep["manifest"]["damp"] == 0.01


def test_sigkill_and_resume_identical(tmp_path, stories_dir):
    args = ["prune", "--model", stories_dir, "--method", "sparsegpt", "--sparsity", "2:4", "--calib", "tinystories",
            "--nsamples", "8", "--seqlen", "64", "--device", "cpu"]
    ref = run_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    p = run_cli(*args, "--out", out, kill_at=("layer", 3))
    assert p.returncode == -signal.SIGKILL
    assert not out.exists() and (partial_dir_for(out) / "resume" / "journal.json").is_file()
    r = run_cli(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(next((tmp_path / "ref").glob("model-layer-00004.safetensors")))
    for f in (tmp_path / "ref").glob("model-*.safetensors"):
        x, y = load_file(f), load_file(out / f.name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name
    man = json.loads((out / "prune_report.json").read_text())["manifest"]
    assert man["resumed_from_layer"] == 3
    # the killed part's time and peak memory up to its last finished layer are in the final report
    (part,) = man["earlier_parts"]
    assert (part["from_layer"], part["to_layer"]) == (0, 2) and part["peak_rss_mb"] > 0 and part["wall_time_s"] > 0
    # and every layer's own wall time, the killed part's three from the journal
    assert len(man["layer_wall_time_s"]) == 5 and all(t >= 0 for t in man["layer_wall_time_s"])
    assert not partial_dir_for(out).exists()


def _bad(tmp_path, *extra):
    return run_cli("prune", "--calib", "tinystories", "--nsamples", "2", "--seqlen", "32", "--device", "cpu", *extra)


def test_bad_inputs(tmp_path, stories_dir):
    out = tmp_path / "o"
    base = ("--method", "wanda")
    assert_clean_error(_bad(tmp_path, "--method", "foo", "--sparsity", "0.5", "--out", out), "unknown method 'foo'")
    for sp in ("1.0", "-0.1", "3:2", "2:0", "a:b"):
        assert_clean_error(_bad(tmp_path, *base, "--sparsity", sp, "--out", out), sp)
    assert_clean_error(_bad(tmp_path, *base, "--sparsity", "4:8", "--out", out), "model.layers.0.mlp.down_proj")
    out.mkdir()
    assert_clean_error(_bad(tmp_path, *base, "--sparsity", "0.5", "--out", out), "already exists")
    out.rmdir()
    assert_clean_error(_bad(tmp_path, *base, "--sparsity", "0.5", "--model", stories_dir, "--out", stories_dir / "x"),
                       "inside the input")
    assert_clean_error(_bad(tmp_path, *base, "--sparsity", "0.5", "--out", out, "--resume"), "nothing to resume")
    # NaN in one weight
    bad = tmp_path / "nanmodel"
    shutil.copytree(stories_dir, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    assert_clean_error(_bad(tmp_path, *base, "--sparsity", "0.5", "--model", bad, "--out", out),
                       "model.layers.1.mlp.up_proj", "NaN")
    assert not out.exists() and not partial_dir_for(out).exists()


def test_moe_experts_pruned_with_their_routed_tokens_and_reported(tmp_path):
    """Every expert of every layer is pruned (its own Hessian), the router stays dense; the report says how many
    calibration tokens reached each expert and how far its statistics were dampened towards the identity."""
    src = save_tiny("mixtral", tmp_path / "src")
    rep = prune(src, method="sparsegpt", sparsity="2:4", out=tmp_path / "out", **CAL)
    experts = [r for r in rep["layers"] if "experts" in r["name"]]
    assert len(experts) == 2 * 2 * 4  # 2 layers x (gate_up, down) x 4 experts
    tokens = {r["name"].split("[")[-1] for r in experts}
    assert tokens == {"0]", "1]", "2]", "3]"}
    # top-2 of 4 experts: every token reaches two of them
    for layer in (0, 1):
        up = [r for r in experts if f"layers.{layer}." in r["name"] and "gate_up" in r["name"]]
        assert sum(r["routed_tokens"] for r in up) == 2 * CAL["nsamples"] * CAL["seqlen"]
        assert all(0 <= r["own_data_weight"] < 1 for r in up)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    dense = AutoModelForCausalLM.from_pretrained(src)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, dense.model.layers[0].mlp.gate.weight)
    assert is_nm_valid(model.model.layers[1].mlp.experts.down_proj[3], 2, 4)


def test_an_expert_without_tokens_is_pruned_as_by_magnitude():
    from prunetune.pruning.experts import blend_toward_identity
    from prunetune.pruning.methods import get_method
    from prunetune.pruning.masks import parse_sparsity
    from prunetune.pruning.sequential import InputStats

    g = torch.Generator().manual_seed(0)
    busy, idle = InputStats(16, "cpu", "hessian", 64), InputStats(16, "cpu", "hessian", 64)
    busy.add(torch.randn(64, 16, generator=g))
    w = blend_toward_identity([busy, idle])
    assert w[1] == 0.0 and w[0] == pytest.approx(64 / 80)
    assert torch.allclose(idle.H, idle.H[0, 0] * torch.eye(16, dtype=idle.H.dtype))
    W = torch.randn(8, 16, generator=g)
    spec = parse_sparsity("0.5")
    magnitude, sparsegpt = get_method("magnitude").fn, get_method("sparsegpt").fn
    by_row = sparsegpt(W, idle.for_method(), spec, mask_scope="row")
    assert torch.equal(by_row != 0, magnitude(W, None, spec, scope="row") != 0)
    # the reference's block threshold (one 128-column block covers all 16 columns) prunes every score up to and
    # including the one at position k: magnitude's k smallest plus the next one
    by_block = sparsegpt(W, idle.for_method(), spec, mask_scope="block") == 0
    by_magnitude = magnitude(W, None, spec, scope="matrix") == 0
    assert torch.equal(by_block & by_magnitude, by_magnitude) and by_block.sum() == by_magnitude.sum() + 1


def test_activations_on_disk_give_the_same_model_and_bad_budgets_are_refused(tmp_path, stories_dir, monkeypatch):
    """--cache-budget 0 reads every batch back from the working folder's files: the same weights as in RAM."""
    prune(stories_dir, method="sparsegpt", sparsity="0.5", out=tmp_path / "ram", **CAL)
    rep = prune(stories_dir, method="sparsegpt", sparsity="0.5", out=tmp_path / "disk", cache_budget=0, **CAL)
    assert rep["activation_cache"]["in_ram"] is False
    for f in (tmp_path / "ram").glob("model-*.safetensors"):
        a, b = load_file(f), load_file(tmp_path / "disk" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    # one batch of 8 x 64 x 64 float32 values is 0.125 MB
    with pytest.raises(PrunetuneError, match=r"below one calibration batch \(0\.1 MB\)"):
        prune(stories_dir, method="wanda", sparsity="0.5", out=tmp_path / "x", cache_budget=0.01, **CAL)
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(PrunetuneError, match="not enough disk space for the activation cache.*needs 0 MB"):
        prune(stories_dir, method="wanda", sparsity="0.5", out=tmp_path / "y", **CAL)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.glob(".x*")) and not list(tmp_path.glob(".y*"))


def test_a_layer_runs_in_the_compute_dtype_and_every_tensor_returns_to_its_own():
    """Layers that keep some tensors in float32 next to bfloat16 weights get each one back in its own dtype."""
    from prunetune.pruning.sequential import _RunsIn

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.LayerNorm(4))
    layer.register_buffer("scale", torch.ones(4, dtype=torch.bfloat16))
    before = {n: t.clone() for n, t in list(layer.named_parameters()) + list(layer.named_buffers())}
    with _RunsIn(layer, torch.float32) as dtype:
        assert dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in layer.parameters())
    after = dict(list(layer.named_parameters()) + list(layer.named_buffers()))
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
    with _RunsIn(layer.float(), torch.float32) as dtype:  # already float32: nothing to do
        assert dtype is None
