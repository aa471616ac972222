#!/usr/bin/env python3
"""PAT on SmolLM2-135M-Instruct vs its baselines at the same ratio and training budget, plus the speed of the
shrunk models.

    python benchmarks/pat_smollm2.py --ratios 0.2 0.25 0.3 --steps 60 --batch-size 8 --seq-len 256 \
        --out benchmarks/results/pat_smollm2.json

Runs (all with the same data, steps, batch, sequence length, seed and LoRA rank/targets):

- ``lora``: LoRA on the dense model, merged (the accuracy ceiling; also the start of tune-then-prune);
- ``pat:R``: PAT removing the fraction R of hidden channels (LoRA + HSMs + shared mask), exported shrunk, with
  the mask warm-started (``--mask-init activation``, spread ``--mask-init-scale``) from the channel importance
  the baselines use, on the same C4 windows (``--mask-init-data c4``);
- ``pat-NAME:R``: PAT variants (``--variant``: other spread, no identity loss, milestone, warm start on the
  first training examples);
- ``pat-zero:R``: the same with ``W_M = 0`` at the start, as published (for ``--zero-init-ratios``);
- ``channel:R``: the dense model with the fraction R of hidden channels removed by activation importance
  (``prunetune.structured.channels``: energy of each channel at the output of every RMSNorm on C4
  calibration windows), no training;
- ``prune-then-tune:R``: LoRA on ``channel:R``, merged;
- ``tune-then-prune:R``: ``lora`` with the fraction R of channels removed by the same importance.

Every output is a plain HF checkpoint, evaluated the same way: WikiText-2 and C4 perplexity (512-token windows,
the first ``--ppl-windows`` of each) and the zero-shot ``acc`` average over ``--tasks`` (first ``--limit``
examples each). Training data: ``--data`` (default the 14k Alpaca records, loss on the response only).
Speed: ``prunetune bench`` of dense vs the PAT models, interleaved in one run. Step time: PAT vs LoRA of about
the same trainable size (rank chosen to match PAT's LoRA + HSM parameters), ``--timing-steps`` steps each,
median seconds per step (first step excluded). Results are appended as they finish, so a killed benchmark
continues where it stopped; ``--markdown`` prints the tables of a result file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import prunetune as pt  # noqa: E402
from bench_common import ResultFile, ensure_model, run_protocol  # noqa: E402

TASKS = ["arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "openbookqa"]


def evaluate(model_dir, a, zeroshot: bool = True) -> dict:
    r = pt.evaluate(str(model_dir), ppl=a.corpora, seqlen=512, max_windows=a.ppl_windows or None,
                    tasks=a.tasks if zeroshot else None,
                    limit=a.limit, device="cpu", progress=False)
    zs = r.get("zeroshot")
    row = {"ppl": {c: v["ppl"] for c, v in r["perplexity"].items()}, "eval_wall_s": r["manifest"]["wall_time_s"],
           "parameters": r["manifest"]["model"].get("parameters")}
    if zs:
        row["zeroshot"] = {t: v["acc"] for t, v in zs["tasks"].items()}
        row["zeroshot_avg"] = zs["average"]["acc"]
    return row


def _step_stats(rep: dict, a) -> dict:
    step_s = [h["step_s"] for h in rep["history"][1:]]
    return {"step_s_median": statistics.median(step_s) if step_s else None, "first_loss": rep["first_loss"],
            "final_loss": rep["final_loss"], "final_eval_loss": rep["final_eval_loss"], "steps": rep["steps"],
            "trainable_parameters": rep.get("trainable_parameters")}


def run_tune(model, method, out, a, **kw) -> dict:
    t = time.time()
    rep = pt.tune(str(model), method=method, data=a.data, out=out, seq_len=a.seq_len, batch_size=a.batch_size,
                  max_steps=kw.pop("steps", a.steps), seed=a.seed, lr=kw.pop("lr", a.lr), warmup=a.warmup,
                  eval_size=a.eval_size, max_records=a.max_records, checkpoint_every=0, overwrite=True,
                  device="cpu", progress=False, **kw)
    return {"train_wall_s": round(time.time() - t, 1), "peak_rss_mb": rep["manifest"]["peak_rss_mb"],
            **_step_stats(rep, a), **({"pat": {**{k: v for k, v in rep["pat"].items() if k != "kept_channels"},
                                               "mask_init": (rep.get("setup") or {}).get("mask_init")}}
                                     if rep.get("pat") else {})}


def channel_prune(src, ratio, out, a) -> dict:
    from prunetune.data.calibration import sample_calibration
    from prunetune.io import load_model
    from prunetune.tuning.methods.pat import save_shrunk
    from prunetune.structured.channels import prune_channels

    model, tok, _ = load_model(str(src), dtype="float32", device="cpu")
    calib, proto = sample_calibration(tok, "c4", a.calib_samples, a.calib_seqlen, seed=a.seed)
    t = time.time()
    shrunk, info = prune_channels(model, ratio, importance="activation", calib=calib)
    save_shrunk(shrunk, tok, out)
    info.pop("kept_channels")
    return {**info, "calibration": proto, "prune_wall_s": round(time.time() - t, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.25, 0.3])
    ap.add_argument("--data", default="alpaca")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4, help="one learning rate for every run (LoRA, HSMs, mask)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--max-records", type=int, default=None)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"])
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--timing-steps", type=int, default=6)
    ap.add_argument("--zero-init-ratios", nargs="*", type=float, default=[0.25])
    ap.add_argument("--variant", action="append", default=[],
                    help="an extra PAT run NAME:RATIO:SCALE:IDLOSS[:MILESTONE[:INIT]] (warm start spread SCALE, "
                         "identity loss 1/0, milestone fraction, INIT 'train' = score channels on the first 64 "
                         "training examples instead of --mask-init-data), recorded as pat-NAME:RATIO; "
                         "e.g. noid:0.25:0.1:0")
    ap.add_argument("--mask-init-data", default="c4",
                    help="corpus the PAT warm start scores channels on (--calib-samples x --calib-seqlen, the same "
                         "windows and importance as the channel-pruning baselines; default c4)")
    ap.add_argument("--mask-init-scale", type=float, default=0.1, help="spread of the PAT warm start (default 0.1)")
    ap.add_argument("--untuned-zeroshot", action="store_true",
                    help="also score the untuned channel-pruned models zero-shot (default: perplexity only)")
    ap.add_argument("--skip", nargs="*", default=[], help="run keys to skip (e.g. channel:0.2)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "pat"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pat_smollm2.json"))
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rf = ResultFile(out, run_protocol(
        "pat_smollm2.py", dense=a.dense, ratios=a.ratios,
        training={"data": a.data, "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                  "seed": a.seed, "lr": a.lr, "schedule": "cosine", "warmup": a.warmup,
                  "held_out": a.eval_size, "max_records": a.max_records,
                  "adapters": "LoRA r=8 alpha=16 dropout 0.05 on q/k/v/o/gate/up/down of every layer (all runs); "
                              "PAT adds 61 HSMs (HIO rank 29 = 5% of 576) and the shared mask, milestone 1/3; "
                              f"warm start from channel energy on {a.mask_init_data} ({a.calib_samples} x "
                              f"{a.calib_seqlen}, the baselines' windows), W_M spread {a.mask_init_scale}, "
                              "unless a row states otherwise"},
        channel_importance=f"activation energy at every RMSNorm output, C4 {a.calib_samples} x {a.calib_seqlen}, "
                           f"seed {a.seed}",
        eval={"perplexity": f"{', '.join(a.corpora)}; 512-token windows, first {a.ppl_windows}",
              "zeroshot": f"{', '.join(a.tasks)}; first {a.limit} examples each; acc; unweighted average"},
        dtype="float32", device="cpu"))
    res = rf.data
    ensure_model(a.dense)

    init_data = {"calib": a.mask_init_data, "calib_samples": a.calib_samples, "calib_seqlen": a.calib_seqlen}

    def record(key, row):
        rf.record(key, row)
        print(key, json.dumps({k: v for k, v in row.items() if k not in ("calibration",)}), flush=True)

    def todo(key):
        return not rf.done(key) and key not in a.skip

    if todo("dense"):
        record("dense", {"model": a.dense, **evaluate(a.dense, a)})
    lora_dir = work / "lora"
    if todo("lora"):
        row = run_tune(a.dense, "lora", lora_dir, a, merge=True)
        record("lora", {"model": str(lora_dir), **row, **evaluate(lora_dir, a)})
    for r in a.ratios:
        key = f"pat:{r}"
        if todo(key):
            d = work / f"pat-{r}"
            row = run_tune(a.dense, "pat", d, a, ratio=r, mask_init="activation", mask_init_scale=a.mask_init_scale,
                           **init_data)
            record(key, {"model": str(d), "ratio": r, "mask_init": "activation", "mask_init_scale": a.mask_init_scale,
                         "identity_loss": True, "milestone": 1 / 3, **row, **evaluate(d, a)})
        key = f"channel:{r}"
        cdir = work / f"channel-{r}"
        if todo(key) or (todo(f"prune-then-tune:{r}") and not (cdir / "config.json").is_file()):
            info = channel_prune(a.dense, r, cdir, a)
            if todo(key):
                record(key, {"model": str(cdir), **info, **evaluate(cdir, a, zeroshot=a.untuned_zeroshot)})
        key = f"prune-then-tune:{r}"
        if todo(key):
            d = work / f"prune-then-tune-{r}"
            row = run_tune(cdir, "lora", d, a, merge=True)
            record(key, {"model": str(d), "ratio": r, **row, **evaluate(d, a)})
        key = f"tune-then-prune:{r}"
        if todo(key):
            d = work / f"tune-then-prune-{r}"
            info = channel_prune(lora_dir, r, d, a)
            record(key, {"model": str(d), **info, **evaluate(d, a)})
    for v in a.variant:
        name, r, scale, idl, *rest = v.split(":")
        key = f"pat-{name}:{float(r)}"
        if todo(key):
            d = work / f"pat-{name}-{r}"
            milestone = float(rest[0]) if rest and rest[0] else 1 / 3
            init = rest[1] if len(rest) > 1 else a.mask_init_data
            data_kw = {} if init == "train" else {**init_data, "calib": init}
            row = run_tune(a.dense, "pat", d, a, ratio=float(r), mask_init="activation", mask_init_scale=float(scale),
                           identity_loss=idl != "0", milestone_frac=milestone, **data_kw)
            record(key, {"model": str(d), "ratio": float(r), "mask_init": "activation", "mask_init_scale": float(scale),
                         "identity_loss": idl != "0", "milestone": milestone, **row, **evaluate(d, a)})
    for r in a.zero_init_ratios:  # the published zero init, after the main table
        key = f"pat-zero:{r}"
        if todo(key):
            d = work / f"pat-zero-{r}"
            row = run_tune(a.dense, "pat", d, a, ratio=r, mask_init="zero")
            record(key, {"model": str(d), "ratio": r, "mask_init": "zero", **row, **evaluate(d, a)})
    if todo("step_time") and a.timing_steps > 1:
        rf.record("step_time", step_time(a, work))
    print(markdown(res))


def _trainable(model_dir, method, **kw) -> int:
    from prunetune.io import load_model
    from prunetune.tuning.base import get_method

    net, _, _ = load_model(str(model_dir), dtype="float32", device="cpu")
    tm = get_method(method)(**kw)
    net = tm.prepare(net)
    return sum(p.numel() for p in tm.trainable_parameters(net))


def step_time(a, work) -> dict:
    """PAT (LoRA r=8 + HSMs) vs LoRA whose rank gives about the same number of trainable parameters."""
    r = 0.25
    n_pat = _trainable(a.dense, "pat", ratio=r)
    n_lora8 = _trainable(a.dense, "lora", r=8)
    rank = max(1, round(8 * n_pat / n_lora8))
    n_lora = _trainable(a.dense, "lora", r=rank)
    out = {"ratio": r, "steps": a.timing_steps, "pat_trainable": n_pat, "lora_rank": rank, "lora_trainable": n_lora}
    times = {}
    for rnd in range(2):  # interleaved: PAT, LoRA, PAT, LoRA
        for name, method, kw in (("pat", "pat", {"ratio": r, "mask_init": "activation"}),
                                 ("lora", "lora", {"r": rank})):
            rep = run_tune(a.dense, method, work / f"timing-{name}", a, steps=a.timing_steps, **kw)
            times.setdefault(name, []).append(rep["step_s_median"])
    out["pat_step_s"] = statistics.median(times["pat"])
    out["lora_step_s"] = statistics.median(times["lora"])
    out["ratio_pat_over_lora"] = out["pat_step_s"] / out["lora_step_s"]
    print("step_time", json.dumps(out), flush=True)
    return out


def _hidden(model_dir) -> str:
    try:
        return str(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError):
        return "?"


def _avg_without(r: dict, task: str) -> float:
    """Zero-shot average without one task (BoolQ's yes/no prior flips between models and dominates small samples)."""
    accs = [v for t, v in r["zeroshot"].items() if t != task]
    return sum(accs) / len(accs)


def pat_label(r: dict) -> str:
    """A PAT row's configuration in words: warm-start data, mask spread, identity loss, milestone."""
    src = ((r.get("pat") or {}).get("mask_init") or {}).get("source")
    if isinstance(src, dict):
        src = f"{src['source']['name'].upper() if len(src['source']['name']) <= 3 else src['source']['name']} " \
              f"{src['nsamples']} x {src['seqlen']}"
    else:
        src = "64 training examples"
    parts = [f"warm start {src}", f"spread {r.get('mask_init_scale', 0.5)}"]
    if not r.get("identity_loss", True):
        parts.append("no identity loss")
    if abs(r.get("milestone", 1 / 3) - 1 / 3) > 1e-9:
        parts.append(f"milestone {r['milestone']:g}")
    return f"PAT ({', '.join(parts)})"


def markdown(res: dict) -> str:
    runs = res["runs"]
    dense = runs.get("dense")
    if dense is None:
        return "(no results yet)"
    corpora = list(dense["ppl"])
    zs = "zeroshot_avg" in dense
    head = ["ratio", "method", "hidden", "params (M)"] + [f"{c} ppl" for c in corpora] \
        + (["zero-shot avg", "avg w/o BoolQ"] if zs else []) + ["train s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(ratio, label, r):
        hid = r.get("hidden_size") or (r.get("pat") or {}).get("hidden_size") or _hidden(r["model"])
        cells = [ratio, label, str(hid), f"{(r.get('parameters') or 0) / 1e6:.1f}"]
        cells += [f"{r['ppl'][c]:.2f}" for c in corpora]
        if zs:
            cells.append(f"{r['zeroshot_avg']:.4f}" if "zeroshot_avg" in r else "-")
            cells.append(f"{_avg_without(r, 'boolq'):.4f}" if "zeroshot" in r else "-")
        cells.append(f"{r['step_s_median']:.2f}" if r.get("step_s_median") else "-")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("0", "dense", dense))
    if "lora" in runs:
        lines.append(row("0", "LoRA (ceiling)", runs["lora"]))
    ratios = sorted({k.split(":", 1)[1] for k in runs if k.startswith(("pat:", "pat-zero:", "channel:"))}, key=float)
    for rt in ratios:
        for m, label in (("channel", "channel prune, no tuning"), ("tune-then-prune", "tune-then-prune"),
                         ("prune-then-tune", "prune-then-tune"), ("pat-zero", "PAT, W_M = 0 init (as published)")):
            if f"{m}:{rt}" in runs:
                lines.append(row(rt, label, runs[f"{m}:{rt}"]))
        for k, r in runs.items():
            if k.startswith("pat") and not k.startswith("pat-zero:") and k.split(":", 1)[1] == rt:
                label = pat_label(r)
                lines.append(row(rt, f"**{label}**" if k == f"pat:{rt}" else label, r))
    st = runs.get("step_time")
    if st:
        lines.append("")
        lines.append(f"Step time, same data and batch, {st['steps']} steps each (interleaved twice, median): PAT "
                     f"(ratio {st['ratio']}, {st['pat_trainable'] / 1e6:.2f}M trainable) {st['pat_step_s']:.2f} s vs "
                     f"LoRA r={st['lora_rank']} ({st['lora_trainable'] / 1e6:.2f}M trainable) {st['lora_step_s']:.2f} s: "
                     f"**{st['ratio_pat_over_lora']:.2f}x**")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
