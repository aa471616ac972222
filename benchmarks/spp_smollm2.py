#!/usr/bin/env python3
"""Recovery fine-tuning of pruned SmolLM2-135M-Instruct: SPP vs LoRA vs masked-merge LoRA, same budget.

    python benchmarks/spp_smollm2.py --pruned runs/bench/apt-0.5 runs/bench/apt-2of4 --steps 40 \
        --out benchmarks/results/spp_smollm2.json

For each pruned model (outputs of benchmarks/prune_smollm2.py) and each method, one run with identical data,
steps, batch, sequence length and seed; the merged plain checkpoint is then evaluated: WikiText-2 and C4
perplexity (512-token windows, the first ``--ppl-windows`` of each) and the zero-shot average (``--tasks``,
first ``--limit`` examples each, ``acc``). Training data: C4 validation documents ``--train-docs`` (default
1000-1999: disjoint from the documents the C4 perplexity windows read, which come from the start of the
file), packed into ``--seq-len`` windows: language-model recovery. Recovered share of the gap =
(pruned − tuned) / (pruned − dense), per metric. Step time: median seconds per optimiser step (first step
excluded) from the run's own history, SPP relative to LoRA. Results are appended as runs finish, so a
killed benchmark continues where it stopped; ``--markdown`` prints the table of a result file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import prunetune as pt  # noqa: E402
from bench_common import ResultFile, c4_train_file, ensure_model, run_protocol  # noqa: E402

TASKS = ["arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "openbookqa"]


def evaluate(model_dir, a) -> dict:
    r = pt.evaluate(str(model_dir), ppl=a.corpora, seqlen=512, max_windows=a.ppl_windows or None, tasks=a.tasks,
                    limit=a.limit, device="cpu", progress=False)
    zs = r["zeroshot"]
    return {"ppl": {c: v["ppl"] for c, v in r["perplexity"].items()},
            "zeroshot": {t: v["acc"] for t, v in zs["tasks"].items()}, "zeroshot_avg": zs["average"]["acc"],
            "eval_wall_s": r["manifest"]["wall_time_s"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--pruned", nargs="+", default=[str(ROOT / "runs" / "bench" / "apt-0.5"),
                                                    str(ROOT / "runs" / "bench" / "apt-2of4")])
    ap.add_argument("--methods", nargs="*", default=["spp", "lora", "lora-masked"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--train-docs", default="1000-1999", help="C4 validation documents used for training (lo-hi)")
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"])
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--work", default=str(ROOT / "runs" / "spp"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spp_smollm2.json"))
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    data = c4_train_file(a.train_docs, a.work)
    rf = ResultFile(out, run_protocol(
        "spp_smollm2.py", dense=a.dense, pruned=a.pruned, methods=a.methods,
        training={"data": f"C4 validation documents {a.train_docs} (text, packed {a.seq_len}-token windows)",
                     "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "seed": 0,
                     "lr": "method defaults (spp 4e-3, lora 2e-4), cosine, no warm-up",
                     "adapters": "spp g=16 r=16 alpha=32 dropout 0.05; lora r=8 alpha=16 dropout 0.05; "
                                 "q/k/v/o/gate/up/down of every layer"},
        eval={"perplexity": f"{', '.join(a.corpora)}; 512-token windows, first {a.ppl_windows}",
              "zeroshot": f"{', '.join(a.tasks)}; first {a.limit} examples each; acc; unweighted average"},
        dtype="float32", device="cpu"))
    ensure_model(a.dense)
    for name, path in [("dense", a.dense)] + [(f"pruned:{Path(p).name}", p) for p in a.pruned]:
        if not rf.done(name):
            rf.record(name, {"model": path, **evaluate(path, a)})
            print(name, json.dumps(rf.runs[name]), flush=True)
    for p in a.pruned:
        for method in a.methods:
            key = f"{method}:{Path(p).name}"
            if rf.done(key):
                continue
            d = Path(a.work) / key.replace(":", "-")
            t = time.time()
            rep = pt.tune(p, method=method, data=str(data), out=d, seq_len=a.seq_len, batch_size=a.batch_size,
                          max_steps=a.steps, seed=0, merge=True, eval_size=16, data_mode="text",
                          checkpoint_every=0, overwrite=True, device="cpu", progress=False)
            hist = rep["history"]
            step_s = [h["step_s"] for h in hist[1:]]
            row = {"model": str(d), "base": p, "method": method, "train_wall_s": time.time() - t,
                   "step_s_median": statistics.median(step_s), "first_loss": rep["first_loss"],
                   "final_loss": rep["final_loss"], "final_eval_loss": rep["final_eval_loss"],
                   "sparsity": rep.get("sparsity"), "zero_pattern_check": rep.get("zero_pattern_check"),
                   "peak_rss_mb": rep["manifest"]["peak_rss_mb"]}
            row.update(evaluate(d, a))
            rf.record(key, row)
            print(key, json.dumps({k: v for k, v in row.items() if k != "zero_pattern_check"}), flush=True)
    print(markdown(rf.data))


def _gap(dense, pruned, tuned, higher_better=False):
    span = (dense - pruned) if higher_better else (pruned - dense)
    if abs(span) < 1e-12:
        return None
    return ((tuned - pruned) if higher_better else (pruned - tuned)) / span


def _no_boolq(r: dict) -> float:
    """Zero-shot average without BoolQ, whose yes/no prior flips between models and dominates small samples."""
    accs = [v for t, v in r["zeroshot"].items() if t != "boolq"]
    return sum(accs) / len(accs)


def markdown(res: dict) -> str:
    runs = res["runs"]
    dense = runs["dense"]
    corpora = list(dense["ppl"])
    head = ["model", "method"] + [f"{c} ppl" for c in corpora] + ["zero-shot avg", "avg w/o BoolQ"] \
        + [f"gap recovered ({c})" for c in corpora] + ["gap recovered (zero-shot w/o BoolQ)", "sparsity after merge",
                                                        "s/step", "x LoRA step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label, method, r, base=None):
        cells = [label, method] + [f"{r['ppl'][c]:.2f}" for c in corpora] + [f"{r['zeroshot_avg']:.4f}",
                                                                             f"{_no_boolq(r):.4f}"]
        if base is None:
            cells += ["-"] * (len(corpora) + 1)
        else:
            for c in corpora:
                g = _gap(dense["ppl"][c], base["ppl"][c], r["ppl"][c])
                cells.append("-" if g is None else f"{g:.0%}")
            g = _gap(_no_boolq(dense), _no_boolq(base), _no_boolq(r), higher_better=True)
            cells.append("-" if g is None else f"{g:.0%}")
        sp = (r.get("sparsity") or {}).get("after_merge")
        cells.append("-" if sp is None else f"{sp:.4f}")
        cells.append(f"{r['step_s_median']:.2f}" if "step_s_median" in r else "-")
        lora = runs.get(f"lora:{Path(r.get('base', '')).name}")
        cells.append(f"{r['step_s_median'] / lora['step_s_median']:.2f}" if lora and "step_s_median" in r else "-")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("SmolLM2-135M", "dense", dense))
    for key, r in runs.items():
        if key.startswith("pruned:"):
            name = key.split(":", 1)[1]
            lines.append(row(name, "pruned, no tuning", r))
            for k2, r2 in runs.items():
                if ":" in k2 and not k2.startswith("pruned:") and k2.split(":", 1)[1] == name:
                    lines.append(row(name, r2["method"], r2, base=r))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
