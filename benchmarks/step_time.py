#!/usr/bin/env python3
"""Training step time of SPP vs LoRA on one pruned model, measured interleaved in one process.

    python benchmarks/step_time.py --model runs/bench/apt-0.5 --steps 6 --rounds 2 --threads 2 \
        --out benchmarks/results/step_time_smollm2.json

Each configuration runs ``--steps`` optimiser steps of ``prunetune tune`` on the same packed C4 text windows
(batch ``--batch-size`` × ``--seq-len`` tokens, seed 0); the median step time excludes each run's first step.
Configurations run round-robin ``--rounds`` times so that drift of the machine hits all of them alike.
Ratios are to LoRA r=8.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import prunetune as pt  # noqa: E402
from prunetune.manifest import write_json_atomic  # noqa: E402
from bench_common import c4_train_file, run_protocol  # noqa: E402

CONFIGS = {
    "lora r=8": ("lora", {}),
    "spp, dropout 0.05 (adapter path: a second full-size matmul)": ("spp", {}),
    "spp, dropout 0 (fused: one matmul with the merged weight)": ("spp", {"dropout": 0.0}),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "bench" / "apt-0.5"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time_smollm2.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    trainable: dict[str, int] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as td:
        data = c4_train_file("1000-1199", td)
        for _ in range(a.rounds):
            for name, (method, kw) in CONFIGS.items():
                rep = pt.tune(a.model, method=method, data=str(data), out=Path(td) / "run", seq_len=a.seq_len,
                              batch_size=a.batch_size, max_steps=a.steps, seed=0, eval_size=4, data_mode="text",
                              checkpoint_every=0, overwrite=True, device="cpu", progress=False, **kw)
                times[name] += [h["step_s"] for h in rep["history"][1:]]
                trainable[name] = rep["trainable_parameters"]
                print(name, [round(h["step_s"], 2) for h in rep["history"]], flush=True)
    base = statistics.median(times["lora r=8"])
    # flat, as the committed result: the settings, versions, machine and command beside the results
    res = {**run_protocol("step_time.py", model=a.model, steps=a.steps, rounds=a.rounds, batch_size=a.batch_size,
                          seq_len=a.seq_len, threads=torch.get_num_threads(),
                          data="C4 validation documents 1000-1199, packed text windows"),
           "results": {k: {"step_s_median": statistics.median(v), "steps_timed": len(v),
                           "trainable_parameters": trainable[k], "x_lora": statistics.median(v) / base}
                       for k, v in times.items()},
           "wall_time_s": round(time.time() - t0, 1)}
    write_json_atomic(Path(a.out), res)
    for k, v in res["results"].items():
        print(f"| {k} | {v['trainable_parameters']:,} | {v['step_s_median']:.2f} | {v['x_lora']:.2f} |")


if __name__ == "__main__":
    main()
