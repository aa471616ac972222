#!/usr/bin/env python3
"""Zero-shot accuracy that can rank SmolLM2-135M models: 500 documents per task, stderr, and every model
compared with the dense one document by document (paired standard error).

    python benchmarks/zeroshot_smollm2.py --out benchmarks/results/zeroshot_smollm2.json

Models (``--models LABEL=PATH ...``; defaults below): the dense model, the best shrunk one (a third of every
MLP's neurons removed with the down_proj refit, then 30 LoRA steps: ``benchmarks/units_smollm2.py``'s
``tune:mlp:0.25:magnitude@30``) and APT 2:4 and 50% (C4 32 x 512 calibration, seed 0, pruned here when
missing). Tasks: ``--tasks`` (the offline task files in the data folder), the first ``--limit`` documents of
each in file order, zero-shot log-likelihood multiple choice through lm-evaluation-harness (prunetune's
``evaluate``), batch 16. Each model's full eval JSON goes to ``--evals`` (``prunetune report`` reads them and
prints the paired table); the summary, with the paired differences against the dense model, to ``--out``. A
model already in ``--out`` is skipped, so a killed run continues.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import prunetune as pt  # noqa: E402
from prunetune.evaluation.zeroshot import paired_difference  # noqa: E402
from bench_common import ResultFile, run_protocol  # noqa: E402

TASKS = ["arc_easy", "piqa", "winogrande", "boolq", "openbookqa"]
PRUNED = {"apt-2:4": "2:4", "apt-50%": "0.5"}


def default_models(work: Path) -> dict[str, str]:
    return {"dense": str(ROOT / "models" / "SmolLM2-135M-Instruct"),
            "mlp-25%+lora30": str(ROOT / "runs" / "units" / "tune_mlp_0.25_magnitude-s30"),
            "apt-2:4": str(work / "apt-2of4"), "apt-50%": str(work / "apt-50")}


def ensure_pruned(label: str, path: Path, dense: str) -> None:
    if label in PRUNED and not (path / "config.json").is_file():
        resume = (path.parent / f".{path.name}.partial" / "resume" / "journal.json").is_file()  # killed: go on
        pt.prune(dense, method="apt", sparsity=PRUNED[label], out=str(path), calib="c4", nsamples=32, seqlen=512,
                 seed=0, device="cpu", overwrite=True, progress=False, resume=resume)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, metavar="LABEL=PATH")
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--work", default=str(ROOT / "runs" / "zeroshot"))
    ap.add_argument("--evals", default=str(ROOT / "benchmarks" / "results" / "zeroshot_smollm2"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zeroshot_smollm2.json"))
    a = ap.parse_args()
    work, evals, out = Path(a.work), Path(a.evals), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    evals.mkdir(parents=True, exist_ok=True)
    models = dict(m.split("=", 1) for m in a.models) if a.models else default_models(work)
    rf = ResultFile(out, run_protocol("zeroshot_smollm2.py", tasks=a.tasks, limit=a.limit, batch_size=16,
                                      models=models,
                                      paired="per-document difference against the first model; resolved when "
                                             "|mean| >= 1.96 stderr of the mean difference"))
    for label, path in models.items():
        if rf.done(label):
            continue
        ensure_pruned(label, Path(path), models["dense"] if "dense" in models else next(iter(models.values())))
        print("==", label, flush=True)
        ev = pt.evaluate(path, ppl=[], tasks=a.tasks, limit=a.limit, batch_size=16, device="cpu",
                         out=str(evals / f"{label.replace(':', 'of').replace('%', '')}.json"), progress=False)
        z = ev["zeroshot"]
        rf.record(label, {"path": path, "tasks": z["tasks"], "average": z["average"],
                          "wall_s": ev["manifest"]["wall_time_s"]})
    first = next(iter(models))
    for label, r in list(rf.runs.items()):
        if label == first:
            continue
        r["paired_vs_" + first] = {t: paired_difference(r["tasks"][t]["correct"], rf.runs[first]["tasks"][t]["correct"])
                                   for t in a.tasks if t in r["tasks"]}
        rf.record(label, r)
        print(label, {t: (round(d["diff"], 4), round(d["stderr"], 4), "noise" if d["within_noise"] else "RESOLVED")
                      for t, d in r["paired_vs_" + first].items()})


if __name__ == "__main__":
    main()
