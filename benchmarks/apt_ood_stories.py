#!/usr/bin/env python3
"""In and out of the calibration domain on the bundled stories260K: SparseGPT, APT with SparseGPT's mask
re-solved and APT with the ADMM mask (the default) at dampenings 0.01, 0.03 and 0.1,
calibrated on TinyStories, scored on TinyStories (in domain) and WikiText-2 (another domain).

    python benchmarks/apt_ood_stories.py --out benchmarks/results/apt_ood_stories.json

Protocol: stories260K (the bundled llama2.c model), calibration TinyStories excerpt 64 x 256 tokens, seed 0,
dampening 0.01 unless the variant says otherwise; perplexity over 256-token windows (all of the TinyStories
excerpt, the first 64 of WikiText-2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import prunetune as pt  # noqa: E402
from prunetune.paths import DEFAULT_MODEL  # noqa: E402
from bench_common import ResultFile, run_protocol  # noqa: E402

#: "apt" in results made before APT's default became select="admm" is "apt-sparsegpt" here; "apt-admm*" are the
#: ADMM dual APT shipped when they were taken ("keep"; the default is now "rescale", "apt-admm-rescale*")
#: name -> (method, options, dampening)
VARIANTS = {"sparsegpt": ("sparsegpt", {}, 0.01), "apt-sparsegpt": ("apt", {"select": "sparsegpt"}, 0.01),
            "apt-admm": ("apt", {"select": "admm", "admm_dual": "keep"}, 0.01),
            "apt-admm-d0.03": ("apt", {"select": "admm", "admm_dual": "keep"}, 0.03),
            "apt-admm-d0.1": ("apt", {"select": "admm", "admm_dual": "keep"}, 0.1),
            # the ADMM dual carried over unscaled when ρ changes (as the ALPS code; BENCHMARKS §13)
            "apt-admm-rescale": ("apt", {"select": "admm", "admm_dual": "rescale"}, 0.01),
            "apt-admm-rescale-d0.03": ("apt", {"select": "admm", "admm_dual": "rescale"}, 0.03)}


def ppl(model, a) -> dict:
    r = pt.evaluate(str(model), ppl=["tinystories"], seqlen=256, max_windows=None, device="cpu", progress=False)
    out = {"tinystories": r["perplexity"]["tinystories"]["ppl"]}
    r2 = pt.evaluate(str(model), ppl=["wikitext2"], seqlen=256, max_windows=a.wikitext_windows, device="cpu",
                     progress=False)
    out["wikitext2"] = r2["perplexity"]["wikitext2"]["ppl"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="*", default=["0.7", "2:4", "0.5"])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--wikitext-windows", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "apt_ood_stories.json"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="run these; a setting's other variants already in --out are kept")
    a = ap.parse_args()
    res = ResultFile(a.out, run_protocol(
        "apt_ood_stories.py", model="stories260K (bundled)",
        calibration=f"tinystories {a.nsamples} x {a.seqlen}, seed 0",
        perplexity=f"256-token windows: tinystories all, wikitext2 first {a.wikitext_windows}",
        variants={k: {"method": m, **o, "damp": d} for k, (m, o, d) in VARIANTS.items()}), rows="settings")
    dense = ppl(DEFAULT_MODEL, a)
    res.set("dense", dense)
    with tempfile.TemporaryDirectory() as td:
        for sp in a.settings:
            row = dict(res.runs.get(sp, {}))
            row.pop("command", None)
            for v in a.variants:
                method, opts, damp = VARIANTS[v]
                d = Path(td) / f"{v}-{sp.replace(':', 'of')}"
                rep = pt.prune(str(DEFAULT_MODEL), method=method, sparsity=sp, out=d, calib="tinystories",
                               nsamples=a.nsamples, seqlen=a.seqlen, damp=damp, device="cpu", progress=False,
                               method_opts=opts)
                row[v] = {**ppl(d, a), "wall_s": rep["manifest"]["wall_time_s"], "total": rep["total"],
                          "command": res.command}
            res.record(sp, row)
            print(sp, json.dumps(row), flush=True)
    print(json.dumps(dense))


if __name__ == "__main__":
    main()
