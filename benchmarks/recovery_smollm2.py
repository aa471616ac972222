#!/usr/bin/env python3
"""Shrink without losing the model: rotation and distillation on SmolLM2-135M-Instruct, side by side.

    python benchmarks/recovery_smollm2.py --runs oneshot-activation:0.25 oneshot-pca:0.25 pat+rot+kd:0.25 \
        ptt+rot+kd:0.25 spp+kd:apt-2of4 ... --out benchmarks/results/recovery_smollm2.json

A run is named ``KIND[+rot][+kd]:ARG[@STEPS]``:

- ``oneshot-activation:R`` / ``oneshot-pca:R`` — ``prunetune shrink`` removing the fraction R of hidden channels
  without training: by activation energy at the RMSNorm outputs, or after rotating the residual stream to its
  principal directions (``--method pca``); calibration C4, ``--calib-samples`` x ``--calib-seqlen``, seed 0.
- ``pat:R`` — PAT from the dense model (LoRA + HSMs + shared mask, warm start from channel energy on the same
  C4 windows, spread ``--mask-init-scale``); ``+rot``: on the rotated model (the same windows give the
  rotation), so the warm start ranks principal directions.
- ``ptt:R`` — prune-then-tune: the one-shot shrink with the same ranking (``activation``; ``+rot``: ``pca``),
  then LoRA on the smaller model. PAT and prune-then-tune of one suffix start from the same channel ranking.
- ``spp:NAME`` / ``lora-masked:NAME`` — recovery of the pruned model ``--pruned-dir/NAME`` (e.g. ``apt-2of4``)
  on C4 documents ``--train-docs`` (§4's protocol).
- ``+kd``: every loss is distillation from the dense model (``--teacher auto``; T ``--kd-temperature``, weight
  ``--kd-weight``); ``@STEPS``: another step budget than ``--steps`` (PAT/PTT) or ``--spp-steps`` (SPP).

Every output is a plain HF checkpoint, evaluated the same way: WikiText-2 and C4 perplexity over the first
``--ppl-windows`` 512-token windows, and (tuned models) the zero-shot ``acc`` over ``--tasks``, first ``--limit``
examples each. Tuning runs record step time (median, first step excluded), peak RSS, trainable parameters.
Results are appended as runs finish (several processes may share one file, ``--runs`` split between them), so
a killed benchmark continues where it stopped; ``--markdown`` prints the tables of a result file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import c4_train_file  # noqa: E402

import torch  # noqa: E402

import prunetune as pt  # noqa: E402
from prunetune.manifest import machine, versions, write_json_atomic  # noqa: E402

TASKS = ["arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "openbookqa"]
RUN = re.compile(r"^(?P<kind>oneshot-activation|oneshot-pca|pat|ptt|spp|lora-masked)(?P<flags>(\+rot|\+kd)*)"
                 r":(?P<arg>[^@]+)(@(?P<steps>\d+))?$")


def evaluate(model_dir, a, zeroshot: bool) -> dict:
    r = pt.evaluate(str(model_dir), ppl=a.corpora, seqlen=512, max_windows=a.ppl_windows or None,
                    tasks=a.tasks if zeroshot and a.tasks else None, limit=a.limit, device="cpu", progress=False)
    row = {"ppl": {c: v["ppl"] for c, v in r["perplexity"].items()}, "eval_wall_s": r["manifest"]["wall_time_s"],
           "parameters": r["manifest"]["model"].get("parameters")}
    zs = r.get("zeroshot")
    if zs:
        row["zeroshot"] = {t: v["acc"] for t, v in zs["tasks"].items()}
        row["zeroshot_avg"] = zs["average"]["acc"]
    return row


def tune_row(rep: dict) -> dict:
    step_s = [h["step_s"] for h in rep["history"][1:]]
    row = {"step_s_median": statistics.median(step_s) if step_s else None, "first_loss": rep["first_loss"],
           "final_loss": rep["final_loss"], "final_eval_loss": rep["final_eval_loss"], "steps": rep["steps"],
           "trainable_parameters": rep.get("trainable_parameters"), "peak_rss_mb": rep["manifest"]["peak_rss_mb"],
           "train_wall_s": rep["manifest"]["train_wall_s"], "distillation": rep.get("distillation"),
           "warnings": rep.get("warnings")}
    for k in ("pat", "sparsity", "zero_pattern_check", "setup"):
        if rep.get(k) is not None:
            row[k] = {kk: vv for kk, vv in rep[k].items() if kk != "kept_channels"} if isinstance(rep[k], dict) \
                else rep[k]
    return row


def run_one(key: str, a, work: Path) -> dict:
    m = RUN.match(key)
    if m is None:
        raise SystemExit(f"cannot parse run '{key}'")
    kind, flags, arg = m["kind"], m["flags"] or "", m["arg"]
    rot, kd = "+rot" in flags, "+kd" in flags
    d = work / key.replace(":", "-").replace("+", "_").replace("@", "-s")
    calib = dict(calib="c4", nsamples=a.calib_samples, seqlen=a.calib_seqlen, seed=0)
    teacher = dict(teacher="auto", kd_temperature=a.kd_temperature, kd_weight=a.kd_weight) if kd else {}
    if kind.startswith("oneshot"):
        rep = pt.shrink(a.dense, ratio=float(arg), out=d, method=kind.split("-")[1], overwrite=True, device="cpu",
                        progress=False, **calib)
        return {"model": str(d), "kind": kind, "ratio": float(arg), **rep["shrink"],
                "shrink_wall_s": rep["manifest"]["wall_time_s"], "peak_rss_mb": rep["manifest"]["peak_rss_mb"],
                **evaluate(d, a, zeroshot=False)}
    common = dict(seq_len=a.seq_len, batch_size=a.batch_size, seed=0, checkpoint_every=0, overwrite=True,
                  device="cpu", progress=False, **teacher)
    if kind in ("pat", "ptt"):
        ratio = float(arg)
        steps = int(m["steps"] or a.steps)
        instr = dict(data=a.data, max_steps=steps, lr=a.lr, eval_size=a.eval_size, max_records=a.max_records)
        if kind == "pat":
            rep = pt.tune(a.dense, method="pat", out=d, ratio=ratio, rotate=rot, mask_init="activation",
                          mask_init_scale=a.mask_init_scale, calib=calib["calib"], calib_samples=a.calib_samples,
                          calib_seqlen=a.calib_seqlen, **instr, **common)
            row = {"model": str(d), "kind": kind, "ratio": ratio, "rotated": rot, "distilled": kd, **tune_row(rep)}
        else:
            start = work / f"oneshot-{'pca' if rot else 'activation'}-{arg}"
            if not (start / "config.json").is_file():
                pt.shrink(a.dense, ratio=ratio, out=start, method="pca" if rot else "activation", overwrite=True,
                          device="cpu", progress=False, **calib)
            rep = pt.tune(str(start), method="lora", out=d, merge=True, **instr, **common)
            row = {"model": str(d), "kind": kind, "ratio": ratio, "rotated": rot, "distilled": kd, "start": str(start),
                   "hidden_size": json.loads((start / "config.json").read_text())["hidden_size"], **tune_row(rep)}
        return {**row, **evaluate(d, a, zeroshot=True)}
    base = Path(a.pruned_dir) / arg
    steps = int(m["steps"] or a.spp_steps)
    rep = pt.tune(str(base), method=kind, out=d, merge=True, data=str(c4_train_file(a.train_docs, a.work)),
                  data_mode="text", max_steps=steps, eval_size=16, **common)
    return {"model": str(d), "kind": kind, "base": str(base), "distilled": kd, **tune_row(rep),
            **evaluate(d, a, zeroshot=True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="runs to do (see above), in order")
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--pruned-dir", default=str(ROOT / "runs" / "bench"), help="folder of the pruned models (spp runs)")
    ap.add_argument("--also-pruned", nargs="*", default=[], help="pruned models to evaluate as the spp baselines")
    ap.add_argument("--no-dense", action="store_true", help="do not evaluate the dense model (another process does)")
    ap.add_argument("--data", default="alpaca")
    ap.add_argument("--steps", type=int, default=30, help="PAT / prune-then-tune optimiser steps")
    ap.add_argument("--spp-steps", type=int, default=24, help="SPP / masked-LoRA optimiser steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4, help="PAT / prune-then-tune learning rate (SPP: defaults)")
    ap.add_argument("--eval-size", type=int, default=32)
    ap.add_argument("--max-records", type=int, default=4000)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--mask-init-scale", type=float, default=0.1)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--train-docs", default="1000-1999", help="C4 validation documents SPP trains on (lo-hi)")
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"])
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "runs" / "recovery"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recovery_smollm2.json"))
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    torch.set_num_threads(a.threads)
    res = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    res["protocol"] = {
        "dense": a.dense,
        "pat_and_prune_then_tune": {
            "data": (f"{a.data} (first {a.max_records} records, {a.eval_size} held out; Alpaca template, loss on the "
                     "response only)") if a.data == "alpaca" else
                    f"{a.data} (text: packed {a.seq_len}-token windows, {a.eval_size} held out)", "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "lr": a.lr,
            "schedule": "cosine, no warm-up", "seed": 0,
            "adapters": "LoRA r=8 alpha=16 dropout 0.05 on q/k/v/o/gate/up/down of every layer; PAT adds the HSMs "
                        "(HIO rank 5% of d) and the shared mask, milestone 1/3, identity loss",
            "channel_ranking": f"C4 {a.calib_samples} x {a.calib_seqlen}, seed 0 (warm start, rotation, one-shot)",
            "mask_init_scale": a.mask_init_scale},
        "spp_and_masked_lora": {"data": f"C4 validation documents {a.train_docs}, packed {a.seq_len}-token windows",
                                "steps": a.spp_steps, "batch_size": a.batch_size, "lr": "method defaults (spp 4e-3, "
                                "lora 2e-4)", "adapters": "spp g=16 alpha/r=2 dropout 0.05; lora r=8 alpha 16"},
        "distillation": {"teacher": "the dense model (--teacher auto)", "temperature": a.kd_temperature,
                         "weight": a.kd_weight, "positions": "those of the task loss"},
        "eval": {"perplexity": f"{', '.join(a.corpora)}; 512-token windows, first {a.ppl_windows}",
                 "zeroshot": f"{', '.join(a.tasks)}; first {a.limit} examples each; acc; tuned models only"},
        "dtype": "float32", "device": "cpu", "threads_per_process": a.threads, "versions": versions(),
        "machine": machine(), "command": " ".join(["python", "benchmarks/recovery_smollm2.py", *sys.argv[1:]]),
    }

    def record(key, row):  # re-read first: several benchmark processes may share one result file
        if out.is_file():
            res["runs"] = {**json.loads(out.read_text())["runs"], **res["runs"]}
        res["runs"][key] = row
        write_json_atomic(out, res)
        print(key, json.dumps({k: v for k, v in row.items() if k in ("ppl", "zeroshot_avg", "step_s_median",
                                                                     "peak_rss_mb")}), flush=True)

    def done(key):
        return out.is_file() and key in json.loads(out.read_text())["runs"]

    if not a.no_dense and not done("dense"):
        record("dense", {"model": a.dense, **evaluate(a.dense, a, zeroshot=True)})
    for p in a.also_pruned:
        key = f"pruned:{Path(p).name}"
        if not done(key):
            record(key, {"model": p, **evaluate(p, a, zeroshot=True)})
    for key in a.runs:
        if done(key):
            continue
        t = time.time()
        row = run_one(key, a, work)
        row["run_wall_s"] = round(time.time() - t, 1)
        record(key, row)
    print(markdown(res))


def _gap(dense, base, tuned):
    return (base - tuned) / (base - dense) if abs(base - dense) > 1e-12 else None


def markdown(res: dict) -> str:
    runs = res["runs"]
    dense = runs.get("dense")
    if dense is None:
        return "(no results yet)"
    corpora = list(dense["ppl"])
    lines = []
    head = ["run", "hidden", "params (M)"] + [f"{c} ppl (x dense)" for c in corpora] + ["zero-shot avg",
                                                                                       "s/step", "peak RSS MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(key, r):
        hid = r.get("hidden_size") or (r.get("pat") or {}).get("hidden_size") or "-"
        c = [key, str(hid), f"{(r.get('parameters') or 0) / 1e6:.1f}"]
        c += [f"{r['ppl'][x]:.2f} ({r['ppl'][x] / dense['ppl'][x]:.2f}x)" for x in corpora]
        c.append(f"{r['zeroshot_avg']:.4f}" if "zeroshot_avg" in r else "-")
        c.append(f"{r['step_s_median']:.2f}" if r.get("step_s_median") else "-")
        c.append(f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-")
        return "| " + " | ".join(c) + " |"

    lines.append(cells("dense", dense))
    for key, r in runs.items():
        if key != "dense" and not key.startswith(("spp", "lora-masked", "pruned:")):
            lines.append(cells(key, r))
    sparse = [k for k in runs if k.startswith(("spp", "lora-masked"))]
    if sparse:
        lines += ["", "| run | " + " | ".join(f"{c} ppl" for c in corpora) + " | "
                  + " | ".join(f"gap recovered ({c})" for c in corpora)
                  + " | zero pattern identical | sparsity after merge | s/step | peak RSS MB |",
                  "|" + "---|" * (4 + 2 * len(corpora) + 1)]
        for k in [k for k in runs if k.startswith("pruned:")]:
            r = runs[k]
            lines.append(f"| {k} | " + " | ".join(f"{r['ppl'][c]:.2f}" for c in corpora) + " | "
                         + " | ".join("-" for _ in corpora) + " | - | - | - | - |")
        for k in sparse:
            r = runs[k]
            base = runs.get(f"pruned:{Path(r['base']).name}")
            gaps = [_gap(dense["ppl"][c], base["ppl"][c], r["ppl"][c]) if base else None for c in corpora]
            zp = (r.get("zero_pattern_check") or {}).get("identical")
            sp = (r.get("sparsity") or {}).get("after_merge")
            lines.append(f"| {k} | " + " | ".join(f"{r['ppl'][c]:.2f}" for c in corpora) + " | "
                         + " | ".join("-" if g is None else f"{g:.0%}" for g in gaps)
                         + f" | {'yes' if zp else 'no'} | {sp:.4f} | {r['step_s_median']:.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
