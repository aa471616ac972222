#!/usr/bin/env python3
"""What the MLP-neuron shrink's down_proj refit should aim at, and what its ridge should pull towards.

    python benchmarks/units_refit_targets.py --runs own:original own:zero dense:original:1 dense:original:0.5 \
        --out benchmarks/results/units_refit_targets.json

SmolLM2-135M, 512 of 1536 MLP neurons removed in every layer (25% of the decoder weights), chosen by the
input-aware magnitude (as ``shrink --select magnitude``), layer by layer on 32 x 512 C4 windows (prunetune's
sampler, seed 0), each layer seeing the already shrunk ones. Only the refit of down_proj on the kept neurons
changes (``A``: the kept neurons' activations on the shrunk model's own inputs, ``λ = 0.01 · mean diag(AAᵀ)``):

- target ``own``: the layer's own down_proj output on those inputs (``W a``) — what ``units.refit`` does;
- target ``dense:α``: the dense model's layer output minus the shrunk model's residual before the MLP
  (``W a + α·(y_dense − r − W a)``): the refit also corrects what the earlier layers' removals changed in the
  residual stream (α = 1 fully, 0.5 half way);
- ridge ``original``: ``min ||W'A − T||² + λ||W' − W_K||²`` (pulled towards the original kept weights — what
  ``units.refit``'s dampened ``H`` amounts to); ridge ``zero``: ``+ λ||W'||²``.

Each run: WikiText-2 and C4 perplexity over the first 32 windows of 512 tokens (``prunetune.evaluate``).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench_common import ResultFile, ensure_model, perplexity_runs, run_protocol  # noqa: E402

from prunetune.data.calibration import sample_calibration  # noqa: E402
from prunetune.models.registry import get_adapter  # noqa: E402
from prunetune.structured.units import select_units  # noqa: E402


def _run(layer, adapter, hidden, kw, names):
    """The layer's outputs for every batch, and each hooked module's (input, output) per batch."""
    store = {n: [] for n in names}
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: store[n].append((a[0].detach(), o.detach()))) for n in names]
    with torch.no_grad():
        outs = [adapter.run_layer(layer, h, kw) for h in hidden]
    for h in hooks:
        h.remove()
    return outs, store


def refit(C, H, keep, W, damp, ridge):
    """``W' = (C_K + λ·W_K?)(H_KK + λI)⁻¹`` with ``C = Σ T aᵀ``, ``H = Σ a aᵀ`` (float64)."""
    lam = damp * H.diagonal().mean()
    HK = H[keep][:, keep] + lam * torch.eye(len(keep), dtype=H.dtype)
    R = C[:, keep] + (lam * W.double()[:, keep] if ridge == "original" else 0)
    return torch.cholesky_solve(R.t(), torch.linalg.cholesky(HK)).t().float()


def shrink(a, target: str, ridge: str, alpha: float, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.dense)
    model = AutoModelForCausalLM.from_pretrained(a.dense, dtype=torch.float32).eval()
    ids, calib = sample_calibration(tok, "c4", a.nsamples, a.seqlen, 0, bos="stream")
    adapter = get_adapter(model)
    inp = adapter.first_layer_inputs(list(ids.split(8)), "cpu")
    hp, kwargs = inp.hidden, inp.layer_kwargs
    hd = [h.clone() for h in hp]
    t0, stream_err = time.time(), []
    for i, layer in enumerate(adapter.layers):
        kw = kwargs[i]
        yd, _ = _run(copy.deepcopy(layer), adapter, hd, kw, [])  # the dense layer on the dense stream
        _, st = _run(layer, adapter, hp, kw, ["post_attention_layernorm", "mlp.down_proj"])
        down = layer.mlp.down_proj
        m = down.in_features
        H = torch.zeros(m, m, dtype=torch.float64)
        C = torch.zeros(down.out_features, m, dtype=torch.float64)
        for b in range(len(hp)):
            r = st["post_attention_layernorm"][b][0]
            x, y = st["mlp.down_proj"][b]
            T = y if target == "own" else y + alpha * ((yd[b] - r) - y)
            x2, T2 = x.reshape(-1, m).double(), T.reshape(-1, T.shape[-1]).double()
            H += x2.t() @ x2
            C += T2.t() @ x2
        W = down.weight.data.float()
        N = sum(h.shape[0] * h.shape[1] for h in hp)
        gone = set(select_units(W, (2 * H / N).float(), [torch.tensor([j]) for j in range(m)], a.neurons,
                                select="magnitude", damp=a.damp, block=max(1, math.ceil(a.neurons / 128))))
        keep = torch.tensor([j for j in range(m) if j not in gone])
        down.weight = torch.nn.Parameter(refit(C, H, keep, W, a.damp, ridge).contiguous())
        down.in_features = len(keep)
        for n in ("gate_proj", "up_proj"):
            lin = layer.mlp.get_submodule(n)
            lin.weight = torch.nn.Parameter(lin.weight.data[keep].contiguous())
            lin.out_features = len(keep)
        with torch.no_grad():
            hp = [adapter.run_layer(layer, h, kw) for h in hp]
        stream_err.append(sum(float(((p - d) ** 2).sum()) for p, d in zip(hp, yd)) /
                          sum(float((d ** 2).sum()) for d in yd))
        hd = yd
    model.config.intermediate_size = model.config.intermediate_size - a.neurons
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"calibration": calib, "shrink_s": round(time.time() - t0, 1),
            "calib_stream_rel_error": [round(e, 6) for e in stream_err]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--runs", nargs="*", default=["own:original", "own:zero", "dense:original:1",
                                                   "dense:original:0.5"])
    ap.add_argument("--neurons", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "units_refit_targets.json"))
    a = ap.parse_args()
    rf = ResultFile(a.out, run_protocol("units_refit_targets.py", model=Path(a.dense).name, neurons=a.neurons,
                                        select="magnitude", damp=a.damp,
                                        calibration=f"c4 {a.nsamples} x {a.seqlen}, seed 0",
                                        ppl=f"first {a.ppl_windows} windows of 512 tokens: wikitext2, c4"))
    ensure_model(a.dense)

    def make(key, tmp):
        if key == "dense":
            return a.dense, {}
        target, ridge, *alpha = key.split(":")
        return tmp / "m", shrink(a, target, ridge, float(alpha[0]) if alpha else 1.0, tmp / "m")

    perplexity_runs(rf, ["dense"] + a.runs, make, windows=a.ppl_windows, work=ROOT / "runs")

if __name__ == "__main__":
    main()
