#!/usr/bin/env python3
"""Two more places a 25% cut of SmolLM2-135M could go, measured against the MLP-neuron shrink of BENCHMARKS §9.

    python benchmarks/units_where_to_cut.py --runs fisher:0.1 fisher:1 drop:0 drop:1 ... drop:29 \
        --out benchmarks/results/units_where_to_cut.json

``fisher:ALPHA``: ``shrink --structure mlp --ratio 0.25 --select obs`` (32 x 512 C4 windows, seed 0), but each
layer's neurons are chosen with the residual stream's loss metric instead of the identity: the greedy OBS cost of
removing a set ``S`` of down_proj columns becomes ``tr(F W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)`` with ``F = E[g gᵀ]``, ``g`` the
gradient of the next-token loss with respect to the layer's output (the dense model, the same calibration
windows, summed over tokens), normalised to mean diagonal 1 and dampened ``F + ALPHA·I`` (K-FAC's output factor,
as in LLM Surgeon). Selection with ``F`` is selection on ``F^½ W``; the refit of the kept columns is unchanged (for
whole columns the least-squares optimum does not depend on the output metric). Perplexity: the first
``--ppl-windows`` windows of 512 tokens of WikiText-2 and C4.

``drop+mlp:I``: layer ``I`` dropped, then MLP neurons removed by ``shrink --structure mlp --select obs`` (the
first protocol) from the 29 layers left, as many as bring the total to 25% of the original decoder-layer weights
(both cuts together, the same parameter count as ``mlp:0.25`` within one neuron per layer).

``drop:I``: decoder layer ``I`` removed from the dense model (a plain config with one layer fewer: 3.3% of the
decoder-layer weights). Scored by the mean loss on ``--drop-calib`` held-out C4 windows of 512 tokens (seed 1000,
what ``shrink --structure auto`` would choose by) and WikiText-2 perplexity over the first ``--drop-windows``
windows; ``dense`` is the same two numbers for the unchanged model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench_common import ResultFile, ensure_model, run_protocol  # noqa: E402

import prunetune as pt  # noqa: E402
import prunetune.structured.neurons as neurons  # noqa: E402
from prunetune.data.calibration import sample_calibration  # noqa: E402
from prunetune.evaluation.perplexity import perplexity  # noqa: E402
from prunetune.io import load_model  # noqa: E402


def output_fisher(dense: str, nsamples: int, seqlen: int) -> list[torch.Tensor]:
    """``Σ_tokens g gᵀ`` per decoder layer (``g``: d loss / d layer output), from the calibration windows."""
    net, tok, _ = load_model(dense, dtype="float32", device="cpu")
    ids, _ = sample_calibration(tok, "c4", nsamples, seqlen, 0, bos="stream")
    d = net.config.hidden_size
    F = [torch.zeros(d, d, dtype=torch.float64) for _ in net.model.layers]

    def hook(i):
        def grad(g):  # returns None: the gradient flows on unchanged
            g = g.reshape(-1, d).double()
            F[i].add_(g.t() @ g)

        def fwd(mod, inp, out):
            (out[0] if isinstance(out, tuple) else out).register_hook(grad)
        return fwd

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(net.model.layers)]
    for b in ids.split(4):
        logits = net(b, use_cache=False).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                          reduction="sum").backward()
        net.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    return F


def fisher_shrink(a, alpha: float, F: list[torch.Tensor], out: Path) -> dict:
    """The product's MLP shrink with its selection seeing ``F^½ W`` (patched in for this run only)."""
    roots = []
    for f in F:
        f = f / f.diagonal().mean() + alpha * torch.eye(f.shape[0], dtype=f.dtype)
        e, V = torch.linalg.eigh(f)
        roots.append((V * e.clamp_min(0).sqrt()) @ V.t())
    state = {}
    orig_layer, orig_select = neurons.prune_units_layer, neurons.select_units

    def layer_fn(layer, layer_idx, *args, **kw):
        state["i"] = layer_idx
        return orig_layer(layer, layer_idx, *args, **kw)

    def select(W, H, groups, n, **kw):
        return orig_select(roots[state["i"]].to(W.dtype) @ W, H, groups, n, **kw)

    neurons.prune_units_layer, neurons.select_units = layer_fn, select
    try:
        t = time.time()
        rep = pt.shrink(a.dense, structure="mlp", select="obs", ratio=0.25, out=str(out), nsamples=a.nsamples,
                        seqlen=a.seqlen, seed=0, overwrite=True, progress=False)
    finally:
        neurons.prune_units_layer, neurons.select_units = orig_layer, orig_select
    r = pt.evaluate(str(out), ppl=["wikitext2", "c4"], seqlen=512, max_windows=a.ppl_windows, device="cpu",
                    progress=False)
    return {"alpha": alpha, "shrink_wall_s": round(time.time() - t, 1), "parameters": rep["parameters"],
            "mean_rel_error": rep["shrink"]["mean_rel_error"],
            "ppl": {c: v["ppl"] for c, v in r["perplexity"].items()}}


