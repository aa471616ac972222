#!/usr/bin/env python3
"""Bounded-memory merge: SPP's merge and PAT's shrink of a 7B-shaped Llama checkpoint, tensor by tensor.

    python benchmarks/merge_7b.py --base /work/runs/m7/full/dense --work /work/runs/m7/merge \
        --out benchmarks/results/merge_7b.json                       # 32 layers, ~13.5 GB checkpoint
    python benchmarks/merge_7b.py --base /work/runs/m7/merge2l/dense --layers 2 --work /work/runs/m7/merge2l/work \
        --out benchmarks/results/merge_7b_2l.json --check-load        # quick check: 2 layers, ~1.3 GB checkpoint
    python benchmarks/merge_7b.py --base DIR --methods pat --keep      # one method, keep the merged output

Time with one thread (OMP_NUM_THREADS=1, 2 shared cores): at 2 layers SPP ~45 s, PAT ~3.5 min; PAT's float64
products (rotation, then D[keep, :] on every writer) cost ~1 min per 7B layer, so PAT at 32 layers takes ~35-40
min; SPP at 32 layers is mostly I/O (three passes over the checkpoint: fingerprint, merge, zero-pattern check).

``--base``: a 7B-shaped checkpoint (Llama-2-7B shapes, random bf16 weights); written with
``memory_7b.write_checkpoint`` (``--layers`` deep) when ``DIR/config.json`` is missing. For each method, random-
weight adapters of the right shapes are written into ``--work`` in exactly the format ``tune`` leaves them
(the method's own ``save_adapters`` on the base model's meta-device skeleton, only the adapter tensors made
real, plus ``prunetune_adapter.json`` with no base fingerprint):

- ``spp``: ``w_alpha`` (groups x in) and ``w_beta`` (out x 1) on every linear of every layer (default options);
- ``pat``: ratio 0.25 (hidden 4096 -> 3072), rotate (a random orthogonal float64 4096 x 4096 ``Q``), LoRA r=8 on
  every linear, one HSM (rank 5% of d) on the embedding and on each o_proj / down_proj, a finalised mask.

Then ``prunetune merge ADAPTERS --out OUT --dtype bfloat16 --device cpu`` runs in a child process (the streamed
merge: ``tuning/streamed.py``). Measured per method: peak resident memory — the merge report's own (VmHWM
from the job's start, ``manifest.peak_rss_mb``) and the child's ``ru_maxrss`` from ``wait4`` (Linux carries
the parent's peak over fork + exec, so only an upper bound) —, its share of the checkpoint size, wall time,
the output's size, SPP's zero-pattern check and PAT's new hidden size. Target: peak RSS <= 25% of the
checkpoint size. ``--check-load`` (shallow checkpoints only) also loads each merged output with transformers and
runs one forward. Result: ``--out``; merged outputs are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_7b import write_checkpoint  # noqa: E402

OPTIONS = {"spp": {}, "pat": {"ratio": 0.25, "rotate": True, "lora_r": 8}}


def _kaiming(shape, g):
    """``nn.init.kaiming_uniform_(a=sqrt(5))`` of an (out, in) tensor: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


def _fill(method: str, name: str, shape: tuple, g: torch.Generator, pat_keep: dict) -> torch.Tensor:
    """A random value of sensible scale for the adapter tensor ``name`` (what a trained adapter looks like:
    the trained factors away from their zero init)."""
    leaf = name.rsplit(".", 1)[-1]
    if method == "spp":
        if leaf == "w_alpha":
            return _kaiming(shape, g)
        if leaf == "w_beta":
            return torch.randn(*shape, generator=g) * 0.02
    if method == "pat":
        if ".lora_A." in name:
            return _kaiming(shape, g)
        if ".lora_B." in name:
            return torch.randn(*shape, generator=g) * 0.01
        if leaf == "L0":
            return _kaiming(shape, g)
        if leaf == "L1":
            return torch.randn(*shape, generator=g) * 0.01
        if leaf == "v":
            return 1 + 0.1 * torch.randn(*shape, generator=g)
        if leaf == "W_M":
            w = torch.randn(*shape, generator=g)
            pat_keep["W_M"] = w
            return w
        if leaf == "final":  # the finalised gate (as after the last step): the top n_keep of W_M
            from prunetune.structured.slicing import topk_keep

            m = torch.zeros(pat_keep["d"])
            m[topk_keep(pat_keep["W_M"], pat_keep["n_keep"])] = 1.0
            return m
    raise ValueError(f"no rule for {method} adapter tensor '{name}'")


