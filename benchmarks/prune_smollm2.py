#!/usr/bin/env python3
"""One-shot pruning benchmark on SmolLM2-135M-Instruct: dense vs magnitude, Wanda, SparseGPT, APT.

    python benchmarks/prune_smollm2.py --nsamples 128 --seqlen 512 --ppl-windows 0 \
        --settings 0.5 0.6 0.7 2:4 4:8 --out benchmarks/results/prune_smollm2.json

Every run prunes the same model with the same calibration windows (C4 validation, seed 0; ``--calib`` picks
another corpus, e.g. ``tinystories`` to score every corpus out of the calibration domain), then scores
WikiText-2 (test file as is) and C4 (validation docs joined) perplexity with 512-token non-overlapping
windows (``--ppl-windows N`` keeps the first N windows of each corpus; 0 = all). Results are appended as
they finish, so a killed benchmark continues where it stopped. ``--markdown`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import ResultFile, ensure_model, run_protocol  # noqa: E402

import prunetune as pt  # noqa: E402
from prunetune.evaluation.perplexity import perplexity  # noqa: E402


def ppl_all(model_dir, corpora, windows):
    m, tok, _ = pt.load_model(str(model_dir))
    return {c: perplexity(m, tok, c, seqlen=512, max_windows=windows or None, progress=False) for c in corpora}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--methods", nargs="*", default=["magnitude", "wanda", "sparsegpt", "apt"],
                    help=f"methods, or the variants {', '.join(VARIANTS)}")
    ap.add_argument("--settings", nargs="*", default=["0.5", "0.6", "0.7", "2:4", "4:8"])
    ap.add_argument("--calib", default="c4", help="calibration corpus (c4, wikitext2, tinystories or a text file)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=0)
    ap.add_argument("--magnitude-nsamples", type=int, default=8,
                    help="magnitude ignores calibration data; these samples only feed its reported layer errors")
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_smollm2.json"))
    ap.add_argument("--dense-from", default=None,
                    help="take the dense row from an earlier `prunetune eval` result (same corpora and windows)")
    ap.add_argument("--markdown", action="store_true", help="only print the table of an existing result file")
    a = ap.parse_args()
    out = Path(a.out)
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    ensure_model(a.model)
    rf = ResultFile(out, run_protocol(
        "prune_smollm2.py", model=a.model,
        calibration=f"{a.calib}, {a.nsamples} x {a.seqlen} tokens, seed 0 (magnitude, which uses no data: "
                    f"{a.magnitude_nsamples} x {a.seqlen}, for its layer errors only)",
        perplexity=f"{', '.join(a.corpora)}; 512-token non-overlapping windows"
                   + (f", first {a.ppl_windows} windows" if a.ppl_windows else ", all windows"),
        true_sequential=True, damp="0.01 unless the variant says otherwise", blocksize=128, dtype="float32"))
    res = rf.data

    if not rf.done("dense") and a.dense_from:
        ev = json.loads(Path(a.dense_from).read_text())
        rf.record("dense", {"method": "dense", "sparsity": "0", "from": a.dense_from,
                            "ppl": {c: ev["perplexity"][c]["ppl"] for c in a.corpora}})
    if not rf.done("dense"):
        t = time.time()
        ppl = {c: r["ppl"] for c, r in ppl_all(a.model, a.corpora, a.ppl_windows).items()}
        rf.record("dense", {"method": "dense", "sparsity": "0", "ppl": ppl, "eval_time_s": time.time() - t})
    for setting in a.settings:
        for method in a.methods:
            key = f"{method}@{setting}"
            if rf.done(key):
                continue
            d = Path(a.work) / key.replace(":", "of").replace("@", "-")
            ns = a.magnitude_nsamples if method == "magnitude" else a.nsamples
            name, opts, extra = VARIANTS.get(method, (method, {}, {}))
            # a prune killed after a finished layer goes on from there
            resume = (d.parent / f".{d.name}.partial" / "resume" / "journal.json").is_file()
            rep = pt.prune(a.model, method=name, sparsity=setting, out=d, calib=a.calib, nsamples=ns,
                           seqlen=a.seqlen, seed=0, overwrite=True, device="cpu", method_opts=opts or None,
                           resume=resume, **extra)
            t = time.time()
            ppl = {c: r["ppl"] for c, r in ppl_all(d, a.corpora, a.ppl_windows).items()}
            row = rf.record(key, {"method": method, "sparsity": setting, "ppl": ppl, "calibration_samples": ns,
                                  "prune_wall_time_s": rep["manifest"]["wall_time_s"],
                                  "prune_peak_rss_mb": rep["manifest"]["peak_rss_mb"],
                                  "measured_sparsity": rep["total"]["sparsity_of_pruned_matrices"],
                                  "mean_rel_layer_error": rep["total"]["mean_rel_error"],
                                  "eval_time_s": time.time() - t})
            print(key, json.dumps(row), flush=True)
    print(markdown(res))


#: method variants: name -> (method, method options, other prune arguments); "-owl": OWL's per-layer sparsity
#: (default lambda 0.08, M 5); "-d0.1", "-d0.03": APT's mask search and refit dampened by 0.1 (0.03) x mean
#: diag(H) (a ridge) instead of 0.01; "-calib-stream": calibration windows without the family's BOS per window.
#: "apt" rows and these variants were recorded with APT's ADMM dual "keep", its default until 2026-12-07 (now
#: "rescale", BENCHMARKS §13); the ADMM variants name it so they reproduce what is recorded
VARIANTS = {"apt-admm": ("apt", {"select": "admm", "admm_dual": "keep"}, {"damp": 0.01}),
            "apt-admm-d0.03": ("apt", {"select": "admm", "admm_dual": "keep"}, {"damp": 0.03}),
            "apt-admm-d0.1": ("apt", {"select": "admm", "admm_dual": "keep"}, {"damp": 0.1}),
            "apt-admm-d0.03-owl": ("apt", {"select": "admm", "admm_dual": "keep"}, {"damp": 0.03, "owl": True}),
            "apt-sparsegpt": ("apt", {"select": "sparsegpt"}, {"damp": 0.01}),
            "sparsegpt-owl": ("sparsegpt", {}, {"owl": True}),
            "apt-admm-owl": ("apt", {"select": "admm", "admm_dual": "keep"}, {"damp": 0.01, "owl": True}),
            "apt-sparsegpt-owl": ("apt", {"select": "sparsegpt"}, {"damp": 0.01, "owl": True}),
            # calibration windows drawn from the token stream as it is (no BOS per window), whatever the family
            "sparsegpt-calib-stream": ("sparsegpt", {}, {"calib_bos": "stream"}),
            "apt-calib-stream": ("apt", {"admm_dual": "keep"}, {"calib_bos": "stream"})}


def markdown(res: dict) -> str:
    runs = res["runs"]
    dense = runs["dense"]["ppl"]
    corpora = list(dense)
    lines = ["| setting | method | " + " | ".join(f"{c} ppl (x dense)" for c in corpora)
             + " | prune time s | peak RSS MB |", "|---|---|" + "---|" * (len(corpora) + 2)]
    lines.append("| dense | - | " + " | ".join(f"{dense[c]:.2f}" for c in corpora) + " | - | - |")
    for key, r in runs.items():
        if key == "dense":
            continue
        cells = " | ".join(f"{r['ppl'][c]:.2f} ({r['ppl'][c] / dense[c]:.2f}x)" for c in corpora)
        lines.append(f"| {r['sparsity']} | {r['method']} | {cells} | {r['prune_wall_time_s']:.0f} | {r['prune_peak_rss_mb']:.0f} |")
    pairs = [(k, r) for k, r in runs.items() if r["method"].startswith("apt") and f"sparsegpt@{r['sparsity']}" in runs]
    if pairs:
        lines += ["", "APT variants vs SparseGPT at the same setting: increase of perplexity over dense relative to "
                      "SparseGPT's (below 1: loses less), mean relative layer error ratio and prune time ratio", "",
                  "| setting | variant | " + " | ".join(f"{c}: (APT - dense) / (SparseGPT - dense)" for c in corpora)
                  + " | layer error / SparseGPT | prune time / SparseGPT |", "|---|---|" + "---|" * (len(corpora) + 2)]
        for k, a in pairs:
            g = runs[f"sparsegpt@{a['sparsity']}"]
            cells = " | ".join(f"{(a['ppl'][c] - dense[c]) / (g['ppl'][c] - dense[c]):.3f}" for c in corpora)
            lines.append(f"| {a['sparsity']} | {a['method']} | {cells} | "
                         f"{a['mean_rel_layer_error'] / g['mean_rel_layer_error']:.3f} | "
                         f"{a['prune_wall_time_s'] / g['prune_wall_time_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
