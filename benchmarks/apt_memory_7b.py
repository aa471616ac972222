#!/usr/bin/env python3
"""Memory of one 7B-shaped matrix pruned by SparseGPT and by APT's default (ADMM mask + exact refit), phase by phase.

    python benchmarks/apt_memory_7b.py --out benchmarks/results/apt_memory_7b.json

A random weight of a Llama-2-7B MLP shape (gate_proj 11008 x 4096, down_proj 4096 x 11008) and a correlated H
(2 X Xᵀ / N from 2·in random samples, an eighth of the inputs 10x larger), float32, 1 thread. Reported: the peak
resident memory of each phase above what the process held before it (VmHWM reset before each) and above the
inputs W and H alone (``peak_above_inputs_mb``: what the method adds to a caller's peak, the number to set
against SparseGPT's whole-method row). APT's phases are its default path: H dampened in place (put back at the
end), W not copied, SparseGPT for the error to beat, ADMM, the refit's preconditioner, the refit written over
ADMM's iterate. ADMM runs ``--admm-iter`` iterations (every iteration holds the same buffers, so a few show
the peak); the refit (CG from ADMM's iterate) is run for gate_proj only (``--refit``), since from an unconverged
ADMM start it takes long at 11008 inputs; for the others only its largest allocation (the CG preconditioner, one
in x in) is measured, with the rest of the refit's memory (CG state in ~4M-element chunks) from gate_proj's run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
from pathlib import Path

import torch

from bench_common import run_protocol
from prunetune.manifest import write_json_atomic
from prunetune.pruning.admm import admm_mask
from prunetune.pruning.hessian import prepare_hessian
from prunetune.pruning.masks import num_pruned, parse_sparsity
from prunetune.pruning.methods import get_method
from prunetune.pruning.methods.apt import APT_DAMP, cg_preconditioner, exact_solve
from prunetune.pruning.methods.sparsegpt import sparsegpt_prune

SHAPES = {"gate_proj": (11008, 4096), "down_proj": (4096, 11008)}


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def _phase(name, fn, out, inputs):
    base = _reset()
    t = time.time()
    res = fn()
    peak = _status("VmHWM")
    out[name] = {"peak_above_mb": round(peak - base, 1), "peak_above_inputs_mb": round(peak - inputs, 1),
                 "time_s": round(time.time() - t, 1)}
    print(name, out[name], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--admm-iter", type=int, default=3)
    ap.add_argument("--refit", nargs="*", default=["gate_proj"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                                         / "apt_memory_7b.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    spec = parse_sparsity(a.sparsity)
    res = {"protocol": run_protocol("apt_memory_7b.py", shapes={k: SHAPES[k] for k in a.shapes}, sparsity=a.sparsity,
                                    dtype="float32", admm_iter=a.admm_iter, threads=1)}
    for name in a.shapes:
        rows, cols = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        W = torch.randn(rows, cols, generator=g) * 0.02
        X = torch.randn(cols, 2 * cols, generator=g)
        X[: cols // 8] *= 10
        H = 2 * (X @ X.t()) / X.shape[1]
        del X
        r = {"weight_mb": round(W.numel() * 4 / 2**20, 1), "h_mb": round(H.numel() * 4 / 2**20, 1)}
        inputs = _reset()
        _phase("sparsegpt (whole method)", lambda: get_method("sparsegpt").fn(W, H, spec), r, inputs)
        prep = _phase("apt: prepare H (in place, SparseGPT's factor)",
                      lambda: prepare_hessian(H, W, APT_DAMP, upper_inverse=True, in_place=True), r, inputs)
        _phase("apt: SparseGPT's mask for the error to beat",
               lambda: sparsegpt_prune(W, H, spec, prepared=prep)[0], r, inputs)
        prep.U = None
        keep = rows * cols - num_pruned(rows * cols, spec.sparsity)
        mask, last, _ = _phase("apt: ADMM mask", lambda: admm_mask(prep.W, prep.H, keep=keep, max_iter=a.admm_iter,
                                                                    min_iter=1), r, inputs)
        mask |= prep.dead
        if name in a.refit:
            _phase("apt: exact refit (CG from ADMM's iterate, written over it)",
                   lambda: exact_solve(prep.W, prep.H, mask, x0=last, overwrite_x0=True), r, inputs)
        else:
            _phase("apt: refit's CG preconditioner", lambda: cg_preconditioner(prep.H), r, inputs)
        prep.restore()
        res[name] = r
        del prep, mask, last
    write_json_atomic(Path(a.out), res)


if __name__ == "__main__":
    main()
