"""The public Python API. The CLI is a thin layer over these functions."""

from __future__ import annotations

import time
from pathlib import Path


from .devices import resolve_device as _device
from .errors import PrunetuneError
from .evaluation.perplexity import perplexity
from .io import check_output_file, load_model
from .manifest import measure, versions, machine, write_json_atomic

__all__ = ["load_model", "perplexity", "evaluate", "prune", "shrink", "tune", "merge", "convert", "bench", "report"]


def evaluate(model=None, *, ppl: list[str] | tuple = ("wikitext2",), seqlen: int = 512, batch_size: int = 8,
             max_windows: int | None = None, tasks: list[str] | None = None, limit: int | None = None,
             tasks_dir: str | None = None, dtype: str = "float32", device: str | None = None,
             out: str | Path | None = None, progress: bool = True, bos: str | None = None) -> dict:
    """Perplexity on each corpus in ``ppl`` (and zero-shot ``tasks``) of a model given by path/id/GGUF.
    ``bos``: ``stream`` | ``window`` | ``none`` (None: the family's default, see ``evaluation.perplexity``).

    Returns one result dict carrying its manifest; written atomically to ``out`` when given."""
    device = _device(device)
    if tasks is not None and limit is not None and limit <= 0:
        raise PrunetuneError(f"--limit must be positive (got {limit})")
    if out is not None:
        check_output_file(out)  # before the work, not after it
    t0 = time.time()
    with measure() as m:
        model_obj, tok, info = load_model(model, dtype=dtype, device=device)
        results = {"perplexity": {}}
        for corpus in ppl or ():
            results["perplexity"][corpus] = perplexity(model_obj, tok, corpus, seqlen=seqlen, batch_size=batch_size,
                                                       max_windows=max_windows, progress=progress, bos=bos)
        if tasks:
            from .evaluation.zeroshot import evaluate_zeroshot

            results["zeroshot"] = evaluate_zeroshot(model_obj, tok, list(tasks), limit=limit, tasks_dir=tasks_dir,
                                                    batch_size=batch_size, device=device)
    results["manifest"] = {
        "tool": "prunetune", "command": "eval", "model": info, "device": device,
        "versions": versions(), "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0)),
        **m.as_dict(),
    }
    if out is not None:
        write_json_atomic(out, results)
    return results


def prune(*args, **kwargs):
    from .pruning.api import prune as _prune

    return _prune(*args, **kwargs)


def shrink(*args, **kwargs):
    """A plain model with a smaller hidden size (pca | activation | magnitude); see
    :func:`prunetune.structured.api.shrink`."""
    from .structured.api import shrink as _shrink

    return _shrink(*args, **kwargs)


def bench(*args, **kwargs):
    """Speed, memory and size of models side by side; see :func:`prunetune.evaluation.speed.bench`."""
    from .evaluation.speed import bench as _bench

    return _bench(*args, **kwargs)


def report(*args, **kwargs):
    """Markdown tables and PNG plots from result files; see :func:`prunetune.evaluation.report.report`."""
    from .evaluation.report import report as _report

    return _report(*args, **kwargs)


def tune(*args, **kwargs):
    """Fine-tune a model (spp | lora | lora-masked | dora | pat, with optional distillation); see
    :func:`prunetune.tuning.api.tune`."""
    from .tuning.api import tune as _tune

    return _tune(*args, **kwargs)


def merge(*args, **kwargs):
    """Merge the adapters of a ``tune`` output into a plain checkpoint; see :func:`prunetune.tuning.api.merge`."""
    from .tuning.api import merge as _merge

    return _merge(*args, **kwargs)