def without_layer(net, layers: list, types: list | None, i: int) -> None:
    """``net`` with decoder layer ``i`` of ``layers`` (its full stack) left out, config and cache indices to match:
    a plain checkpoint with one layer fewer once saved. ``types``: the full ``config.layer_types``, if any."""
    net.model.layers = torch.nn.ModuleList([m for j, m in enumerate(layers) if j != i])
    for j, m in enumerate(net.model.layers):
        m.self_attn.layer_idx = j
    net.config.num_hidden_layers = len(layers) - 1
    if types:
        net.config.layer_types = [t for j, t in enumerate(types) if j != i]


def drop_then_mlp(a, i: int, out: Path) -> dict:
    """Layer ``i`` removed (a plain checkpoint with one layer fewer), then the MLP shrink to 25% in all."""
    net, tok, _ = load_model(a.dense, dtype="float32", device="cpu")
    n = len(net.model.layers)
    without_layer(net, list(net.model.layers), getattr(net.config, "layer_types", None), i)
    mid = out.parent / f"{out.name}.dropped"
    net.save_pretrained(str(mid))
    tok.save_pretrained(str(mid))
    del net
    ratio = (0.25 * n - 1) / (n - 1)  # of the remaining layers' weights
    t = time.time()
    rep = pt.shrink(str(mid), structure="mlp", select="obs", ratio=ratio, out=str(out), nsamples=a.nsamples,
                    seqlen=a.seqlen, seed=0, overwrite=True, progress=False)
    wall = time.time() - t
    r = pt.evaluate(str(out), ppl=["wikitext2", "c4"], seqlen=512, max_windows=a.ppl_windows, device="cpu",
                    progress=False)
    return {"dropped_layer": i, "mlp_ratio_of_remaining": ratio, "structure": rep["shrink"]["structure"],
            "parameters": rep["parameters"], "shrink_wall_s": round(wall, 1),
            "ppl": {c: v["ppl"] for c, v in r["perplexity"].items()}}


@torch.no_grad()
def drop_scores(net, tok, ids, windows: int) -> dict:
    loss = sum(float(net(b, labels=b, use_cache=False).loss) * b.shape[0] for b in ids.split(8)) / ids.shape[0]
    ppl = perplexity(net, tok, "wikitext2", seqlen=512, max_windows=windows, progress=False)["ppl"]
    return {"held_out_loss": loss, "ppl": {"wikitext2": ppl}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--runs", nargs="*", default=["fisher:0.1", "fisher:1"] + [f"drop:{i}" for i in range(30)])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--drop-calib", type=int, default=16)
    ap.add_argument("--drop-windows", type=int, default=16)
    ap.add_argument("--work", default=str(ROOT / "runs" / "where-to-cut"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "units_where_to_cut.json"))
    a = ap.parse_args()
    ensure_model(a.dense)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rf = ResultFile(a.out, run_protocol("units_where_to_cut.py", model=Path(a.dense).name, calib="c4",
                                        nsamples=a.nsamples, seqlen=a.seqlen, seed=0, ppl_windows=a.ppl_windows,
                                        drop_calib_windows=a.drop_calib, drop_calib_seed=1000,
                                        drop_ppl_windows=a.drop_windows, dtype="float32", device="cpu"))
    fisher = [k for k in a.runs if k.startswith("fisher:") and not rf.done(k)]
    if fisher:
        fpath = work / f"fisher_{a.nsamples}x{a.seqlen}.pt"
        if not fpath.is_file():
            t = time.time()
            torch.save(output_fisher(a.dense, a.nsamples, a.seqlen), fpath)
            rf.set("fisher_pass_s", round(time.time() - t, 1))
        F = torch.load(fpath)
        for key in fisher:
            row = rf.record(key, fisher_shrink(a, float(key.split(":")[1]), F, work / key.replace(":", "_")))
            print(key, row["ppl"], flush=True)
    for key in [k for k in a.runs if k.startswith("drop+mlp:") and not rf.done(k)]:
        row = rf.record(key, drop_then_mlp(a, int(key.split(":")[1]), work / key.replace(":", "_").replace("+", "-")))
        print(key, row["ppl"], flush=True)
    drops = [k for k in a.runs if k.startswith("drop:")]
    if drops and not all(rf.done(k) for k in drops + ["dense"]):
        net, tok, _ = load_model(a.dense, dtype="float32", device="cpu")
        ids, _ = sample_calibration(tok, "c4", a.drop_calib, 512, 1000, bos="stream")
        layers, types = list(net.model.layers), getattr(net.config, "layer_types", None)
        if not rf.done("dense"):
            rf.record("dense", drop_scores(net, tok, ids, a.drop_windows))
        for key in drops:
            if rf.done(key):
                continue
            i = int(key.split(":")[1])
            t = time.time()
            without_layer(net, layers, types, i)
            row = rf.record(key, {**drop_scores(net, tok, ids, a.drop_windows), "wall_s": round(time.time() - t, 1)})
            print(key, row, flush=True)


if __name__ == "__main__":
    main()
