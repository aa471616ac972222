#!/usr/bin/env python3
"""Can a few gradient steps per layer do what the closed-form refit of down_proj cannot: refit the kept neurons'
gate and up rows too? A measurement for the MLP-neuron shrink (BENCHMARKS §9), not yet a product option.

    python benchmarks/units_block_refit.py --runs own:4:3e-5 own:4:1e-4 \
        --out benchmarks/results/units_block_refit.json

Start: a shrink written by prunetune (``--start``, default ``runs/units/mlp_0.25_magnitude``: 512 of 1536 MLP
neurons removed in every layer, input-aware magnitude, exact down_proj refit on 32 x 512 C4 windows). Then, layer
by layer on the same 32 x 512 C4 windows (prunetune's sampler, seed 0), each layer seeing the already refined
ones: the MLP's inputs ``x`` (its norm's output on the shrunk stream) are recorded and the shrunk MLP's three
matrices (gate, up, down: the kept neurons) are trained with Adam for ``E`` epochs (one window per step, lr ``LR``,
constant) to minimise ``||mlp(x) − T||² / ||T||²``, where ``T`` is

- ``own``: the dense MLP on the same ``x`` (a local reconstruction, as the closed-form refit's target);
- ``dense``: the dense model's layer output minus the shrunk model's residual before the MLP (the MLP also
  corrects what earlier layers' removals changed in the residual stream).

Run key ``TARGET:E:LR``. Each run: WikiText-2 and C4 perplexity over the first 32 windows of 512 tokens, and the
mean relative MLP error per layer before and after.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench_common import ResultFile, ensure_model, perplexity_runs, run_protocol  # noqa: E402

from prunetune.data.calibration import sample_calibration  # noqa: E402
from prunetune.models.registry import get_adapter  # noqa: E402


def _record(layer, adapter, hidden, kw, name):
    """The layer's outputs for every batch, and the named module's output per batch."""
    got = []
    h = layer.get_submodule(name).register_forward_hook(lambda m, a, o: got.append(o.detach()))
    with torch.no_grad():
        outs = [adapter.run_layer(layer, x, kw) for x in hidden]
    h.remove()
    return outs, got


def refine(a, target: str, epochs: int, lr: float, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.dense)
    dense = AutoModelForCausalLM.from_pretrained(a.dense, dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(a.start, dtype=torch.float32).eval()
    ids, calib = sample_calibration(tok, "c4", a.nsamples, a.seqlen, 0, bos="stream")
    ad, asm = get_adapter(dense), get_adapter(small)
    inp = asm.first_layer_inputs(list(ids.split(8)), "cpu")
    hs, kwargs = inp.hidden, inp.layer_kwargs
    hd = [h.clone() for h in hs]
    gen = torch.Generator().manual_seed(0)
    t0, before, after = time.time(), [], []
    for i, (ls, ld) in enumerate(zip(asm.layers, ad.layers)):
        kw = kwargs[i]
        yd, _ = _record(ld, ad, hd, kw, "mlp")
        _, xs = _record(ls, asm, hs, kw, "post_attention_layernorm")
        if target == "own":
            with torch.no_grad():
                T = [ld.mlp(x) for x in xs]
        else:
            ys, ms = _record(ls, asm, hs, kw, "mlp")
            T = [yd_b - (y_b - m_b) for yd_b, y_b, m_b in zip(yd, ys, ms)]  # dense output − residual before MLP
        X, Y = torch.cat(xs), torch.cat(T)  # windows x positions x hidden
        norm = float((Y ** 2).mean())

        def err():
            with torch.no_grad():
                return float(sum(((ls.mlp(X[j:j + 8]) - Y[j:j + 8]) ** 2).sum() for j in range(0, len(X), 8))
                             / (Y ** 2).sum())

        before.append(err())
        params = list(ls.mlp.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for j in torch.randperm(len(X), generator=gen).tolist():
                    loss = ((ls.mlp(X[j:j + 1]) - Y[j:j + 1]) ** 2).mean() / norm
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        for p in params:
            p.requires_grad_(False)
        after.append(err())
        print(f"layer {i}: relative MLP error {before[-1]:.4f} -> {after[-1]:.4f}", flush=True)
        with torch.no_grad():
            hs = [asm.run_layer(ls, h, kw) for h in hs]
        hd = yd
    small.save_pretrained(out)
    tok.save_pretrained(out)
    return {"calibration": calib, "refine_s": round(time.time() - t0, 1),
            "mlp_rel_error_before": [round(e, 5) for e in before], "mlp_rel_error_after": [round(e, 5) for e in after]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--start", default=str(ROOT / "runs" / "units" / "mlp_0.25_magnitude"))
    ap.add_argument("--runs", nargs="*", default=["own:4:3e-5", "own:4:1e-4"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "units_block_refit.json"))
    a = ap.parse_args()
    rf = ResultFile(a.out, run_protocol("units_block_refit.py", model=Path(a.dense).name, start=a.start,
                                        calibration=f"c4 {a.nsamples} x {a.seqlen}, seed 0",
                                        optimiser="Adam, constant lr, one window per step",
                                        ppl=f"first {a.ppl_windows} windows of 512 tokens: wikitext2, c4"))
    ensure_model(a.dense)

    def make(key, tmp):
        if key == "start":
            return a.start, {}
        target, epochs, lr = key.split(":")
        return tmp / "m", refine(a, target, int(epochs), float(lr), tmp / "m")

    perplexity_runs(rf, ["start"] + a.runs, make, windows=a.ppl_windows, work=ROOT / "runs")

if __name__ == "__main__":
    main()
