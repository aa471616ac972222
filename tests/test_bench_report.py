"""bench (speed, memory, size, sparsity; interleaved, with a manifest) and report (Markdown + PNG plots)."""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from prunetune.errors import PrunetuneError
from prunetune.evaluation import semi_structured, speed
from prunetune.evaluation.report import report
from prunetune.evaluation.speed import bench
from prunetune.manifest import sha256_file
from prunetune.paths import DEFAULT_MODEL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared: one thread keeps these small runs from oversubscribing the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _save_pruned(out, pattern: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for _, lin in model.named_modules():
            if not isinstance(lin, torch.nn.Linear) or lin is head:
                continue
            w = lin.weight
            if pattern == "50%":  # the smallest half of every row
                k = w.shape[1] // 2
                idx = w.abs().argsort(dim=1)[:, :k]
                w.scatter_(1, idx, 0.0)
            else:  # 2:4: the two smallest of every 4 consecutive input weights
                g = w.view(w.shape[0], -1, 4)
                idx = g.abs().argsort(dim=-1)[..., :2]
                g.scatter_(-1, idx, 0.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pruned50(tmp_path_factory):
    return _save_pruned(tmp_path_factory.mktemp("pruned") / "stories-mag50", "50%")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, pruned50):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    res = bench([str(DEFAULT_MODEL), str(pruned50)], batch_sizes=(1, 2), seq_lens=(32,), repeats=2, warmup=1,
                decode_tokens=4, out=out, progress=False, threads=1)
    return res, out


def test_bench_cells_ratios_and_manifest(bench_run, pruned50):
    res, out = bench_run
    dense, pruned = str(DEFAULT_MODEL), str(pruned50)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))

    prefill = {(r["model"], r["batch_size"], r["seq_len"]): r for r in res["prefill"]}
    assert set(prefill) == {(m, b, 32) for m in (dense, pruned) for b in (1, 2)}
    decode = {(r["model"], r["batch_size"]): r for r in res["decode"]}
    assert set(decode) == {(m, b) for m in (dense, pruned) for b in (1, 2)}
    for key, r in prefill.items():
        lat, tps = r["latency_s"], r["tokens_per_s"]
        assert lat["n"] == 2 and len(lat["values"]) == 2 and tps["n"] == 2
        assert 0 < lat["min"] <= lat["median"] <= lat["max"]
        assert tps["values"] == pytest.approx([key[1] * 32 / t for t in lat["values"]])
        first = prefill[(dense, key[1], 32)]
        expect = statistics.median(tps["values"]) / statistics.median(first["tokens_per_s"]["values"])
        assert r["ratio_to_first"]["tokens_per_s"] == pytest.approx(expect)
    for key, r in decode.items():
        assert r["new_tokens"] == 4 and r["prompt_len"] == 32 and r["tokens_per_s"]["median"] > 0
        assert r["ttft_s"]["n"] == 2
        assert r["tokens_per_s"]["values"] == pytest.approx([key[1] * 3 / t for t in r["decode_s"]["values"]])
    for r in [prefill[(dense, b, 32)] for b in (1, 2)] + [decode[(dense, b)] for b in (1, 2)]:
        assert r["ratio_to_first"] == {"tokens_per_s": 1.0, "latency_s": 1.0}

    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).parameters())
    models = {m["model"]: m for m in res["models"]}
    assert list(models) == [dense, pruned]
    for m in models.values():
        assert m["parameters"] == n_params
        assert m["linears"] == 35  # 5 layers x (q, k, v, o, gate, up, down); the tied LM head is left out
        assert m["memory"]["peak_mb"] is not None and m["memory"]["peak_mb"] > 0, m["memory"]
        assert m["memory"]["weights_mb"] == pytest.approx(n_params * 4 / 2**20, rel=0.05)
    assert models[dense]["size_on_disk_bytes"] == os.path.getsize(DEFAULT_MODEL / "model.safetensors")
    assert models[pruned]["size_on_disk_bytes"] == os.path.getsize(pruned50 / "model.safetensors")
    assert models[dense]["linear_sparsity"] < 0.01
    assert models[pruned]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert models[dense]["ratio_to_first"]["parameters"] == 1.0
    assert models[pruned]["ratio_to_first"]["parameters"] == 1.0

    man = res["manifest"]
    assert man["tool"] == "prunetune" and man["command"] == "bench"
    assert man["torch_threads"] == 1 and man["device"] == "cpu" and man["device_name"]
    hashes = {m["spec"]: m["weights_sha256"] for m in man["models"]}
    assert hashes[pruned]["model.safetensors"] == sha256_file(pruned50 / "model.safetensors")
    prot = man["protocol"]
    assert prot["batch_sizes"] == [1, 2] and prot["seq_lens"] == [32] and prot["repeats"] == 2
    assert prot["warmup"] == 1 and prot["dtype"] == "float32" and prot["decode_tokens"] == 4
    for key in ("versions", "machine", "wall_time_s", "peak_rss_mb"):
        assert key in man
    assert torch.get_num_threads() == 1  # restored after the run


