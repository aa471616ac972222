#!/usr/bin/env python3
"""Sparse SmolLM2 checkpoints stored compressed (sparse-bitmask): size on disk, peak RAM and time at load, the
round trip bit for bit, and the stored tensors checked against compressed-tensors' own code.

    python benchmarks/sparse_storage.py --out benchmarks/results/sparse_storage_smollm2.json

Protocol: SmolLM2-135M-Instruct pruned by magnitude (the layout does not depend on the method) at 50%, 70%
and 2:4 in float32, and 50% in bfloat16, written dense; ``prunetune convert --save-format compressed`` of each.
Sizes: the 210 pruned matrices (dense vs stored bytes) and the whole weight files (embeddings stay dense).
Load: ``prunetune.load_model`` of each folder in a fresh process (peak RSS from ``ru_maxrss``, wall time).
Round trip: every tensor of the compressed load equals the dense load bit for bit (a ``-0.0`` reads as
``+0.0``). Reference: the compressed-tensors 0.12.2 wheel (the last line with the sparse compressors; fetched
with pip into ``--work``, not vendored) compresses each dense matrix with ``BitmaskTensor.from_dense``, whose
four tensors must equal the stored ones, and ``BitmaskCompressor.decompress`` reads the folder back.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import prunetune as pt  # noqa: E402
from bench_common import ResultFile, run_protocol  # noqa: E402

SPECS = {"50%": ("0.5", "float32"), "70%": ("0.7", "float32"), "2:4": ("2:4", "float32"),
         "50% bf16": ("0.5", "bfloat16")}

LOAD = """
import json, resource, sys, time
t = time.time()
from prunetune.io import load_model
m, _, _ = load_model(sys.argv[1], dtype=sys.argv[2], tokenizer=False)
print(json.dumps({"wall_s": round(time.time() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""

REFERENCE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file
from pathlib import Path
from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskCompressor, BitmaskTensor
from compressed_tensors.config import BitmaskConfig
dense, comp = Path(sys.argv[2]), Path(sys.argv[3])
dw, cw = {}, {}
for f in sorted(dense.glob("*.safetensors")): dw.update(load_file(str(f)))
for f in sorted(comp.glob("*.safetensors")): cw.update(load_file(str(f)))
same = checked = 0
for k, w in dw.items():
    m = k[:-len(".weight")]
    if m + ".compressed" not in cw:
        continue
    ref = BitmaskTensor.from_dense(w + 0.0).dict(m)
    checked += 1
    same += all(torch.equal(ref[n], cw[n]) and ref[n].dtype == cw[n].dtype for n in ref)
back = dict(BitmaskCompressor(config=BitmaskConfig()).decompress(str(comp)))
read = sum(torch.equal(back[k], dw[k] + 0.0) for k in back if k in dw and k[:-len(".weight")] + ".compressed" in cw)
import compressed_tensors
print(json.dumps({"compressed_tensors": compressed_tensors.__version__, "matrices": checked,
                  "stored_tensors_equal_reference": same, "reference_decompress_equal": read}))
"""


def sh(*cmd, **kw) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{p.stderr[-2000:]}")
    return p.stdout


def reference_code(work: Path) -> Path:
    """compressed-tensors 0.12.2 unpacked in ``work`` (fetched from the package index once)."""
    d = work / "compressed-tensors-0.12.2"
    if not (d / "compressed_tensors").is_dir():
        sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "compressed-tensors==0.12.2", "-d", work / "wheels")
        import zipfile

        zipfile.ZipFile(next((work / "wheels").glob("compressed_tensors-0.12.2*.whl"))).extractall(d)
    return d


def weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def load_stats(d: Path, dtype: str) -> dict:
    return json.loads(sh(sys.executable, "-c", LOAD, d, dtype).strip().splitlines()[-1])


def bit_equal(a: Path, b: Path, dtype: str) -> dict:
    from prunetune.io import load_model

    x, _, _ = load_model(str(a), dtype=dtype, tokenizer=False)
    y, _, _ = load_model(str(b), dtype=dtype, tokenizer=False)
    sx, sy = x.state_dict(), y.state_dict()
    bad = [k for k in sx if k not in sy or not torch_equal_bits(sx[k] + 0.0, sy[k])]
    return {"tensors": len(sx), "differ": len(bad), "first_difference": bad[0] if bad else None}


def torch_equal_bits(a, b) -> bool:
    import torch

    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "storage"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_storage_smollm2.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ref = reference_code(work)
    res = ResultFile(a.out, run_protocol("sparse_storage.py", model=Path(a.dense).name, pruned_by="magnitude"))
    res.set("dense_model", {"weight_file_bytes": weight_bytes(Path(a.dense)),
                            "load": load_stats(Path(a.dense), "float32")})
    for label, (sp, dtype) in SPECS.items():
        if res.done(label):
            continue
        tag = label.replace("%", "").replace(":", "of").replace(" ", "-")
        dense, comp = work / f"dense-{tag}", work / f"comp-{tag}"
        t = time.time()
        if not (dense / "config.json").is_file():
            pt.prune(a.dense, method="magnitude", sparsity=sp, out=str(dense), nsamples=1, seqlen=32, dtype=dtype,
                     device="cpu", overwrite=True, progress=False)
        st = pt.convert(str(dense), out=str(comp), save_format="compressed", overwrite=True)
        row = {k: v for k, v in st.items() if k not in ("out", "manifest")}
        row.update(dtype=dtype, convert_wall_s=round(time.time() - t, 1),
                   load_dense=load_stats(dense, dtype), load_compressed=load_stats(comp, dtype),
                   round_trip=bit_equal(dense, comp, dtype),
                   reference=json.loads(sh(sys.executable, "-c", REFERENCE, ref, dense, comp).strip().splitlines()[-1]))
        res.record(label, row)
        print(label, json.dumps({k: row[k] for k in ("matrix_ratio", "checkpoint_ratio", "round_trip", "reference")}))

if __name__ == "__main__":
    main()