def convert(model, *, out, save_format: str = "dense", overwrite: bool = False) -> dict:
    """Rewrite a local safetensors checkpoint as ``dense`` (what serving engines load) or ``compressed``
    (its sparse matrices in the sparse-bitmask layout, `prunetune.sparse_storage`). The weights are equal;
    ``out`` is written in one rename. Returns what was stored (sizes before and after)."""
    import shutil

    from . import sparse_storage as ss
    from .io import atomic_output_dir, check_output_dir, resolve_model, write_manifest

    ss.check_save_format(save_format)
    src = resolve_model(model)
    if src.kind != "local" or not any(f.endswith(".safetensors") for f in src.weight_files):
        raise PrunetuneError(f"convert takes a local safetensors checkpoint ('{src.spec}' is not one)")
    out_path = check_output_dir(out, overwrite=overwrite, inputs=(src.home,))
    t0 = time.time()
    with measure() as m, atomic_output_dir(out_path, overwrite=overwrite) as tmp:
        for f in Path(src.path).iterdir():  # the dense files (a compressed input's dense view)
            if f.is_file() and f.name != "prunetune_manifest.json":
                shutil.copy2(f, tmp / f.name)
        if save_format == "compressed":
            storage = ss.compress_checkpoint(tmp)
        else:
            storage = {"format": "dense", "weight_file_bytes_stored": sum(f.stat().st_size for f in tmp.glob("*.safetensors"))}
        storage["source_weight_file_bytes"] = sum(Path(f).stat().st_size for f in src.weight_files)
        write_manifest(tmp, {"tool": "prunetune", "command": "convert", "save_format": save_format,
                             "source_model": src.location(), "storage": storage})
    storage["manifest"] = {"tool": "prunetune", "command": "convert", "versions": versions(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0)), **m.as_dict()}
    storage["out"] = str(out_path)
    return storage


def demo(methods=("magnitude", "wanda", "sparsegpt", "apt"), sparsities=("0.5", "2:4"), *, nsamples: int = 32,
         seqlen: int = 256, out: str | Path | None = None, progress: bool = False) -> dict:
    """The main job on the embedded default: prune stories260K with each method, before/after perplexity.

    Calibration and evaluation both use the bundled TinyStories excerpt (in-domain for this model);
    perplexity with 512-token windows. Returns the rows and a printable table."""
    import tempfile

    from .io import load_model as _load
    from .paths import DEFAULT_MODEL

    model, tok, _ = _load(DEFAULT_MODEL)
    dense = perplexity(model, tok, "tinystories", seqlen=512, progress=False)["ppl"]
    rows = []
    with tempfile.TemporaryDirectory() as td:
        base = Path(out) if out else Path(td)
        for sp in sparsities:
            for meth in methods:
                d = base / f"stories260K-{meth}-{str(sp).replace(':', 'of')}"
                rep = prune(DEFAULT_MODEL, method=meth, sparsity=sp, out=d, calib="tinystories", nsamples=nsamples,
                            seqlen=seqlen, overwrite=True, progress=progress, device="cpu")
                m, t, _ = _load(d)
                ppl = perplexity(m, t, "tinystories", seqlen=512, progress=False)["ppl"]
                rows.append({"method": meth, "sparsity": str(sp), "ppl": ppl, "ratio": ppl / dense,
                             "measured_sparsity": rep["total"]["sparsity_of_pruned_matrices"],
                             "wall_time_s": rep["manifest"]["wall_time_s"]})
    lines = ["stories260K, TinyStories excerpt, perplexity (512-token windows); "
             f"calibration {nsamples} x {seqlen} tokens of the same excerpt, seed 0",
             f"{'method':<11}{'sparsity':>9}{'ppl':>9}{'x dense':>9}{'zeros':>8}{'time s':>8}",
             f"{'dense':<11}{'-':>9}{dense:>9.3f}{1.0:>9.3f}{0.0:>8.3f}{'-':>8}"]
    for r in rows:
        lines.append(f"{r['method']:<11}{r['sparsity']:>9}{r['ppl']:>9.3f}{r['ratio']:>9.3f}"
                     f"{r['measured_sparsity']:>8.3f}{r['wall_time_s']:>8.1f}")
    return {"dense_ppl": dense, "rows": rows, "table": "\n".join(lines)}