def _is_adapter(method: str, name: str) -> bool:
    if method == "spp":
        return name.endswith((".w_alpha", ".w_beta"))
    return "lora_" in name or name.startswith("prunetune_pat.")


def write_adapters(method: str, base: Path, adir: Path, seed: int = 0) -> dict:
    """Random-weight adapters of ``method`` for the checkpoint ``base``, in ``tune``'s on-disk format."""
    from prunetune.checkpoint import skeleton
    from prunetune.tuning.api import ADAPTER_RECORD
    from prunetune.tuning.base import get_method

    if adir.name == "adapters":
        raise SystemExit("the adapter folder must not be named 'adapters' (merge would check its parent's manifest)")
    g = torch.Generator().manual_seed(seed)
    tm = get_method(method)(**OPTIONS[method])
    model = skeleton(base, torch.float32)  # meta device: no weight; adapters in float32 as tune makes them
    pat_keep = {}
    if method == "pat":
        from prunetune.tuning.methods.pat.method import check_model

        d, n_keep = check_model(model, tm.config)
        pat_keep.update(d=d, n_keep=n_keep)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        tm.rotation = (q * torch.sign(torch.diagonal(r))).contiguous()  # random orthogonal (Haar), float64
    torch.manual_seed(seed)
    model = tm.prepare(model)
    n_real = 0
    # W_M before final (final is drawn from W_M); named_modules order puts the mask's W_M param first
    for mname, mod in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for pname, t in list(getattr(mod, kind).items()):
                full = f"{mname}.{pname}" if mname else pname
                if t is None or not _is_adapter(method, full):
                    continue
                shape = tuple(t.shape) if not (method == "pat" and pname == "final") else (pat_keep["d"],)
                value = _fill(method, full, shape, g, pat_keep).to(t.dtype)
                if kind == "_parameters":
                    mod._parameters[pname] = nn.Parameter(value, requires_grad=t.requires_grad)
                else:
                    mod._buffers[pname] = value
                n_real += value.numel()
    adir.mkdir(parents=True, exist_ok=True)
    tm.save_adapters(model, adir)
    cfg = json.loads((base / "config.json").read_text())
    record = {"format": 2, "tool": "prunetune", "method": tm.name, "method_config": tm.options(),
              "base_model": {"spec": str(base), "kind": "local", "path": str(base), "gguf_file": None,
                             "model_type": cfg.get("model_type"), "dtype": "bfloat16", "weights_sha256": None,
                             "fingerprint": None},  # no fingerprint: merge skips the base check (random adapters)
              "run_fingerprint": None, "benchmark": "random-weight adapters (benchmarks/merge_7b.py)"}
    (adir / ADAPTER_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    files = {f.name: f.stat().st_size for f in sorted(adir.iterdir())}
    return {"adapter_parameters": n_real, "adapter_files_bytes": files}


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def run_merge(adir: Path, out: Path) -> dict:
    """``prunetune merge`` in a child process; its wall time and its own ``ru_maxrss`` (``os.wait4``)."""
    cmd = [sys.executable, "-m", "prunetune", "merge", str(adir), "--out", str(out), "--dtype", "bfloat16",
           "--device", "cpu", "--overwrite"]
    log = out.parent / f"{out.name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        pid = os.posix_spawn(sys.executable, cmd, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, fh.fileno(), 1),
                                                                             (os.POSIX_SPAWN_DUP2, fh.fileno(), 2)])
        _, status, ru = os.wait4(pid, 0)
    wall = time.time() - t0
    rc = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if rc != 0:
        print(text[-3000:])
        raise SystemExit(f"merge failed ({rc}): {' '.join(cmd)}")
    log.unlink()
    return {"command": " ".join(["prunetune"] + cmd[3:]), "wall_s": round(wall, 1),
            "ru_maxrss_bytes": ru.ru_maxrss * 1024, "stdout": text.strip().splitlines()[-4:]}


