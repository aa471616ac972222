#!/usr/bin/env python3
"""Speed and layer error of the pruning maths on the 7 linear shapes of one SmolLM2-135M layer.

    python benchmarks/method_speed.py --out benchmarks/results/method_speed.json

Compares prunetune's sparsegpt and apt with a straightforward implementation of the published SparseGPT
algorithm (Frantar & Alistarh 2023, block 128, lazy batch updates; written out below as the yardstick),
on the same H (from 128 x 512 tokens of correlated synthetic activations) and the same dampening.
Reported: seconds per shape (median of --repeats), relative layer error tr(dW H dW^T) / tr(W H W^T).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from prunetune.manifest import machine, versions, write_json_atomic
from prunetune.pruning.hessian import relative_layer_error
from prunetune.pruning.masks import parse_sparsity
from prunetune.pruning.methods import get_method

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def reference_sparsegpt(W, H, sparsity=None, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """The published algorithm, straightforwardly (as in the authors' reference code)."""
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


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
    res = {"protocol": {"shapes": SHAPES, "tokens": a.tokens, "damp": 0.01, "blocksize": 128, "repeats": a.repeats,
                        "H": "2/N X^T X of correlated synthetic activations", "versions": versions(), "machine": machine()},
           "results": {}}
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
        res["results"][setting] = row
        print(setting, row, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out, res)


if __name__ == "__main__":
    main()
