#!/usr/bin/env python3
"""Whole MLP neurons and heads removed from SmolLM2-135M-Instruct with the exact reader refit, against the
rotated hidden-channel shrink, at the same share of decoder-layer weights.

    python benchmarks/units_smollm2.py --runs mlp:0.25:obs mlp:0.25:magnitude hidden:0.25:pca \
        --out benchmarks/results/units_smollm2.json

A run is ``STRUCTURE:RATIO:SELECT[:OPT=VALUE...]``: ``prunetune shrink --structure STRUCTURE --ratio RATIO``
with ``--select SELECT`` (``--method SELECT`` for ``hidden``); options ``head_share=``, ``damp=``,
``nsamples=``. Every run: C4 calibration (``--nsamples`` x ``--seqlen``, seed 0, prunetune's sampler), then
WikiText-2 and C4 perplexity over the first ``--ppl-windows`` windows of 512 tokens (the dense model on the
same windows), parameters, the wall time of the shrink. Results are written after every run; a run already
in the file is skipped, so a killed benchmark continues where it stopped. ``--markdown`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import prunetune as pt  # noqa: E402
from prunetune.manifest import machine, versions, write_json_atomic  # noqa: E402


def evaluate(model_dir, a) -> dict:
    r = pt.evaluate(str(model_dir), ppl=a.corpora, seqlen=512, max_windows=a.ppl_windows, device="cpu",
                    progress=False)
    return {"ppl": {c: v["ppl"] for c, v in r["perplexity"].items()},
            "parameters": r["manifest"]["model"].get("parameters"), "eval_wall_s": r["manifest"]["wall_time_s"]}


def run_shrink(key: str, a, work: Path) -> dict:
    structure, ratio, select, *opts = key.split(":")
    kw = dict(o.split("=", 1) for o in opts)
    out = work / key.replace(":", "_").replace("+", "-")
    t = time.time()
    common = dict(ratio=float(ratio), out=str(out), calib="c4", nsamples=int(kw.get("nsamples", a.nsamples)),
                  seqlen=a.seqlen, seed=0, overwrite=True, progress=False)
    if structure == "hidden":
        rep = pt.shrink(a.dense, method=select, **common)
    else:
        rep = pt.shrink(a.dense, structure=structure, select=select, damp=float(kw.get("damp", 0.01)),
                        head_share=float(kw["head_share"]) if "head_share" in kw else None, **common)
    row = {"shrink": rep["shrink"], "parameters": rep["parameters"], "shrink_wall_s": round(time.time() - t, 1),
           "peak_rss_mb": rep["manifest"].get("peak_rss_mb"), "calibration": rep.get("calibration"),
           "dir": str(out)}
    row["shrink"].pop("kept_channels", None)
    row.update(evaluate(out, a))
    return row


def markdown(res: dict) -> str:
    dense = res["runs"].get("dense")
    lines = ["| run | parameters | WikiText-2 | x dense | C4 | x dense | shrink s |", "|---|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        w, c = r["ppl"].get("wikitext2"), r["ppl"].get("c4")
        xw = f"{w / dense['ppl']['wikitext2']:.2f}x" if dense and w else ""
        xc = f"{c / dense['ppl']['c4']:.2f}x" if dense and c else ""
        lines.append(f"| {key} | {r.get('parameters') or ''} | {w:.2f} | {xw} | {c:.2f} | {xc} | "
                     f"{r.get('shrink_wall_s', '')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--runs", nargs="*", default=["mlp:0.25:obs"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "units"))
    ap.add_argument("--keep", action="store_true", help="keep the shrunk checkpoints (default: deleted after eval)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "units_smollm2.json"))
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    res = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    res["protocol"] = {"model": "SmolLM2-135M-Instruct", "calibration": f"c4 {a.nsamples} x {a.seqlen}, seed 0",
                       "ppl": f"first {a.ppl_windows} windows of 512 tokens: {', '.join(a.corpora)}",
                       "versions": versions(), "machine": machine(),
                       "command": "python benchmarks/units_smollm2.py --runs " + " ".join(a.runs)}
    if "dense" not in res["runs"]:
        res["runs"]["dense"] = evaluate(a.dense, a)
        write_json_atomic(out, res)
    for key in a.runs:
        if key in res["runs"]:
            continue
        print(f"== {key}", flush=True)
        res["runs"][key] = run_shrink(key, a, work)
        if not a.keep:
            shutil.rmtree(res["runs"][key]["dir"], ignore_errors=True)
        write_json_atomic(out, res)
        print(json.dumps({k: v for k, v in res["runs"][key].items() if k in ("ppl", "parameters", "shrink_wall_s")}),
              flush=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
