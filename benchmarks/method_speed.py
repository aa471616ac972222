#!/usr/bin/env python3
"""Speed and layer error of the pruning maths on the 7 linear shapes of one SmolLM2-135M layer.

    python benchmarks/method_speed.py --out benchmarks/results/method_speed.json

Compares prunetune's sparsegpt and apt with a straightforward implementation of the published SparseGPT
algorithm (Frantar & Alistarh 2023, block 128, lazy batch updates; written out below as the yardstick),
on the same H (from 128 x 512 tokens of correlated synthetic activations), each with its default dampening
(APT: 0.03, the others 0.01).
Reported: seconds per shape (median of --repeats), relative layer error tr(dW H dW^T) / tr(W H W^T).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prunetune.pruning.hessian import relative_layer_error
from prunetune.pruning.masks import parse_sparsity
from prunetune.pruning.methods import get_method
from bench_common import ResultFile, run_protocol  # noqa: E402
from reference_sparsegpt import fasterprune  # noqa: E402

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def reference_sparsegpt(W, H, sparsity=None, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """The published algorithm, straightforwardly: the reference code's transcription that the tests check."""
    return fasterprune(W.float(), H, sparsity, prunen, prunem, blocksize, percdamp)


def make_h(in_features, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features ** 0.5
    scale = torch.rand(in_features, generator=g) * 3 + 0.1
    X = (torch.randn(tokens, in_features, generator=g) @ mix) * scale
    return (2 / tokens) * (X.T.double() @ X.double()).float()


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="*", default=["0.5", "2:4"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128 * 512)
    ap.add_argument("--out", default="benchmarks/results/method_speed.json")
    a = ap.parse_args()
    damp = {"reference": 0.01, **{m: get_method(m).damp for m in ("sparsegpt", "apt")}}  # each method's default
    res = ResultFile(a.out, run_protocol("method_speed.py", shapes=SHAPES, tokens=a.tokens, damp=damp, blocksize=128,
                                         repeats=a.repeats, H="2/N X^T X of correlated synthetic activations"),
                     rows="results")
    Hs = {n: make_h(n_in, a.tokens, i) for i, (n, (_, n_in)) in enumerate(SHAPES.items())}
    for setting in a.settings:
        spec = parse_sparsity(setting)
        row = {"reference": 0.0, "sparsegpt": 0.0, "apt": 0.0, "err": {"reference": [], "sparsegpt": [], "apt": []}}
        for i, (name, (n_out, n_in)) in enumerate(SHAPES.items()):
            W = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(100 + i)) * 0.02
            H = Hs[name]
            kw = dict(sparsity=spec.sparsity) if spec.kind == "unstructured" else dict(prunen=spec.m - spec.n, prunem=spec.m)
            t, Wr = timed(lambda: reference_sparsegpt(W, H, **kw), a.repeats)
            row["reference"] += t
            row["err"]["reference"].append(relative_layer_error(W, Wr, H))
            for m in ("sparsegpt", "apt"):
                fn = get_method(m).fn
                t, Wm = timed(lambda: fn(W, H, spec), a.repeats)
                row[m] += t
                row["err"][m].append(relative_layer_error(W, Wm, H))
        row["err"] = {k: statistics.mean(v) for k, v in row["err"].items()}
        row["sparsegpt_vs_reference_time"] = row["sparsegpt"] / row["reference"]
        row["apt_vs_sparsegpt_time"] = row["apt"] / row["sparsegpt"]
        row["apt_vs_sparsegpt_error"] = row["err"]["apt"] / row["err"]["sparsegpt"]
        res.record(setting, row)
        print(setting, row, flush=True)


if __name__ == "__main__":
    main()
