#!/usr/bin/env python3
"""The ALPS authors' code (mazumder-lab/ALPS ``alps.py``) and prunetune's APT and SparseGPT on the same model,
calibration tokens and scoring: the side-by-side run that BENCHMARKS §1's APT claim rests on.

    git clone https://github.com/mazumder-lab/ALPS runs/ALPS        # fetched, never vendored
    python benchmarks/alps_smollm2.py --alps-dir runs/ALPS --settings 0.5 0.6 0.7 2:4 \
        --methods alps apt sparsegpt --out benchmarks/results/alps_smollm2.json

Every run prunes SmolLM2-135M-Instruct from the same ``--nsamples`` x ``--seqlen`` windows of ``--calib`` (C4;
prunetune's sampler, seed 0) and scores the first ``--ppl-windows`` windows of 512 tokens of each corpus in one loop
(``prunetune.evaluate``), the dense model on the same windows.

``alps`` runs the authors' ``ALPS_prune`` class as their ``llama.py`` drives it: per decoder layer, every linear's
``XᵀX`` from one pass of the layer's inputs (all at once, not true-sequential), ``ALPS_admm(sp, nm_n, nm_m,
rho=0.1)`` with its defaults, then the layer's outputs recomputed from the pruned layer. Two things differ from
their script, neither touching the maths: ``alps.py`` is read from the checkout and its hard-coded ``'cuda:0'``
becomes the CPU (its ``torch.cuda.synchronize()`` a no-op), and the layer inputs and arguments come from
prunetune's adapter (transformers 5: ``position_embeddings``, ``use_cache=False``, no cache object — their
driver's ``attention_mask``/``position_ids`` calling convention is gone). ``apt`` / ``sparsegpt`` are
``prunetune.prune`` with defaults (``apt:damp=0.01``, ``apt:true_sequential=0``, ``apt:admm_dual=keep`` pass
options; anything but ``damp`` and ``true_sequential`` is a ``--method-opt``). Results are written after every
run; a run already in the file is skipped and a killed prunetune prune resumes from its journal, so a killed
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import ResultFile, ensure_model, run_protocol  # noqa: E402

import prunetune as pt  # noqa: E402


def evaluate(model_dir, a) -> dict:
    r = pt.evaluate(str(model_dir), ppl=a.corpora, seqlen=512, max_windows=a.ppl_windows, device="cpu",
                    progress=False)
    return {"ppl": {c: v["ppl"] for c, v in r["perplexity"].items()}}


def load_alps(alps_dir: Path) -> types.ModuleType:
    """``alps.py`` of the checkout as a module, its device strings pointed at the CPU."""
    src = (alps_dir / "alps.py").read_text()
    src = src.replace("'cuda:0'", "'cpu'").replace("torch.cuda.synchronize()", "pass")
    mod = types.ModuleType("alps_reference")
    mod.__file__ = str(alps_dir / "alps.py")
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def sparsity_args(setting: str) -> dict:
    if ":" in setting:
        n, m = (int(x) for x in setting.split(":"))
        return {"sp": 1 - n / m, "nm_n": n, "nm_m": m}
    return {"sp": float(setting), "nm_n": 0, "nm_m": 0}


def run_alps(setting: str, a, out: Path) -> dict:
    """The authors' driver loop (``llama.py: llama_sequential``) over prunetune's layer inputs."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunetune.data.bos import family_bos
    from prunetune.data.calibration import sample_calibration
    from prunetune.models.registry import get_adapter

    alps = load_alps(Path(a.alps_dir))
    tok = AutoTokenizer.from_pretrained(a.dense)
    model = AutoModelForCausalLM.from_pretrained(a.dense, dtype=torch.float32).eval()
    model.config.use_cache = False
    ids, calib = sample_calibration(tok, a.calib, a.nsamples, a.seqlen, 0, bos=family_bos(model.config.model_type))
    adapter = get_adapter(model)
    t0 = time.time()
    with torch.no_grad():
        inputs = adapter.first_layer_inputs(list(ids.split(8)), "cpu")
        hidden, kwargs = inputs.hidden, inputs.layer_kwargs
        per_layer, errors = [], []
        for i, layer in enumerate(adapter.layers):
            tl = time.time()
            lins = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            scd = {n: alps.ALPS_prune(m, nsamples=a.nsamples, seqlen=a.seqlen) for n, m in lins.items()}
            hooks = [m.register_forward_hook(lambda mod, inp, o, n=n: scd[n].add_batch(inp[0].data, o.data))
                     for n, m in lins.items()]
            for h in hidden:
                adapter.run_layer(layer, h, kwargs[i])
            for h in hooks:
                h.remove()
            for n in lins:
                errors.append({"name": f"{i}.{n}", "rel_error": float(scd[n].ALPS_admm(**sparsity_args(setting),
                                                                                         rho=0.1))})
                scd[n].free()
            hidden = [adapter.run_layer(layer, h, kwargs[i]) for h in hidden]
            per_layer.append(round(time.time() - tl, 2))
            print(f"  alps {setting} layer {i}: {per_layer[-1]} s", flush=True)
    prune_s = time.time() - t0
    lins = [m.weight for layer in adapter.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    sparsity = sum(int((w == 0).sum()) for w in lins) / sum(w.numel() for w in lins)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"prune_s": round(prune_s, 1), "layer_s": per_layer, "sparsity": sparsity, "calibration": calib, "objective": errors,
            "deviation": "alps.py on the CPU ('cuda:0' -> 'cpu'); layer inputs and kwargs from prunetune's adapter"}


