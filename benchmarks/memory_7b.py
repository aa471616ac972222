#!/usr/bin/env python3
"""Bounded-memory pruning: a 7B-shaped Llama checkpoint (random bf16 weights, ~13.5 GB) pruned layer by layer.

    python benchmarks/memory_7b.py --work /tmp/llama7b-shape
    python benchmarks/memory_7b.py --layers 4 --work /tmp/llama7b-4   # same per-layer peak, ~2 GB on disk
    python benchmarks/memory_7b.py --layers 2 --method sparsegpt --calib c4 --nsamples 128 --seqlen 2048 \
        --work /tmp/llama7b-2 --keep --out benchmarks/results/memory_7b_2layers_sparsegpt_128x2048.json

Writes the checkpoint tensor by tensor (never the whole model in memory), then runs
``prunetune prune --method M --sparsity 0.5`` in a child process. Peak resident memory: the prune report's own
(VmHWM from the job's start) and the child's ``ru_maxrss`` (which Linux carries over fork + exec from this
process, so it is only an upper bound). Target: peak RSS <= 25% of the checkpoint size. Result: ``--out``
(default, for the full 32 layers: benchmarks/results/memory_7b.json). Rerunning the same command after the
prune was killed past a finished layer resumes it (``prune --resume``); the result then lists the parts.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

CONFIG = {  # Llama-2-7B shapes
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
}


def write_checkpoint(d: Path, seed: int = 0, layers: int | None = None, shapes: dict | None = None) -> int:
    """Write the checkpoint; ``layers`` overrides the depth (the per-layer shapes stay the 7B ones unless
    ``shapes`` overrides config entries, e.g. for a quick check of a script)."""
    d.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG, num_hidden_layers=layers or CONFIG["num_hidden_layers"], **(shapes or {}))
    g = torch.Generator().manual_seed(seed)
    h, f, L, V = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def shards():  # one shard (~400 MB) in memory at a time
        yield "model-embed.safetensors", {"model.embed_tokens.weight": rnd(V, h)}
        for i in range(L):
            p = f"model.layers.{i}."
            yield f"model-{i:05d}.safetensors", {
                p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
                p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
                p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                p + "mlp.down_proj.weight": rnd(h, f),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        yield "model-head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rnd(V, h)}

    weight_map, total = {}, 0
    for name, tensors in shards():
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(config, indent=2))
    from prunetune.paths import DEFAULT_MODEL

    for f_ in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(DEFAULT_MODEL / f_, d / f_)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/llama7b-shape")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                    help="decoder layers (fewer for a quick check: memory is bounded per layer)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (and the pruned output) afterwards")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--calib", default="tinystories")
    ap.add_argument("--cache-budget", default=None, help="passed to prune --cache-budget (default: its own)")
    ap.add_argument("--batch-size", type=int, default=None, help="passed to prune --batch-size (default: its own)")
    ap.add_argument("--out", default=None, help="result JSON (default: memory_7b.json for the full depth, else none)")
    a = ap.parse_args()
    work = Path(a.work)
    src, out = work / "dense", work / "pruned"
    t0 = time.time()
    if not (src / "config.json").is_file() or not (src / "model.safetensors.index.json").is_file():
        write_checkpoint(src, layers=a.layers)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    t_write = time.time() - t0
    cmd = [sys.executable, "-m", "prunetune", "prune", "--model", str(src), "--method", a.method, "--sparsity", "0.5",
           "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--dtype", "bfloat16",
           "--device", "cpu", "--out", str(out), "--overwrite"]
    if a.cache_budget is not None:
        cmd += ["--cache-budget", str(a.cache_budget)]
    if a.batch_size is not None:
        cmd += ["--batch-size", str(a.batch_size)]
    # A run killed after a finished layer (e.g. at the end of a working session) continues with --resume; the
    # killed parts' peak, wall and CPU time (up to their last finished layer) come from the report's
    # ``earlier_parts`` and the result takes the max / sums.
    resuming = (work / ".pruned.partial" / "resume" / "journal.json").is_file()
    if resuming:
        cmd.append("--resume")
    t1 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t1
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = ru.ru_maxrss * 1024  # bytes
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(proc.returncode)
    report = json.loads((out / "prune_report.json").read_text())
    parts = [{"resumed_from_layer": p["from_layer"] or None, "killed_after_layer": p["to_layer"],
              "wall_time_s": p["wall_time_s"], "cpu_time_s": p["cpu_time_s"],
              "peak_rss_bytes": int(p["peak_rss_mb"] * 2 ** 20), "peak_rss_bytes_ru_maxrss": 0}
             for p in report["manifest"].get("earlier_parts", [])]
    parts.append({"resumed_from_layer": report["manifest"].get("resumed_from_layer"), "wall_time_s": round(wall, 1),
                  "cpu_time_s": round(ru.ru_utime + ru.ru_stime, 1),
                  "peak_rss_bytes": int(report["manifest"]["peak_rss_mb"] * 2 ** 20), "peak_rss_bytes_ru_maxrss": peak})
    res = {
        "checkpoint": "Llama-2-7B shapes, random bf16 weights", "layers": a.layers, "checkpoint_bytes": size,
        "prune_command": " ".join(c for c in cmd[1:] if c != "--resume"),
        "prune_wall_time_s": round(sum(p["wall_time_s"] for p in parts), 1),
        # CPU seconds of the prune, unlike its wall time not lengthened by other jobs on the machine
        "prune_cpu_time_s": round(sum(p["cpu_time_s"] for p in parts), 1), "write_time_s": round(t_write, 1),
        "peak_rss_bytes_ru_maxrss": max(p["peak_rss_bytes_ru_maxrss"] for p in parts), "target_share": 0.25,
    }
    if len(parts) > 1:
        res["parts"] = parts  # killed after a finished layer and resumed: the peak is the max over the parts
    own = max(p["peak_rss_bytes"] for p in parts)
    res.update(peak_rss_bytes=int(own), peak_rss_share_of_checkpoint=round(own / size, 4),
               pruned_report_total=report["total"], activation_cache=report.get("activation_cache"))
    from bench_common import run_protocol
    from prunetune.manifest import write_json_atomic

    res.update(run_protocol("memory_7b.py"))  # versions, machine and this script's command line
    dest = a.out or (ROOT / "benchmarks" / "results" / "memory_7b.json" if a.layers == CONFIG["num_hidden_layers"]
                     else None)  # a shallower check prints its numbers but keeps the 7B result
    if dest:
        write_json_atomic(Path(dest), res)
    print(json.dumps(res, indent=2))
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
