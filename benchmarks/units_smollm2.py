#!/usr/bin/env python3
"""Whole MLP neurons and heads removed from SmolLM2-135M-Instruct with the exact reader refit, against the
rotated hidden-channel shrink, at the same share of decoder-layer weights.

    python benchmarks/units_smollm2.py --runs mlp:0.25:obs mlp:0.25:magnitude hidden:0.25:pca \
        --out benchmarks/results/units_smollm2.json

A run is ``STRUCTURE:RATIO:SELECT[:OPT=VALUE...]``: ``prunetune shrink --structure STRUCTURE --ratio RATIO``
with ``--select SELECT`` (``--method SELECT`` for ``hidden``); options ``head_share=``, ``damp=``,
``nsamples=``, ``seqlen=``. Every run: C4 calibration (``--calib``) (``--nsamples`` x ``--seqlen``, seed 0, prunetune's sampler), then
WikiText-2 and C4 perplexity over the first ``--ppl-windows`` windows of 512 tokens (the dense model on the
same windows), parameters, the wall time of the shrink.

A recovery run is ``tune:BASE@STEPS[+kd]``: LoRA (rank ``--lora-r`` on every linear) on the kept checkpoint of
run ``BASE``, ``STEPS`` steps of ``--batch-size`` x ``--seq-len`` tokens packed from C4 validation documents
``--train-docs`` (not the ones calibration and evaluation read first), cosine schedule, lr ``--lr``, merged;
``+kd``: distilled from the dense model (``--teacher auto``, T = 1, weight 1); ``+full``: full fine-tuning of
every decoder weight (``--method full``, embeddings frozen, lr ``--full-lr``) instead of LoRA. Checkpoints every 10 steps, so a
killed recovery continues (``--resume``) in a later session. ``pat:RATIO@STEPS``: PAT's mask over each layer's
MLP neurons (``tune --method pat-units``, the same LoRA, data, steps and lr, mask warm-started on the calibration
windows) from the dense model: tune-while-pruning against prune-then-tune at equal budget. Results are written after every run; a run already
in the file is skipped, so a killed benchmark continues where it stopped. ``--markdown`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import ResultFile, c4_train_file, ensure_model, run_protocol  # noqa: E402

import prunetune as pt  # noqa: E402


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
    common = dict(ratio=float(ratio), out=str(out), calib=a.calib, nsamples=int(kw.get("nsamples", a.nsamples)),
                  seqlen=int(kw.get("seqlen", a.seqlen)), seed=0, overwrite=True, progress=False)
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


def run_tune(key: str, a, work: Path, res: dict) -> dict:
    from prunetune.io import partial_dir_for

    spec = key[len("tune:"):]
    kd = "+kd" in spec
    full = "+full" in spec
    base_key, steps = spec.replace("+kd", "").replace("+full", "").rsplit("@", 1)
    base = Path(res["runs"][base_key]["dir"])
    if not (base / "config.json").is_file():
        raise SystemExit(f"{key}: the checkpoint of '{base_key}' is gone (run it again with --keep)")
    out = work / key.replace(":", "_").replace("+", "-").replace("@", "-s")
    resume = (partial_dir_for(out.resolve())).exists()
    t = time.time()
    how = dict(method="full", lr=a.full_lr) if full else dict(method="lora", lr=a.lr, r=a.lora_r, alpha=2 * a.lora_r)
    rep = pt.tune(str(base), out=str(out), merge=True, data=str(c4_train_file(a.train_docs, work)),
                  data_mode="text", max_steps=int(steps), seq_len=a.seq_len, batch_size=a.batch_size,
                  seed=0, eval_size=16, checkpoint_every=10, device="cpu",
                  progress=False, overwrite=True, resume=resume, **how, **({"teacher": "auto"} if kd else {}))
    return {"base": base_key, "distilled": kd, "method": how["method"], "lora_r": None if full else a.lora_r,
            "lr": how["lr"], **_trained_row(rep, a, t, out)}


def run_pat(key: str, a, work: Path) -> dict:
    """``pat:RATIO@STEPS``: PAT's mask over each layer's MLP neurons (``tune --method pat-units``) from the dense
    model, with the same LoRA, data, steps and lr as a recovery run, its mask warm-started on the same calibration
    windows as the one-shot shrink: prune-then-tune against tune-while-pruning at equal budget."""
    from prunetune.io import partial_dir_for

    ratio, steps = key[len("pat:"):].split("@")
    out = work / key.replace(":", "_").replace("@", "-s")
    resume = (partial_dir_for(out.resolve())).exists()
    t = time.time()
    rep = pt.tune(a.dense, method="pat-units", out=str(out), data=str(c4_train_file(a.train_docs, work)),
                  data_mode="text", max_steps=int(steps), seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr,
                  seed=0, eval_size=16, checkpoint_every=10, ratio=float(ratio), lora_r=a.lora_r,
                  lora_alpha=2 * a.lora_r, lora_dropout=0.05, calib=a.calib, calib_samples=a.nsamples,
                  calib_seqlen=a.seqlen, device="cpu", progress=False, overwrite=True, resume=resume)
    return {"method": "pat-units", "ratio": float(ratio), "lora_r": a.lora_r, "lr": a.lr,
            **_trained_row(rep, a, t, out)}


def _trained_row(rep: dict, a, t: float, out: Path) -> dict:
    """What every training run records: steps, losses, time, memory, and the evaluation of its output."""
    step_s = [h["step_s"] for h in rep["history"][1:]]
    row = {"steps": rep["steps"], "tokens_per_step": a.batch_size * a.seq_len, "train_docs": a.train_docs,
           "first_loss": rep["first_loss"], "final_loss": rep["final_loss"],
           "final_eval_loss": rep["final_eval_loss"], "step_s_median": sorted(step_s)[len(step_s) // 2] if step_s else None,
           "train_wall_s": rep["manifest"].get("train_wall_s"), "wall_s_this_part": round(time.time() - t, 1),
           "peak_rss_mb": rep["manifest"]["peak_rss_mb"], "dir": str(out)}
    row.update(evaluate(out, a))
    return row


def markdown(res: dict) -> str:
    dense = res["runs"]["dense"]
    corpora = list(dense["ppl"])
    lines = ["| run | parameters | " + " | ".join(f"{c} | x dense" for c in corpora) + " | shrink s |",
             "|---|---|" + "---|---|" * len(corpora) + "---|"]
    for key, r in res["runs"].items():
        cells = []
        for c in corpora:
            v = r["ppl"].get(c)
            cells += [f"{v:.2f}", f"{v / dense['ppl'][c]:.2f}x"] if v else ["", ""]
        lines.append(f"| {key} | {r.get('parameters') or ''} | " + " | ".join(cells) +
                     f" | {r.get('shrink_wall_s', '')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--runs", nargs="*", default=["mlp:0.25:obs"])
    ap.add_argument("--calib", default="c4", help="calibration corpus")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"])
    ap.add_argument("--train-docs", default="1000-1999", help="C4 validation documents recovery trains on (lo-hi)")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of +full (full fine-tuning) runs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default=str(ROOT / "runs" / "units"))
    ap.add_argument("--keep", action="store_true", help="keep the shrunk checkpoints (default: deleted after eval)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "units_smollm2.json"))
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    rf = ResultFile(out, run_protocol("units_smollm2.py", model=Path(a.dense).name,
                                      calibration=f"{a.calib} {a.nsamples} x {a.seqlen}, seed 0",
                                      ppl=f"first {a.ppl_windows} windows of 512 tokens: {', '.join(a.corpora)}"))
    ensure_model(a.dense)
    if not rf.done("dense"):
        rf.record("dense", evaluate(a.dense, a))
    for key in a.runs:
        if rf.done(key):
            continue
        print(f"== {key}", flush=True)
        if key.startswith("tune:"):
            row = run_tune(key, a, work, rf.data)
        elif key.startswith("pat:"):
            row = run_pat(key, a, work)
        else:
            row = run_shrink(key, a, work)
        if not a.keep and not key.startswith(("tune:", "pat:")):
            shutil.rmtree(row["dir"], ignore_errors=True)
        rf.record(key, row)
        print(json.dumps({k: v for k, v in row.items() if k in ("ppl", "parameters", "shrink_wall_s")}), flush=True)
    res = rf.data
    print(markdown(res))


if __name__ == "__main__":
    main()
