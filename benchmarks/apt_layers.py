#!/usr/bin/env python3
"""Mask choice on real SmolLM2-135M layers: SparseGPT, APT with SparseGPT's mask re-solved and APT with the ADMM
mask (the default), layer error on the calibration domain and on another one, and method time, same layers,
same process.

    python benchmarks/apt_layers.py --settings 0.7 2:4 0.5 --out benchmarks/results/apt_layers_smollm2.json
    python benchmarks/apt_layers.py --settings 0.7 2:4 0.5 --variants sparsegpt apt-sparsegpt apt-direct \
        --out benchmarks/results/apt_refit_smollm2.json     # how far select=sparsegpt's CG refit is from exact

    python benchmarks/apt_layers.py --calib tinystories --score wikitext2 c4 --seqlen 256 --settings 0.7 2:4 \
        --variants sparsegpt apt-admm apt-admm-d0.03 apt-admm-d0.1 apt-admm-d0.3 apt-admm-d1 \
        --out benchmarks/results/apt_layers_tinystories.json   # far from the calibration domain: more dampening?

Variants marked exact (``apt-admm``, ``apt-admm-row``, ``apt-direct``) also get ``refit_gap``: how far their
float32 result is above the float64 direct optimum for their own mask.

Protocol: the inputs of q_proj, o_proj, gate_proj and down_proj of layers 0, 8, 16, 24 and 29 of the dense model
(not the sequentially pruned one: every method sees the same H), captured on ``--nsamples`` x ``--seqlen`` tokens
of C4 (the calibration domain: every method's H; ``--calib``) and, separately, of WikiText-2 (another domain:
only scored; ``--score``).
H = 2 X Xᵀ / N in float64, cast to float32; each method runs in float32 as shipped (dampening 0.01, or X for
the ``-dX`` variants; block 128). Reported per setting: the mean over the 20 linears of each method's layer error relative to SparseGPT's,
under the C4 H (what the methods minimise) and the WikiText-2 H (does the gain carry over?), and the summed
method time relative to SparseGPT's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from prunetune.io import load_model  # noqa: E402
from prunetune.pruning.hessian import layer_error  # noqa: E402
from prunetune.pruning.masks import parse_sparsity  # noqa: E402
from prunetune.pruning.methods import get_method  # noqa: E402
from bench_common import ResultFile, run_protocol  # noqa: E402

LAYERS = [0, 8, 16, 24, 29]
LINEARS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
#: "apt" in results made before APT's default became select="admm" is "apt-sparsegpt" here; every variant names
#: its dampening (APT's default became 0.03 after the results with 0.01 were taken) and its ADMM dual (the
#: default became "rescale" after these results were taken with "keep"; "apt-admm-dual" is the rescaled one)
VARIANTS = {"sparsegpt": ("sparsegpt", {"damp": 0.01}), "apt-sparsegpt": ("apt", {"select": "sparsegpt", "damp": 0.01}),
            "apt-admm": ("apt", {"select": "admm", "damp": 0.01, "admm_dual": "keep"}),
            "apt-admm-row": ("apt", {"select": "admm", "admm_scope": "row", "damp": 0.01, "admm_dual": "keep"}),
            "apt-direct": ("apt", {"select": "sparsegpt", "solver": "direct", "damp": 0.01}),  # exact, SparseGPT's mask
            # the ADMM mask with more dampening (a ridge pulling kept weights toward their values), mask and refit
            **{f"apt-admm-d{d}": ("apt", {"select": "admm", "damp": float(d), "admm_dual": "keep"})
               for d in ("0.03", "0.1", "0.3", "1")},
            # where the ALPS authors' code differs from APT's ADMM (pruning/admm.py), one choice at a time
            "apt-admm-iterate": ("apt", {"select": "admm", "damp": 0.01, "admm_dual": "keep",
                                         "admm_support": "iterate"}),
            "apt-admm-alps-rho": ("apt", {"select": "admm", "damp": 0.01, "admm_dual": "keep",
                                          "admm_schedule": "alps"}),
            "apt-admm-alps-both": ("apt", {"select": "admm", "damp": 0.01, "admm_dual": "keep",
                                           "admm_support": "iterate",
                                           "admm_schedule": "alps"}),
            "apt-admm-dual": ("apt", {"select": "admm", "damp": 0.01, "admm_dual": "rescale"}),
            "apt-admm-dual-alps": ("apt", {"select": "admm", "damp": 0.01, "admm_dual": "rescale",
                                           "admm_schedule": "alps", "admm_support": "iterate"}),
            **{f"apt-admm-cg{k}": ("apt", {"select": "admm", "damp": 0.01, "admm_dual": "keep", "refit_iter": k})
               for k in (3, 10, 30)},
            # the authors' own ALPS_admm (mazumder-lab/ALPS alps.py, --alps-dir) on the same W and H
            "alps": ("alps", {"damp": 0.01})}
#: variants whose refit is documented as exact: their float32 result is compared with the float64 direct optimum
#: for their own mask (``refit_gap``: relative excess of the dampened layer error)
EXACT = ("apt-admm", "apt-admm-row", "apt-direct", "apt-admm-d0.03")


def capture(model_dir: str, nsamples: int, seqlen: int, cache: Path, corpora=("c4", "wikitext2")) -> dict:
    """{(corpus, layer, linear): H (float32)} and {("W", layer, linear): weight}, cached in ``cache``."""
    if cache.is_file():
        D = torch.load(cache)
        if all((c, LAYERS[0], LINEARS[0]) in D for c in corpora):
            return D
    from prunetune.data.calibration import sample_calibration

    m, tok, _ = load_model(model_dir, dtype="float32", device="cpu")
    out = {}
    for corpus in corpora:
        ids, _ = sample_calibration(tok, corpus, nsamples, seqlen, seed=0)
        acc, hooks = {}, []
        for li in LAYERS:
            for n in LINEARS:
                def hook(mod, a, key=(li, n)):
                    x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
                    acc[key] = acc.get(key, 0) + x.t() @ x
                hooks.append(m.model.layers[li].get_submodule(n).register_forward_pre_hook(hook))
        with torch.no_grad():
            for b in ids.split(8):
                m.model(input_ids=b)
        for h in hooks:
            h.remove()
        for k, v in acc.items():
            out[(corpus,) + k] = (2 * v / ids.numel()).float()
    for li in LAYERS:
        for n in LINEARS:
            out[("W", li, n)] = m.model.layers[li].get_submodule(n).weight.detach().clone()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def alps_reference(alps_dir: Path):
    """``fn(W, H, spec) -> W'``: the authors' ``ALPS_prune.ALPS_admm`` (rho 0.1, its defaults) on one matrix."""
    from alps_smollm2 import load_alps, sparsity_args

    mod = load_alps(alps_dir)

    def fn(W, H, spec, **_):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data = W.clone()
        pr = mod.ALPS_prune(lin, nsamples=1, seqlen=1)
        pr.XtX = H.float().clone()  # its own damping and normalisation are scale-free
        pr.ALPS_admm(**sparsity_args(str(spec) if spec.is_nm else str(spec.sparsity)), rho=0.1)
        return lin.weight.data.clone()

    return fn


def refit_gap(W, H, W_new, damp: float) -> float:
    """How far a float32 refit is above the float64 direct optimum for its own mask (H dampened by ``damp``)."""
    from prunetune.pruning.hessian import prepare_hessian
    from prunetune.pruning.methods.apt import exact_solve

    prep = prepare_hessian(H.double(), W.double(), damp)
    opt = exact_solve(prep.W, prep.H, W_new == 0, solver="direct")
    e_opt = layer_error(W.double(), opt, prep.H)
    return layer_error(W.double(), W_new.double(), prep.H) / e_opt - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--settings", nargs="*", default=["0.7", "2:4", "0.5"])
    ap.add_argument("--variants", nargs="*", default=["sparsegpt", "apt-sparsegpt", "apt-admm", "apt-admm-row"],
                    help=f"first = the reference of the ratios; from {', '.join(VARIANTS)}")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", default="c4", help="the corpus of every method's H (the others are scored only)")
    ap.add_argument("--score", nargs="*", default=["wikitext2"], help="other domains, scored only")
    ap.add_argument("--cache", default=None, help="Hessian cache (default: runs/apt_layers/hessians[-CALIB].pt)")
    ap.add_argument("--alps-dir", default=str(ROOT / "runs" / "ALPS"), help="a checkout of mazumder-lab/ALPS")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "apt_layers_smollm2.json"))
    a = ap.parse_args()
    alps_fn = alps_reference(Path(a.alps_dir)) if "alps" in a.variants else None
    torch.set_num_threads(a.threads)
    corpora = [a.calib] + [c for c in a.score if c != a.calib]
    cache = a.cache or ROOT / "runs" / "apt_layers" / ("hessians.pt" if a.calib == "c4" else
                                                        f"hessians-{a.calib}-{a.nsamples}x{a.seqlen}.pt")
    D = capture(a.model, a.nsamples, a.seqlen, Path(cache), corpora)
    res = ResultFile(a.out, run_protocol(
        "apt_layers.py", model=a.model, layers=LAYERS, linears=LINEARS,
        hessian=f"dense-model inputs, {a.nsamples} x {a.seqlen} tokens, seed 0; {a.calib} = calibration (every "
                f"method's H), {', '.join(corpora[1:])} = other domains (scored only)",
        dtype="float32", damp="0.01 unless the variant says otherwise", blocksize=128, threads=a.threads,
        variants={k: {"method": m, **o} for k, (m, o) in VARIANTS.items() if k in a.variants}), rows="settings")
    for sp in a.settings:
        spec = parse_sparsity(sp)
        # a per-row scope does not apply to N:M (every group is its own row already)
        variants = [v for v in a.variants if not (spec.is_nm and VARIANTS[v][1].get("admm_scope") == "row")]
        rows, sums, times, gaps = [], {v: {c: 0.0 for c in corpora} for v in variants}, dict.fromkeys(variants, 0.0), {}
        for li in LAYERS:
            for n in LINEARS:
                W, Hc = D[("W", li, n)], D[(a.calib, li, n)]
                row, ref = {"layer": li, "linear": n}, None
                for v in variants:
                    name, opts = VARIANTS[v]
                    t = time.perf_counter()
                    Wn = (alps_fn if name == "alps" else get_method(name).fn)(W, Hc, spec, **opts)
                    dt = time.perf_counter() - t
                    e = {c: layer_error(W.double(), Wn.double(), D[(c, li, n)].double()) for c in corpora}
                    if ref is None:
                        ref = e  # the first variant (SparseGPT) is the reference
                    row[v] = {**{f"err_{c}": e[c] for c in corpora}, "time_s": round(dt, 4),
                              **{f"{c}_vs_first": e[c] / ref[c] for c in corpora}}
                    if v in EXACT:
                        row[v]["refit_gap"] = refit_gap(W, Hc, Wn, opts["damp"])
                        gaps.setdefault(v, []).append(row[v]["refit_gap"])
                    for c in corpora:
                        sums[v][c] += e[c] / ref[c]
                    times[v] += dt
                rows.append(row)
                print(sp, li, n, {v: tuple(round(row[v][f"{c}_vs_first"], 3) for c in corpora) for v in variants},
                      flush=True)
        k = len(rows)
        first = variants[0]
        row = res.record(sp, {
            "mean_error_vs_" + first: {v: {c: sums[v][c] / k for c in corpora} for v in variants},
            "time_vs_" + first: {v: times[v] / times[first] for v in variants},
            "time_s": {v: round(times[v], 2) for v in variants},
            "refit_gap_mean_max": {v: [sum(g) / len(g), max(g)] for v, g in gaps.items()}, "layers": rows})
        print(sp, json.dumps({kk: vv for kk, vv in row.items() if kk not in ("layers", "command")}), flush=True)

if __name__ == "__main__":
    main()
