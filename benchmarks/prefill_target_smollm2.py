#!/usr/bin/env python3
"""``shrink --target prefill`` on SmolLM2-135M: the layer-time curve it searches, the plans it picks, and the
prefill they really give in ``prunetune bench``.

    python benchmarks/prefill_target_smollm2.py --threads 2 --targets 0.2 0.25 0.3 --repeats 11 \
        --out benchmarks/results/prefill_target_smollm2.json

Run it on an otherwise idle machine: it measures time. Three parts, each recorded as it finishes:

- ``curve``: the clock of ``structured/prefill.py`` (one decoder layer at batch 8 x 128, dense and shrunk timed
  in back-to-back pairs) for MLP widths that are multiples of 64 and for the widths 8 and 1 above them: how
  much of the layer's time each width keeps, and whether the kernels' tiling makes time uneven in the width.
- ``plans``: for each target share of prefill time, the MLP plan the search picks (``plan_for_time``: aligned
  widths, a fit of time against weights) with the share the fit gives it and the share its own timing gives.
- ``bench``: the dense model and each picked plan as full checkpoints with random weights (time does not depend
  on the values) through ``prunetune bench`` (prefill 8 x 128, interleaved repeats): the share really removed.
- ``align``: the same for the MLP widths of ``--align-widths`` (the weight-sized plans at 20% and 33% before
  their widths were rounded to multiples of 8, and after): what an unaligned width costs in a whole model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench_common import ResultFile, ensure_model, run_protocol  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--targets", nargs="*", type=float, default=[0.2, 0.25, 0.3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="bench repeats (interleaved)")
    ap.add_argument("--parts", nargs="*", default=["curve", "plans", "bench", "align"])
    ap.add_argument("--align-widths", nargs="*", type=int, default=[1126, 1128, 860, 864])
    ap.add_argument("--work", default=str(ROOT / "runs" / "prefill-target"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prefill_target_smollm2.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import prunetune as pt
    from prunetune.structured.neurons import UnitPlan, new_config, params_removed_share
    from prunetune.structured.prefill import PREFILL_SHAPE, PrefillClock, plan_for_time

    ensure_model(a.model)
    cfg = AutoConfig.from_pretrained(a.model)
    rf = ResultFile(a.out, run_protocol("prefill_target_smollm2.py", model=Path(a.model).name, shape=list(PREFILL_SHAPE),
                                        threads=a.threads, dtype="float32", structure="mlp"), rows="parts")
    clock = PrefillClock(cfg)
    rf.set("clock", {"layer_ms": round(1e3 * clock.layer_s, 3), "rest_ms": round(1e3 * clock.rest_s, 3),
                     "pairs_per_plan": clock.pairs, "layers": clock.layers})
    inter = int(cfg.intermediate_size)

    if "curve" in a.parts and not rf.done("curve"):
        t0, rows = time.time(), []
        for width in range(inter - 64, 255, -64):
            for w in (width + 8, width + 1, width):
                m = clock.measure(UnitPlan(neurons=inter - w))
                rows.append({"width": w, "layer_time_vs_dense": m["layer_time_vs_dense"],
                             "prefill_share_removed": round(m["prefill_share_removed"], 4),
                             "weights_share_removed": round(params_removed_share(cfg, UnitPlan(neurons=inter - w)), 4)})
                print(rows[-1], flush=True)
        rf.record("curve", {"rows": rows, "wall_s": round(time.time() - t0, 1)})

    if "plans" in a.parts and not rf.done("plans"):
        t0, rows = time.time(), {}
        for share in a.targets:
            t1 = time.time()
            plan, search = plan_for_time(cfg, share, "mlp", clock.measure)
            rows[str(share)] = {"neurons_removed": plan.neurons, "width": inter - plan.neurons,
                                "weights_share_removed": params_removed_share(cfg, plan), **search,
                                "plans_timed": len(search["probes"]), "search_s": round(time.time() - t1, 1)}
            print(share, {k: v for k, v in rows[str(share)].items() if k != "probes"}, flush=True)
        rf.record("plans", {"targets": rows, "wall_s": round(time.time() - t0, 1)})

    def bench_widths(labelled: dict, work: Path) -> dict:
        """``{label: neurons removed}`` as random-weight checkpoints through ``prunetune bench``, dense first."""
        shutil.rmtree(work, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(a.model)
        dirs = {}
        for label, neurons in {"dense": 0, **labelled}.items():
            if neurons in [n for n, _ in dirs.values()]:  # two labels for the same plan: timed once
                continue
            c = cfg if neurons == 0 else new_config(cfg, UnitPlan(neurons=neurons))
            d = work / label.replace(" ", "_")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(c).save_pretrained(d)
            tok.save_pretrained(d)
            dirs[label] = (neurons, d)
        r = pt.bench([str(d) for _, d in dirs.values()], batch_sizes=(PREFILL_SHAPE[0],), seq_lens=(PREFILL_SHAPE[1],),
                     decode_tokens=2, repeats=a.repeats, threads=a.threads, device="cpu", progress=False,
                     memory_probe=False)
        shutil.rmtree(work, ignore_errors=True)
        rows = {}
        for (label, (neurons, d)), row in zip(dirs.items(), r["prefill"]):
            rows[label] = {"neurons_removed": neurons, "width": inter - neurons,
                           "weights_share_removed": params_removed_share(cfg, UnitPlan(neurons=neurons)) if neurons else 0,
                           "prefill_tokens_per_s": row["tokens_per_s"]["median"],
                           "speedup": row["ratio_to_first"]["tokens_per_s"],
                           "bench_prefill_share_removed": 1 - row["ratio_to_first"]["latency_s"]}
            print(label, rows[label], flush=True)
        return {"models": rows, "repeats": a.repeats, "bench_manifest": r["manifest"]}

    if "bench" in a.parts and not rf.done("bench"):
        plans = rf.runs["plans"]["targets"]
        res = bench_widths({f"target {s}": p["neurons_removed"] for s, p in plans.items()}, Path(a.work))
        for label, row in res["models"].items():
            if label != "dense":
                p = plans[label.split()[1]]
                row.update(fitted_prefill_share_removed=p["prefill_share_removed_fitted"],
                           clock_prefill_share_removed=p["prefill_share_removed_measured"])
        rf.record("bench", res)

    if "align" in a.parts and not rf.done("align"):
        rf.record("align", bench_widths({f"width {w}": inter - w for w in a.align_widths}, Path(a.work)))
    print(json.dumps({k: v for k, v in rf.runs.get("bench", {}).get("models", {}).items()}, indent=1))


if __name__ == "__main__":
    main()
