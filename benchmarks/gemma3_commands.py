#!/usr/bin/env python3
"""Every prunetune command on the real Gemma-3-270M: each runs, or refuses in one line.

    python scripts/fetch_gemma3.py models/gemma-3-270m
    python benchmarks/gemma3_commands.py --out benchmarks/results/gemma3_commands.json

Each step is the CLI in a fresh process (small budgets: this checks that the commands work on the family, the
quality numbers are in ``prune_smollm2.py --model models/gemma-3-270m``): its exit code, its last output
lines (or its one error line), wall time. A step whose input a failed step should have made is skipped. A step
that ran or refused (exit 0 or 2) in ``--out`` is not run again, so a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import c4_train_file  # noqa: E402

from prunetune.manifest import machine, versions, write_json_atomic  # noqa: E402


def steps(model: str, w: Path, data: Path) -> list[tuple[str, list[str], str | None]]:
    """(name, CLI arguments, the output folder it needs)."""
    cal = ["--calib", "c4", "--nsamples", "8", "--seqlen", "256"]
    tune = ["--data", str(data), "--max-steps", "4", "--batch-size", "4", "--seq-len", "128", "--eval-size", "8",
            "--no-progress"]
    return [
        ("eval", ["eval", "--model", model, "--ppl", "wikitext2", "--max-windows", "8"], None),
        ("prune sparsegpt 2:4", ["prune", "--model", model, "--method", "sparsegpt", "--sparsity", "2:4", *cal,
                                 "--out", str(w / "p24")], None),
        ("prune apt 50% compressed", ["prune", "--model", model, "--method", "apt", "--sparsity", "0.5", *cal,
                                      "--save-format", "compressed", "--out", str(w / "p50c")], None),
        ("prune wanda 50%", ["prune", "--model", model, "--method", "wanda", "--sparsity", "0.5", *cal,
                             "--out", str(w / "p50w")], None),
        ("prune magnitude 50%", ["prune", "--model", model, "--method", "magnitude", "--sparsity", "0.5", *cal,
                                 "--out", str(w / "p50m")], None),
        ("eval compressed", ["eval", "--model", str(w / "p50c"), "--ppl", "wikitext2", "--max-windows", "8"], "p50c"),
        ("shrink hidden (rotated)", ["shrink", "--model", model, "--ratio", "0.25", *cal, "--out", str(w / "sh")], None),
        ("shrink mlp 25%", ["shrink", "--model", model, "--structure", "mlp", "--ratio", "0.25", *cal,
                            "--out", str(w / "mlp25")], None),
        ("shrink mlp+heads 25%", ["shrink", "--model", model, "--structure", "mlp+heads", "--ratio", "0.25", *cal,
                                  "--out", str(w / "mh25")], None),
        ("eval mlp 25%", ["eval", "--model", str(w / "mlp25"), "--ppl", "wikitext2", "--max-windows", "8"], "mlp25"),
        ("tune lora", ["tune", "--model", model, "--method", "lora", *tune, "--merge", "--out", str(w / "lora")], None),
        ("tune spp", ["tune", "--model", str(w / "p24"), "--method", "spp", *tune, "--out", str(w / "spp")], "p24"),
        ("merge spp", ["merge", str(w / "spp"), "--out", str(w / "sppm")], "spp"),
        ("tune pat", ["tune", "--model", model, "--method", "pat", "--ratio", "0.25", *tune, "--out", str(w / "pat")],
         None),
        ("bench", ["bench", "--model", model, "--compare", str(w / "mlp25"), "--batch-sizes", "1", "--seq-lens", "64",
                   "--decode-tokens", "8", "--repeats", "2", "--threads", "2", "--device", "cpu"], "mlp25"),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "gemma-3-270m"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "gemma-commands"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gemma3_commands.json"))
    a = ap.parse_args()
    w = Path(a.work)
    w.mkdir(parents=True, exist_ok=True)
    data = c4_train_file("1000-1199", w)
    old = json.loads(Path(a.out).read_text()).get("steps", {}) if Path(a.out).is_file() else {}
    res = {"protocol": {"model": a.model, "versions": versions(), "machine": machine(),
                        "command": "python " + " ".join(sys.argv)}, "steps": {}}
    for name, args, needs in steps(a.model, w, data):
        if old.get(name, {}).get("rc") in (0, 2):  # ran, or refused in one line, in an earlier part
            res["steps"][name] = old[name]
            continue
        if needs and not (w / needs / "config.json").is_file() and not (w / needs / "adapters").is_dir():
            res["steps"][name] = {"skipped": f"needs {needs}"}
            continue
        t = time.time()
        p = subprocess.run(["prunetune", *args, "--overwrite"] if args[0] in ("prune", "shrink", "tune", "merge")
                           else ["prunetune", *args], capture_output=True, text=True)
        err = [l for l in p.stderr.splitlines() if "error:" in l]
        res["steps"][name] = {"command": "prunetune " + " ".join(args), "rc": p.returncode,
                              "wall_s": round(time.time() - t, 1),
                              "tail": [l for l in p.stdout.splitlines() if l.strip()][-3:],
                              "error": err[-1] if err else None, "traceback": "Traceback" in p.stderr}
        print(name, json.dumps(res["steps"][name]), flush=True)
        write_json_atomic(a.out, res)


if __name__ == "__main__":
    main()