def run_prunetune(method: str, setting: str, a, out: Path) -> dict:
    name, *opts = method.split(":")
    kw, method_opts = {}, {}
    for k, v in (o.split("=", 1) for o in opts):
        if k == "true_sequential":
            kw[k] = v not in ("0", "false")
        elif k == "damp":
            kw[k] = float(v)
        else:  # a method option, as --method-opt KEY=VALUE
            method_opts[k] = v
    sp = setting if ":" in setting else float(setting)
    resume = (out.parent / f".{out.name}.partial" / "resume" / "journal.json").is_file()  # a killed prune goes on
    t0 = time.time()
    rep = pt.prune(a.dense, method=name, sparsity=sp, out=str(out), calib=a.calib, nsamples=a.nsamples,
                   seqlen=a.seqlen, seed=0, overwrite=True, progress=False, method_opts=method_opts,
                   resume=resume, **kw)
    # layer_s: each layer's capture + prune + forward, as the ALPS loop's layer_s (prune_s also counts the model's
    # loading, calibration sampling, the layer-error report and the writing, which the ALPS loop's does not)
    return {"prune_s": round(time.time() - t0, 1), "layer_s": rep["manifest"].get("layer_wall_time_s"),
            "calibration": rep["manifest"].get("calibration"),
            "mean_rel_error": sum(r["rel_error"] for r in rep["layers"]) / len(rep["layers"]),
            "sparsity": rep["total"]["sparsity_of_pruned_matrices"]}


def markdown(res: dict) -> str:
    dense = res["runs"]["dense"]["ppl"]
    corpora = list(dense)
    settings = sorted({k.split("@")[1] for k in res["runs"] if "@" in k})
    lines = ["| setting | method | " + " | ".join(corpora) + " | increase vs SparseGPT's (" + corpora[0] +
             ") | prune s |", "|---|---|" + "---|" * len(corpora) + "---|---|"]
    for s in settings:
        sg = res["runs"].get(f"sparsegpt@{s}")
        for key, r in res["runs"].items():
            if not key.endswith("@" + s):
                continue
            rel = ""
            if sg:
                rel = f"{(r['ppl'][corpora[0]] - dense[corpora[0]]) / (sg['ppl'][corpora[0]] - dense[corpora[0]]):.3f}x"
            lines.append(f"| {s} | {key.split('@')[0]} | " + " | ".join(f"{r['ppl'][c]:.2f}" for c in corpora) +
                         f" | {rel} | {r['prune_s']} |")
    return "\n".join(lines)


def pivot(res: dict) -> str:
    """One row per method, one column per setting: perplexity of each corpus, " / "-joined."""
    runs = res["runs"]
    corpora = list(runs["dense"]["ppl"])
    # unstructured settings by sparsity, then N:M ones
    settings = sorted({k.split("@")[1] for k in runs if "@" in k}, key=lambda s: (":" in s, s))
    methods = list(dict.fromkeys(k.split("@")[0] for k in runs if "@" in k))
    lines = [f"| method ({' / '.join(corpora)}) | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings),
             "| dense | " + " | ".join(" / ".join(f"{runs['dense']['ppl'][c]:.2f}" for c in corpora)
                                     for _ in settings) + " |"]
    for m in methods:
        cells = [" / ".join(f"{runs[f'{m}@{s}']['ppl'][c]:.2f}" for c in corpora) if f"{m}@{s}" in runs else "-"
                 for s in settings]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--alps-dir", default=str(ROOT / "runs" / "ALPS"), help="a checkout of mazumder-lab/ALPS")
    ap.add_argument("--settings", nargs="*", default=["0.5", "0.6", "0.7", "2:4"])
    ap.add_argument("--methods", nargs="*", default=["alps", "apt", "sparsegpt"])
    ap.add_argument("--calib", default="c4", help="calibration corpus (tinystories: the out-of-domain study)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "alps"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "alps_smollm2.json"))
    ap.add_argument("--markdown", action="store_true", help="print the table of --out (rows: setting x method)")
    ap.add_argument("--pivot", action="store_true", help="print the table of --out (rows: method; columns: setting)")
    a = ap.parse_args()
    if a.markdown or a.pivot:
        print((pivot if a.pivot else markdown)(json.loads(Path(a.out).read_text())))
        return
    if "alps" in a.methods and not (Path(a.alps_dir) / "alps.py").is_file():
        raise SystemExit(f"no alps.py in {a.alps_dir}: git clone https://github.com/mazumder-lab/ALPS {a.alps_dir}")
    rf = ResultFile(a.out, run_protocol("alps_smollm2.py", model=Path(a.dense).name,
                                        calibration=f"{a.calib} {a.nsamples} x {a.seqlen}, seed 0, prunetune's sampler",
                                        ppl=f"first {a.ppl_windows} windows of 512 tokens: {', '.join(a.corpora)}"))
    ensure_model(a.dense)
    if not rf.done("dense"):
        rf.record("dense", evaluate(a.dense, a))
    for setting in a.settings:
        for method in a.methods:
            key = f"{method}@{setting}"
            if rf.done(key):
                continue
            print(f"== {key}", flush=True)
            out = Path(a.work) / key.replace(":", "_").replace("@", "-")
            row = run_alps(setting, a, out) if method == "alps" else run_prunetune(method, setting, a, out)
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            row.update(evaluate(out, a))
            shutil.rmtree(out, ignore_errors=True)
            rf.record(key, row)
            print(json.dumps({"ppl": row["ppl"], "prune_s": row["prune_s"]}), flush=True)
    print(markdown(rf.data))


if __name__ == "__main__":
    main()