def test_bench_bad_devices_and_inputs(tmp_path):
    with pytest.raises(PrunetuneError, match="semi-structured sparse kernels need a CUDA GPU"):
        bench([str(DEFAULT_MODEL)], device="cpu", sparse_2to4=True)
    with pytest.raises(PrunetuneError, match="does not exist"):
        bench([str(tmp_path / "missing")], device="cpu")
    with pytest.raises(PrunetuneError, match="at least 1"):
        bench([str(DEFAULT_MODEL)], batch_sizes=(0,), device="cpu")
    with pytest.raises(PrunetuneError, match="allows 512 positions"):
        bench([str(DEFAULT_MODEL)], seq_lens=(1024,), device="cpu", progress=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(PrunetuneError, match="no CUDA GPU"):
        bench([str(DEFAULT_MODEL)], device="cuda")


def test_sparse_2to4_bookkeeping(tmp_path, monkeypatch):
    """The comparison logic of --sparse-2to4, with the CUDA kernel swapped for a dense copy scaled by 1 + 2⁻⁴, so it
    runs here and the per-linear check must see the difference."""
    model_dir = _save_pruned(tmp_path / "stories-2of4", "2:4")
    monkeypatch.setattr(semi_structured, "check_sparse_support", lambda device, dtype: None)
    monkeypatch.setattr(semi_structured, "to_semi_structured", lambda w: (w * (1 + 2 ** -4)).detach())
    res = bench([str(model_dir)], batch_sizes=(1,), seq_lens=(16,), repeats=1, warmup=0, decode_tokens=2,
                dtype="bfloat16", device="cpu", sparse_2to4=True, progress=False, memory_probe=False, threads=1)
    label = str(model_dir)
    variant = f"{label} [{speed.SPARSE_LABEL}]"
    assert [m["model"] for m in res["models"]] == [label, variant]
    assert res["models"][0]["linears_2to4"] == 35
    rec = res["sparse_2to4"]["models"][label]
    assert rec["converted"] == 35 and rec["not_converted"] == {}
    cells = {(x["kind"], x["batch_size"]) for x in rec["end_to_end"]}
    assert cells == {("prefill", 1), ("decode", 1)}
    for x in rec["end_to_end"]:
        assert x["speedup"] == pytest.approx(x["dense_s"] / x["sparse_s"])
        assert x["verdict"] == ("faster" if x["speedup"] > 1 else "slower")
    shapes = {tuple(x["shape"]) for x in rec["per_linear"]}
    assert shapes == {(64, 64), (32, 64), (172, 64), (64, 172)}
    for x in rec["per_linear"]:
        assert x["max_rel_diff"] == pytest.approx(2 ** -4, rel=0.1) and x["speedup"] > 0


# --- report ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_and_prune(tmp_path_factory):
    from prunetune.api import evaluate
    from prunetune.pruning.api import prune

    d = tmp_path_factory.mktemp("results")
    ev = evaluate(str(DEFAULT_MODEL), ppl=["tinystories"], seqlen=128, max_windows=2, device="cpu",
                  out=d / "eval_dense.json", progress=False)
    rep = prune(str(DEFAULT_MODEL), method="magnitude", sparsity=0.5, out=d / "pruned", calib="tinystories",
                nsamples=4, seqlen=64, eval_corpora=["tinystories"], eval_seqlen=128, eval_max_windows=2,
                device="cpu", progress=False)
    return d, ev, rep


def test_report_tables_and_plots(tmp_path, eval_and_prune, bench_run):
    d, ev, rep = eval_and_prune
    bench_res, bench_path = bench_run
    # the same eval with a zero-shot block in the shape evaluate() writes
    zs = dict(json.loads((d / "eval_dense.json").read_text()))
    zs["zeroshot"] = {"tasks": {"arc_easy": {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": 0.3125, "acc_norm_stderr": 0.1, "n": 16,
                                             "correct": "1111" + "0" * 12},
                                "piqa": {"acc": 0.5625, "acc_stderr": 0.1, "acc_norm": 0.5, "acc_norm_stderr": 0.1, "n": 16,
                                         "correct": "1" * 9 + "0" * 7}},
                      "average": {"acc": 0.40625, "acc_norm": 0.40625}, "average_metric": "acc", "protocol": {}}
    (tmp_path / "eval_zs.json").write_text(json.dumps(zs))
    # a second model on the same documents: the same arc_easy score on other documents, piqa all wrong
    other = json.loads(json.dumps(zs))
    other["manifest"]["model"]["spec"] = "other-model"
    other["zeroshot"]["tasks"]["arc_easy"]["correct"] = "01111" + "0" * 11
    other["zeroshot"]["tasks"]["piqa"].update(acc=0.0, correct="0" * 16)
    (tmp_path / "eval_zs_other.json").write_text(json.dumps(other))

    out = tmp_path / "rep"
    res = report([str(d / "eval_dense.json"), str(d / "pruned"), str(bench_path), str(tmp_path / "eval_zs.json"),
                  str(tmp_path / "eval_zs_other.json")], out_dir=out)
    md = (out / "report.md").read_text()
    assert res["report"] == str(out / "report.md")
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in res["written"])  # no temp files left

    dense = ev["perplexity"]["tinystories"]["ppl"]
    before = rep["eval"]["before"]["tinystories"]["ppl"]
    after = rep["eval"]["after"]["tinystories"]["ppl"]
    assert before == pytest.approx(dense)  # same protocol: one dense row
    lines = md.splitlines()
    dense_rows = [l for l in lines if l.startswith("| stories260K | dense | dense |")]
    assert len(dense_rows) == 1 and f"| {dense:.3f} | 1.000 |" in dense_rows[0]
    pruned_row = next(l for l in lines if l.startswith("| stories260K | magnitude | 0.5 |"))
    assert f"| {after:.3f} | {after / before:.3f} |" in pruned_row
    assert any(l.startswith("| stories260K | magnitude | 0.5 | 0.5000 |") for l in lines)  # the pruning-runs table

    assert "headline metric: acc" in md
    assert "| arc_easy | 0.2500 ± 0.100 | 0.3125 ± 0.100 |" in md and "| piqa | 0.5625 ± 0.100 | 0.5000 ± 0.100 |" in md
    # paired against the first model: the equal score is noise, the piqa drop is resolved
    assert "| other-model | arc_easy | 16 | +0.0000 | 0.0913 | within noise |" in md
    assert "| other-model | piqa | 16 | -0.5625 | 0.1281 | **resolved** |" in md
    assert "| **average** | 0.4062 | 0.4062 |" in md or "| **average** | 0.4063 | 0.4063 |" in md

    for r in bench_res["prefill"]:
        name = os.path.basename(r["model"])
        tps = r["tokens_per_s"]
        row = next(l for l in lines if l.startswith(f"| {name} | {r['batch_size']} | {r['seq_len']} |"))
        assert f"{tps['median']:.1f} [{tps['min']:.1f}–{tps['max']:.1f}]" in row
        assert row.endswith(f"| {r['ratio_to_first']['tokens_per_s']:.3f} |")
    assert any(l.startswith("| stories-mag50 | 260,032 | 1.000 |") for l in lines)

    pngs = {os.path.basename(p) for p in res["plots"]}
    assert pngs == {"ppl_vs_sparsity_stories260K_tinystories.png", "zeroshot_accuracy.png", "speed_bench.png"}
    from PIL import Image

    for p in res["plots"]:
        data = open(p, "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200
        assert f"]({os.path.basename(p)})" in md


def test_report_reads_prune_benchmark_file(tmp_path):
    f = tmp_path / "prune_smollm2.json"
    f.write_text(json.dumps({
        "runs": {"dense": {"method": "dense", "sparsity": "0", "ppl": {"wikitext2": 30.0}},
                 "wanda@0.5": {"method": "wanda", "sparsity": "0.5", "ppl": {"wikitext2": 45.0}},
                 "wanda@0.6": {"method": "wanda", "sparsity": "0.6", "ppl": {"wikitext2": 75.0}},
                 "wanda@2:4": {"method": "wanda", "sparsity": "2:4", "ppl": {"wikitext2": 90.0}}},
        "protocol": {"model": "models/SmolLM2-135M-Instruct", "versions": {"prunetune": "0.1.0"}}}))
    res = report([str(f)], out_dir=tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| SmolLM2-135M-Instruct | wanda | 0.6 | 75.000 | 2.500 |" in md
    assert "| SmolLM2-135M-Instruct | wanda | 2:4 | 90.000 | 3.000 |" in md
    assert [os.path.basename(p) for p in res["plots"]] == ["ppl_vs_sparsity_SmolLM2-135M-Instruct_wikitext2.png"]


def test_report_refuses_what_is_not_a_prunetune_result(tmp_path):
    other = tmp_path / "other_tool.json"
    other.write_text(json.dumps({"foo": 1}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"manifest": {"tool": "prunetune",')
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"manifest": {"tool": "prunetune", "command": "tune"}}))
    half = tmp_path / "half_eval.json"
    half.write_text(json.dumps({"manifest": {"tool": "prunetune", "command": "eval", "model": {}}}))
    empty_dir = tmp_path / "not_a_prune_output"
    empty_dir.mkdir()
    cases = [(other, "is not a prunetune result"), (broken, "is not valid JSON"), (tune, "'tune' result"),
             (half, "not a valid prunetune eval result"), (empty_dir, "without prune_report.json"),
             (tmp_path / "missing.json", "does not exist")]
    for path, needle in cases:
        with pytest.raises(PrunetuneError) as ei:
            report([str(path)], out_dir=tmp_path / "out")
        msg = str(ei.value)
        assert str(path) in msg and needle in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # nothing written when an input is refused
