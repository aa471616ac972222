#!/usr/bin/env python3
"""Where the prefill time of a channel-shrunk model goes, against the dense one (CPU, torch.profiler).

    OMP_NUM_THREADS=1 python benchmarks/profile_shrunk.py runs/pat/pat-0.25 --batch-size 8 --seq-len 128

Shrinking the hidden size from d to k scales every linear layer by k/d (each has the hidden size as one of its
two dimensions), but not the parts whose width is the number of heads x head_dim or the MLP width: the attention
core (scores, softmax, weighted sum), rotary embeddings, the SiLU gate product. This script runs the same
prefill forward on both models, alternately, under ``torch.profiler``, sums the self CPU time of every operator into those
groups and reports each group's time, its share, and its dense/shrunk ratio, so the gap between the measured
speed-up and the ideal ``d / k`` is attributed to named operations. Result: benchmarks/results/profile_shrunk.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

GROUPS = {  # operator name -> group (first match on a substring; the rest is "other")
    "linear (matmuls of the projections and LM head)": ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear",
                                                         "aten::bmm"),
    "attention core (SDPA: scores, softmax, weighted sum)": ("scaled_dot_product", "_flash_attention",
                                                             "aten::_softmax", "aten::softmax", "_efficient_attention"),
    "elementwise (norms, rotary, SiLU, residual adds)": ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt",
                                                         "aten::pow", "aten::mean", "aten::neg", "aten::cat",
                                                         "aten::cos", "aten::sin", "aten::div", "aten::sub"),
    "copies and layout (views, transposes, contiguous)": ("aten::copy_", "aten::clone", "aten::contiguous",
                                                          "aten::to", "aten::_to_copy", "aten::empty", "aten::view",
                                                          "aten::transpose", "aten::reshape", "aten::expand",
                                                          "aten::slice", "aten::t", "aten::unsqueeze"),
}


def group_of(name: str) -> str:
    for g, keys in GROUPS.items():
        if any(k in name for k in keys):
            return g
    return "other"


def _load(model_dir: str):
    from prunetune.io import load_model

    model, _, _ = load_model(model_dir, dtype="float32", device="cpu")
    return model.eval()


def _profile_once(model, ids) -> tuple[dict, dict, dict]:
    """One profiled prefill forward: self CPU ms per group, per operator, and per matrix-product shape."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                        record_shapes=True) as prof:
        model(input_ids=ids, use_cache=False)
    groups: dict[str, float] = {}
    ops: dict[str, float] = {}
    for ev in prof.key_averages():
        g = group_of(ev.key)
        groups[g] = groups.get(g, 0.0) + ev.self_cpu_time_total / 1e3
        ops[ev.key] = ev.self_cpu_time_total / 1e3
    mm = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key == "aten::mm" and len(ev.input_shapes) >= 2 and len(ev.input_shapes[0]) == 2:
            (m, kk), (_, n) = ev.input_shapes[0], ev.input_shapes[1]
            mm[f"{m}x{kk} @ {kk}x{n}"] = (ev.self_cpu_time_total / 1e3, ev.count, 2 * m * kk * n)
    return groups, ops, mm


def profile_pair(dense_dir: str, shrunk_dir: str, batch: int, seq: int, rounds: int) -> dict:
    """Dense and shrunk profiled alternately, ``rounds`` times each (the machine's drift hits both alike);
    every figure is the median over the rounds."""
    import statistics

    models = {"dense": _load(dense_dir), "shrunk": _load(shrunk_dir)}
    vocab = models["dense"].config.vocab_size  # the shrink keeps the vocabulary
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    runs = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(input_ids=ids, use_cache=False)
    for _ in range(rounds):
        for name, m in models.items():
            runs[name].append(_profile_once(m, ids))
    out = {}
    for name, rs in runs.items():
        groups = {g: statistics.median(r[0].get(g, 0.0) for r in rs) for g in set().union(*(r[0] for r in rs))}
        ops = {o: statistics.median(r[1].get(o, 0.0) for r in rs) for o in set().union(*(r[1] for r in rs))}
        mm = {}
        for shape in set().union(*(r[2] for r in rs)):
            ms = statistics.median(r[2][shape][0] for r in rs if shape in r[2])
            _, calls, flop = next(r[2][shape] for r in rs if shape in r[2])
            mm[shape] = {"ms": ms, "calls": calls, "gflops": flop * calls / (ms * 1e-3) / 1e9 if ms else None}
        totals = [sum(r[0].values()) for r in rs]
        out[name] = {"model": dense_dir if name == "dense" else shrunk_dir,
                     "hidden_size": models[name].config.hidden_size, "total_ms": statistics.median(totals),
                     "total_ms_per_round": totals, "groups_ms": groups,
                     "top_ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12]),
                     "mm_by_shape": dict(sorted(mm.items(), key=lambda kv: -kv[1]["ms"]))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shrunk")
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9, help="profiled forwards per model, alternating")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_shrunk.json"))
    a = ap.parse_args()
    from bench_common import run_protocol
    from prunetune.manifest import write_json_atomic

    pair = profile_pair(a.dense, a.shrunk, a.batch_size, a.seq_len, a.repeats)
    dense, shrunk = pair["dense"], pair["shrunk"]
    rows = {}
    for g in sorted(set(dense["groups_ms"]) | set(shrunk["groups_ms"]), key=lambda g: -dense["groups_ms"].get(g, 0)):
        dm, sm = dense["groups_ms"].get(g, 0.0), shrunk["groups_ms"].get(g, 0.0)
        rows[g] = {"dense_ms": dm, "shrunk_ms": sm, "dense_share": dm / dense["total_ms"],
                   "speedup": dm / sm if sm else None}
    ideal = dense["hidden_size"] / shrunk["hidden_size"]
    res = {"protocol": run_protocol(
               "profile_shrunk.py", batch_size=a.batch_size, seq_len=a.seq_len, repeats=a.repeats, dtype="float32",
               device="cpu", threads=torch.get_num_threads(),
               timer="torch.profiler self CPU time per forward; dense and shrunk alternate, median over repeats"),
           "ideal_speedup": ideal, "speedup_total": dense["total_ms"] / shrunk["total_ms"], "groups": rows,
           "dense": dense, "shrunk": shrunk}
    write_json_atomic(Path(a.out), res)
    print(f"prefill {a.batch_size} x {a.seq_len}: dense {dense['total_ms']:.1f} ms, shrunk {shrunk['total_ms']:.1f} ms, "
          f"speed-up {res['speedup_total']:.3f}x (ideal for the linears {ideal:.3f}x)")
    print("| group | dense ms | share of dense | shrunk ms | speed-up |\n|---|---|---|---|---|")
    for g, r in rows.items():
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"| {g} | {r['dense_ms']:.1f} | {r['dense_share']:.1%} | {r['shrunk_ms']:.1f} | {sp} |")
    for name in ("dense", "shrunk"):
        print(f"\n{name}: matrix products by shape (per forward)\n| shape | calls | ms | GFLOP/s |\n|---|---|---|---|")
        for shape, r in res[name]["mm_by_shape"].items():
            print(f"| {shape} | {r['calls']:.0f} | {r['ms']:.1f} | {r['gflops']:.1f} |")


if __name__ == "__main__":
    main()
