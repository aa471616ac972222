#!/usr/bin/env python3
"""Peak memory of evaluation with a huge vocabulary, and of tuning SmolLM2-135M, with their protocols.

    python benchmarks/memory_smollm2.py --out benchmarks/results/memory_smollm2.json

1. ``vocab``: perplexity (``prunetune eval``, WikiText-2, batch 8 x 512, the first 8 windows) of a random-weight
   model of Gemma-3-270M's shape (hidden 640, 18 layers, 4 heads / 1 KV head of 256, MLP 2048) with its
   262,144-token vocabulary, and of the same model with a 49,152-token one (SmolLM2's, whose tokenizer both
   use). Each runs in its own process; its peak RSS is the child's ``VmHWM``.
2. ``tune``: ``prunetune tune`` of SmolLM2-135M (LoRA r=8 and PAT at 25%), batch 8 x 128 Alpaca, ``--steps``
   steps, with and without ``--gradient-checkpointing``, each in its own process: peak RSS and median step time
   (first step excluded) from the run's report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_common import ResultFile, run_protocol  # noqa: E402

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent's mapped pages (the parent
# that built a 268M-parameter model reported its own 2 GB for both children); VmHWM is the exec'd process's own.
CHILD = """
import sys
from prunetune.cli import main
rc = main(sys.argv[1:])
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("PEAK_KB", int(hwm.split()[1]))
sys.exit(rc)
"""


def child(args: list[str], threads: int) -> tuple[int, float, str]:
    t = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                            "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("PEAK_KB"))
    return peak, time.time() - t, p.stdout


def vocab_models(work: Path, tokenizer_dir: str) -> dict[str, Path]:
    import torch
    import transformers as T

    out = {}
    for vocab in (262144, 49152):
        d = work / f"gemma3-270m-shape-vocab{vocab}"
        if not (d / "config.json").is_file():
            cfg = T.Gemma3TextConfig(vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                     max_position_embeddings=32768, sliding_window=512)
            torch.manual_seed(0)
            model = T.AutoModelForCausalLM.from_config(cfg)
            model.save_pretrained(d)
            T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
            del model
        out[str(vocab)] = d
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="*", default=["vocab", "tune"])
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_smollm2.json"))
    a = ap.parse_args()
    res = ResultFile(a.out, run_protocol(
        "memory_smollm2.py", threads=a.threads,
        peak="VmHWM of a child process that runs the prunetune CLI (its own high-water RSS)"))
    with tempfile.TemporaryDirectory() as td:
        work = Path(a.work or td)
        if "vocab" in a.parts:
            for vocab, d in vocab_models(work, a.smollm2).items():
                peak, wall, stdout = child(["eval", "--model", d, "--ppl", "wikitext2", "--seqlen", "512",
                                            "--max-windows", "8", "--batch-size", "8", "--device", "cpu",
                                            "--out", work / f"eval-{vocab}.json"], a.threads)
                ev = json.loads((work / f"eval-{vocab}.json").read_text())
                row = {"model": "random Gemma-3-270M shape", "vocab": int(vocab), "peak_rss_mb": round(peak / 1024, 1),
                       "wall_s": round(wall, 1), "parameters": ev["manifest"]["model"]["parameters"],
                       "protocol": ev["perplexity"]["wikitext2"]["protocol"]["windows"] + ", batch 8 x 512, BOS "
                                   + ev["perplexity"]["wikitext2"]["protocol"]["bos"]}
                res.record(f"eval-vocab-{vocab}", row)
                print(f"eval-vocab-{vocab}", row, flush=True)
        if "tune" in a.parts:
            for method, extra in (("lora", []), ("pat", ["--ratio", "0.25"])):
                for ckpt in (False, True):
                    key = f"tune-{method}{'-ckpt' if ckpt else ''}"
                    d = work / key
                    args = ["tune", "--model", a.smollm2, "--method", method, *extra, "--data", "alpaca",
                            "--max-records", "400", "--seq-len", "128", "--batch-size", "8", "--max-steps",
                            a.steps, "--eval-size", "0", "--checkpoint-every", "0", "--no-progress", "--device",
                            "cpu", "--out", d, "--overwrite"] + (["--gradient-checkpointing"] if ckpt else [])
                    peak, wall, _ = child(args, a.threads)
                    rep = json.loads((d / "tune_report.json").read_text())
                    steps = [h["step_s"] for h in rep["history"][1:]]
                    row = {"method": method, "gradient_checkpointing": ckpt, "steps": a.steps,
                           "batch": "8 x 128 Alpaca tokens", "peak_rss_mb": round(peak / 1024, 1),
                           "report_peak_rss_mb": rep["manifest"]["peak_rss_mb"],
                           "step_s_median": statistics.median(steps) if steps else None}
                    res.record(key, row)
                    print(key, row, flush=True)
    print(json.dumps(res.runs, indent=1))


if __name__ == "__main__":
    main()