def check_load(out: Path) -> dict:
    """Load a (shallow) merged checkpoint with plain transformers and run one forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
    with torch.no_grad():
        logits = model(ids).logits
    return {"hidden_size": model.config.hidden_size, "logits_shape": list(logits.shape),
            "finite": bool(torch.isfinite(logits).all()), "parameters": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="7B-shaped checkpoint (written there if config.json is missing)")
    ap.add_argument("--layers", type=int, default=None, help="depth when writing --base (default: 32)")
    ap.add_argument("--work", required=True, help="folder for the adapters and the merged outputs")
    ap.add_argument("--methods", nargs="+", default=["spp", "pat"], choices=sorted(OPTIONS))
    ap.add_argument("--out", default=None, help="result JSON (default: print only)")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs (and adapters)")
    ap.add_argument("--check-load", action="store_true",
                    help="load each merged output with transformers and run one forward (shallow checkpoints)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from bench_common import run_protocol
    from prunetune.manifest import write_json_atomic

    base, work = Path(a.base).resolve(), Path(a.work).resolve()
    t0 = time.time()
    wrote = False
    if not (base / "config.json").is_file():
        write_checkpoint(base, layers=a.layers)
        wrote = True
    write_s = time.time() - t0
    ck_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    if a.check_load and layers > 4:
        raise SystemExit("--check-load loads the whole merged model: only for a shallow checkpoint (--layers <= 4)")
    res = {"checkpoint": "Llama-2-7B shapes, random bf16 weights", "base": str(base), "layers": layers,
           "checkpoint_bytes": ck_bytes, "checkpoint_written_s": round(write_s, 1) if wrote else None,
           "target_share": 0.25, "adapters": "random weights of the trained shapes (see the script's docstring)",
           "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}, "methods": {}}
    work.mkdir(parents=True, exist_ok=True)
    for method in a.methods:
        adir, out = work / f"{method}-adapter", work / f"{method}-merged"
        t1 = time.time()
        info = write_adapters(method, base, adir, a.seed)
        gen_s = time.time() - t1
        run = run_merge(adir, out)
        report = json.loads((out / "merge_report.json").read_text())
        man = report["manifest"]
        peak = man["peak_rss_mb"] * 2 ** 20
        r = {"options": OPTIONS[method], "adapter_generation_s": round(gen_s, 1), **info, **run,
             "streamed": report.get("streamed"), "peak_rss_mb": man["peak_rss_mb"],
             "peak_rss_share_of_checkpoint": round(peak / ck_bytes, 4),
             "meets_target": peak <= 0.25 * ck_bytes,
             "ru_maxrss_share_of_checkpoint": round(run["ru_maxrss_bytes"] / ck_bytes, 4),
             "merge_wall_time_s": man["wall_time_s"], "output_bytes": _size(out),
             "output_weight_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
        if "zero_pattern_check" in report:
            r["zero_pattern_check"] = report["zero_pattern_check"]
            r["sparsity"] = report.get("sparsity")
        if "pat" in report:
            r["pat"] = {k: v for k, v in report["pat"].items() if k != "kept_channels"}
            r["pat"]["kept_channels"] = len(report["pat"]["kept_channels"])
            r["output_share_of_checkpoint"] = round(r["output_weight_bytes"] / ck_bytes, 4)
        if a.check_load:
            r["transformers_load"] = check_load(out)
        res["methods"][method] = r
        print(json.dumps({method: r}, indent=2), flush=True)
        if not a.keep:
            shutil.rmtree(out)
            shutil.rmtree(adir)
        res.update(run_protocol("merge_7b.py"))  # versions, machine, this script's command line
        if a.out:  # after each method: a long run that stops keeps what it measured
            write_json_atomic(Path(a.out), res)
    print(json.dumps({m: {k: v[k] for k in ("peak_rss_mb", "peak_rss_share_of_checkpoint", "merge_wall_time_s")}
                      for m, v in res["methods"].items()}, indent=2))
    if not a.keep and not any(work.iterdir()):
        work.rmdir()


if __name__ == "__main__":
    main()
