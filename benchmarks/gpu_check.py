#!/usr/bin/env python3
"""The GPU checks: one prepared run for a lent GPU machine (the `device` tool), a few minutes on one H200.

    # here, once: C4 goes along in shared/ (ignored by git; the device tool carries a checkout's shared/)
    mkdir -p shared/data/c4 && cp ../shared/data/c4/c4_validation_2k.jsonl shared/data/c4/
    # there (its python3 holds torch, transformers, peft, accelerate, safetensors, pytest):
    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/log
    # the script itself at small shapes on the CPU (what the CPU can check):
    python benchmarks/gpu_check.py --smoke --device cpu --out /tmp/gpu_check_smoke.json

Steps (``--steps``; each one's result or its one-line error goes to ``--out``, a failed step does not stop the rest):

- ``tests``: ``pytest -m cuda`` (tests/test_cuda.py: pruning, the disk cache, SPP, PAT and the 2:4 kernels on the
  GPU against the CPU's guarantees); pass / fail counts and the failures' lines.
- ``prune``: a 2-layer Llama-2-7B-shaped checkpoint of random bf16 weights (``memory_7b.write_checkpoint``) pruned to
  50% by SparseGPT and by APT with C4 calibration, 128 x 2048 tokens, on the GPU: wall time per layer, peak GPU
  memory (allocator), peak RSS, mean relative layer error.
- ``prefill``: a 32-layer 7B-shaped model and the same with 25% fewer hidden channels (4096 -> 3072, the config
  PAT's shrink writes: explicit head_dim, the same heads and MLP width), random bf16 weights built on the GPU;
  prefill of batch x 2048 tokens (``use_cache=False``, last position's logits), the two models interleaved, median of
  ``--repeats`` after warm-up, CUDA-synchronised wall time.
- ``sparse24``: the 2-layer checkpoint pruned 2:4 (magnitude) and ``bench --sparse-2to4`` in bf16 against the dense
  one: every 7B linear shape dense vs semi-structured (``torch.sparse.to_sparse_semi_structured``), and end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import ResultFile, run_protocol  # noqa: E402
from memory_7b import CONFIG, write_checkpoint  # noqa: E402

#: --smoke: the same steps at shapes a CPU runs in seconds (checks the script, measures nothing of interest)
SMOKE = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
             vocab_size=512)


def step_tests(a, device) -> dict:
    env = dict(os.environ, PRUNETUNE_TEST_DEVICE=device, PYTHONPATH=str(ROOT / "src"))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfEs",
                        str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    return {"returncode": p.returncode, "summary": lines[-1] if lines else p.stderr.strip()[-500:],
            "failures": [l for l in lines if l.startswith(("FAILED", "ERROR"))],
            "wall_time_s": round(time.time() - t0, 1)}


def _checkpoint(work: Path, smoke: bool) -> Path:
    src = work / "dense"
    if not (src / "config.json").is_file():
        write_checkpoint(src, layers=2, shapes=SMOKE if smoke else None)
    return src


def step_prune(a, device, work: Path) -> dict:
    from prunetune.api import prune

    src = _checkpoint(work, a.smoke)
    n, L = (8, 128) if a.smoke else (a.nsamples, a.seqlen)
    out = {}
    for method in ("sparsegpt", "apt"):
        rep = prune(src, method=method, sparsity="0.5", out=work / f"pruned-{method}", calib="c4", nsamples=n,
                    seqlen=L, dtype="bfloat16", device=device, overwrite=True, progress=True)
        man = rep["manifest"]
        out[method] = {"layer_wall_time_s": man["layer_wall_time_s"], "wall_time_s": man["wall_time_s"],
                       "peak_cuda_mb": man.get("peak_cuda_mb"), "peak_rss_mb": man["peak_rss_mb"],
                       "compute_dtype": man["compute_dtype"], "calibration": man["calibration"],
                       "mean_rel_error": rep["total"]["mean_rel_error"],
                       "sparsity": rep["total"]["sparsity_of_pruned_matrices"],
                       "activation_cache": rep.get("activation_cache")}
        print(f"prune {method}: layers {man['layer_wall_time_s']} s, peak GPU {man.get('peak_cuda_mb')} MB", flush=True)
    return {"checkpoint": "Llama-2-7B shapes, 2 layers, random bf16" if not a.smoke else "smoke shapes", **out}


def _build(cfg, device):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return m.eval()


def step_prefill(a, device) -> dict:
    from transformers import LlamaConfig

    from prunetune.structured.slicing import shrunk_config

    base = {k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type", "dtype")}
    if a.smoke:
        base.update(SMOKE, num_hidden_layers=2)
    dense_cfg = LlamaConfig(**base)
    k = dense_cfg.hidden_size * 3 // 4
    models = {"dense": _build(dense_cfg, device), "narrow": _build(shrunk_config(dense_cfg, k), device)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    seq = 128 if a.smoke else 2048
    g = torch.Generator().manual_seed(0)
    rows = []
    for bs in (1, 8) if not a.smoke else (1, 2):
        ids = torch.randint(0, dense_cfg.vocab_size, (bs, seq), generator=g).to(device)
        times = {name: [] for name in models}
        with torch.inference_mode():
            for r in range(a.warmup + a.repeats):
                for name, m in models.items():  # interleaved: drift hits both alike
                    sync()
                    t0 = time.perf_counter()
                    m(input_ids=ids, use_cache=False, logits_to_keep=1)
                    sync()
                    if r >= a.warmup:
                        times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"batch_size": bs, "seq_len": seq,
                     **{f"{name}_ms": {"median": med[name] * 1e3, "min": min(t) * 1e3, "max": max(t) * 1e3}
                        for name, t in times.items()},
                     "speedup": med["dense"] / med["narrow"]})
        print(f"prefill {bs} x {seq}: dense {med['dense'] * 1e3:.1f} ms, narrow {med['narrow'] * 1e3:.1f} ms, "
              f"x{med['dense'] / med['narrow']:.3f}", flush=True)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    layer_params = {name: sum(p.numel() for n, p in m.named_parameters() if ".layers." in n)
                    for name, m in models.items()}
    del models
    return {"hidden_size": [dense_cfg.hidden_size, k], "layers": dense_cfg.num_hidden_layers, "dtype": "bfloat16",
            "parameters": params, "decoder_layer_parameters": layer_params,
            "ideal_layer_speedup": layer_params["dense"] / layer_params["narrow"],
            "protocol": f"prefill of batch x {seq} random tokens, use_cache=False, logits_to_keep=1, inference_mode; "
                        f"median of {a.repeats} after {a.warmup} warm-up, the two models interleaved; "
                        "synchronised wall time", "rows": rows}


def step_sparse24(a, device, work: Path) -> dict:
    from prunetune.api import bench, prune

    if not device.startswith("cuda"):
        return {"skipped": "semi-structured sparse kernels need a CUDA GPU"}
    src = _checkpoint(work, a.smoke)
    out = work / "pruned-2of4"
    prune(src, method="magnitude", sparsity="2:4", out=out, calib="c4", nsamples=8, seqlen=128, dtype="bfloat16",
          device=device, overwrite=True, progress=False)
    res = bench([str(src), str(out)], batch_sizes=(1, 8), seq_lens=(128,) if a.smoke else (2048,), decode_tokens=16,
                repeats=a.repeats, warmup=a.warmup, dtype="bfloat16", device=device, sparse_2to4=True, progress=False)
    return {"sparse_2to4": res.get("sparse_2to4"), "prefill": res["prefill"], "models": res["models"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", default="tests,prune,prefill,sparse24")
    ap.add_argument("--smoke", action="store_true", help="small shapes (check the script on a CPU)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    a = ap.parse_args()
    if a.smoke:
        a.repeats, a.warmup = 2, 1
    gpu = {}
    if a.device.startswith("cuda"):
        gpu = {"gpu": torch.cuda.get_device_name(0), "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    res = ResultFile(a.out, run_protocol("gpu_check.py", device=a.device, smoke=a.smoke, **gpu), rows="steps")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        for name in a.steps.split(","):
            t0 = time.time()
            print(f"== {name}", flush=True)
            try:
                if name == "tests":
                    r = step_tests(a, a.device)
                elif name == "prune":
                    r = step_prune(a, a.device, work)
                elif name == "prefill":
                    r = step_prefill(a, a.device)
                elif name == "sparse24":
                    r = step_sparse24(a, a.device, work)
                else:
                    raise SystemExit(f"unknown step '{name}'")
            except Exception as e:  # noqa: BLE001 - recorded, the next step still runs
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
            r["step_wall_time_s"] = round(time.time() - t0, 1)
            res.record(name, r)  # what is done so far survives a kill at the time limit
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print(json.dumps({k: v.get("error", "ok") for k, v in res.runs.items()}))


if __name__ == "__main__":
    main()
