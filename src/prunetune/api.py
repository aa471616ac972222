"""The public Python API. The CLI is a thin layer over these functions."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import PrunetuneError
from .evaluate.perplexity import perplexity
from .io import load_model
from .manifest import measure, versions, machine, write_json_atomic

__all__ = ["load_model", "perplexity", "evaluate", "prune"]


def _device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrunetuneError(f"device '{device}' is not available on this machine (no CUDA GPU)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise PrunetuneError(f"unknown device '{device}' (use cpu, cuda or cuda:N)")
    return device


def evaluate(model=None, *, ppl: list[str] | tuple = ("wikitext2",), seqlen: int = 512, batch_size: int = 8,
             max_windows: int | None = None, tasks: list[str] | None = None, limit: int | None = None,
             tasks_dir: str | None = None, dtype: str = "float32", device: str | None = None,
             out: str | Path | None = None, progress: bool = True) -> dict:
    """Perplexity on each corpus in ``ppl`` (and zero-shot ``tasks``) of a model given by path/id/GGUF.

    Returns one result dict carrying its manifest; written atomically to ``out`` when given."""
    device = _device(device)
    if tasks is not None and limit is not None and limit <= 0:
        raise PrunetuneError(f"--limit must be positive (got {limit})")
    t0 = time.time()
    with measure() as m:
        model_obj, tok, info = load_model(model, dtype=dtype, device=device)
        results = {"perplexity": {}}
        for corpus in ppl or ():
            results["perplexity"][corpus] = perplexity(model_obj, tok, corpus, seqlen=seqlen, batch_size=batch_size,
                                                       max_windows=max_windows, progress=progress)
        if tasks:
            from .evaluate.zeroshot import evaluate_zeroshot

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
    from .prune.api import prune as _prune

    return _prune(*args, **kwargs)
