"""The public Python API: names stay functions, and calls repeat (a user's loop over settings)."""

from __future__ import annotations

import importlib

import prunetune
import prunetune as pt
from prunetune.paths import DEFAULT_MODEL


def test_api_names_are_functions_even_after_subpackage_imports():
    import prunetune.pruning.methods.apt  # noqa: F401  (a dotted import of a method module works)

    for mod in ("prunetune.pruning.api", "prunetune.tuning.api", "prunetune.evaluation.speed", "prunetune.evaluation.report",
                "prunetune.structured.api"):
        importlib.import_module(mod)
    for name in ("load_model", "perplexity", "evaluate", "prune", "tune", "merge", "bench", "report", "shrink"):
        assert callable(getattr(pt, name)), name
    assert prunetune.pruning.methods.apt.apt.__module__ == "prunetune.pruning.methods.apt"


def test_prune_twice_in_one_process(tmp_path):
    outs = []
    for method in ("magnitude", "wanda"):
        rep = pt.prune(str(DEFAULT_MODEL), method=method, sparsity="0.5", out=tmp_path / method, calib="tinystories",
                       nsamples=4, seqlen=64, progress=False)
        outs.append(rep)
    assert all(abs(r["total"]["sparsity_of_pruned_matrices"] - 0.5) < 1e-3 for r in outs)


def test_demo_main_job_prints_the_before_after_table(tmp_path):
    """The README's main job: every method prunes the bundled model; the table has dense + one row per run."""
    from prunetune.api import demo

    res = demo(methods=("magnitude", "apt"), sparsities=("2:4",), nsamples=4, seqlen=64, out=tmp_path)
    lines = res["table"].splitlines()
    assert lines[2].split()[0] == "dense" and [ln.split()[:2] for ln in lines[3:]] == [["magnitude", "2:4"], ["apt", "2:4"]]
    for r in res["rows"]:
        assert abs(r["measured_sparsity"] - 0.5) < 1e-6 and r["ppl"] > res["dense_ppl"]
    # APT reconstructs the layers from calibration data, magnitude does not: APT hurts less
    assert res["rows"][1]["ppl"] < res["rows"][0]["ppl"]
