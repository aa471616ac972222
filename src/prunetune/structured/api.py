"""``shrink()``: one call from a model to a plain, smaller Hugging Face checkpoint (``hidden_size = k``).

Methods (all keep exactly the ``k`` PAT keeps for the same ratio: ``round((1 − ratio) · d)`` moved to the
nearest hidden size the family can load):

- ``pca`` (default): fold the RMSNorm gains, rotate the residual stream to the principal directions of its
  normalised activations on the calibration windows (the same function; ``rotation.py``), then drop the
  ``d − k`` directions of least variance (``slicing.py``). One global rotation, so the result is the family's
  own architecture, loadable by plain transformers.
- ``activation``: drop the ``d − k`` channels of least energy at the RMSNorm outputs (``channels.py``).
- ``magnitude``: drop the channels of smallest norm gains and reader-column norms (no data).

The output folder holds the checkpoint, ``shrink_report.json`` (protocol, kept channels or energy removed,
wall time, peak memory, optional perplexity before/after) and ``prunetune_manifest.json`` (file hashes and
the input as ``source_model``, which ``tune --teacher auto`` follows back).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data.calibration import sample_calibration
from ..errors import PrunetuneError
from ..evaluation.perplexity import before_after_lines, max_positions
from ..io import atomic_output_dir, check_output_dir, load_model, resolve_model, write_manifest
from ..manifest import machine, measure, peak_rss_mb, versions
from .slicing import check_ratio, check_sliceable, keep_count

SHRINK_METHODS = ("pca", "activation", "magnitude")
REPORT = "shrink_report.json"


def shrink_model(model, ratio: float, *, method: str = "pca", calib=None) -> tuple[torch.nn.Module, dict]:
    """``(smaller plain model, info)`` from a loaded model; ``calib``: a list of token-id batches (``pca``,
    ``activation``). ``pca`` rotates ``model`` in place (it keeps computing the same function)."""
    if method not in SHRINK_METHODS:
        raise PrunetuneError(f"unknown shrink method '{method}' (use {', '.join(SHRINK_METHODS)})")
    check_ratio(ratio, "shrink ratio")
    adapter = check_sliceable(model, "shrinking the hidden size")
    d = adapter.hidden_size
    k = keep_count(model.config, d, ratio, what="shrink ratio")
    info = {"method": method, "ratio": ratio, "hidden_size_before": d, "hidden_size": k, "removed_share": 1 - k / d}
    if method == "pca":
        from .rotation import energy_removed, rotate_model
        from .slicing import slice_hidden

        r = rotate_model(model, calib or [])
        small = slice_hidden(model, torch.arange(k))
        info.update(rotation="principal directions of the RMSNorm inputs (rms-weighted), one global Q",
                    energy_in_removed_directions=energy_removed(r["eigenvalues"], k), calibration_tokens=r["tokens"])
    else:
        from .channels import prune_channels

        small, ci = prune_channels(model, ratio, importance=method, calib=calib)
        info.update(kept_channels=ci["kept_channels"], calibration_tokens=ci["calibration_tokens"])
    small._prunetune_shrink_info["method"] = method
    return small, info


def shrink(model=None, *, ratio: float, out, method: str = "pca", calib: str = "c4", nsamples: int = 128,
           seqlen: int = 2048, seed: int = 0, batch_size: int = 8, eval_corpora=None, eval_seqlen: int = 512,
           eval_max_windows: int | None = None, dtype: str = "float32", device: str | None = None,
           overwrite: bool = False, progress: bool = True) -> dict:
    """Remove the fraction ``ratio`` of hidden channels of ``model`` (HF dir, Hub id or GGUF) and write the
    smaller plain checkpoint plus ``shrink_report.json`` to ``out`` (see the module docstring)."""
    from ..api import _device
    from ..pruning.api import _eval_pair

    if method not in SHRINK_METHODS:
        raise PrunetuneError(f"unknown shrink method '{method}' (use {', '.join(SHRINK_METHODS)})")
    check_ratio(ratio, "--ratio")
    for name, v in (("--nsamples", nsamples), ("--seqlen", seqlen), ("--batch-size", batch_size)):
        if int(v) <= 0:
            raise PrunetuneError(f"{name} must be positive (got {v})")
    device = _device(device)
    src = resolve_model(model)
    if src.kind == "local":
        from ..models.discover import preflight

        preflight(src.path)
    out_path = check_output_dir(out, overwrite=overwrite, inputs=(src.path if src.kind != "hub" else None,))
    t_start = time.time()
    with measure() as meas:
        net, tok, model_info = load_model(src.spec, dtype=dtype, device=device)
        check_sliceable(net, "shrinking the hidden size")
        calib_ids, calib_protocol = None, None
        if method != "magnitude":
            limit = max_positions(net.config)
            seqlen = min(int(seqlen), limit) if limit else int(seqlen)
            ids, calib_protocol = sample_calibration(tok, calib, int(nsamples), seqlen, seed)
            calib_ids = list(ids.split(int(batch_size)))
        small, info = shrink_model(net, ratio, method=method, calib=calib_ids)
        del net
        with atomic_output_dir(out_path, overwrite=overwrite) as tmp:
            small.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            report = {"shrink": info, "model": model_info, "calibration": calib_protocol,
                      "parameters": {"before": model_info.get("parameters"),
                                     "after": sum(p.numel() for p in small.parameters())}}
            report["manifest"] = {"tool": "prunetune", "command": "shrink", "method": method, "ratio": ratio,
                                  "dtype": dtype, "device": device, "versions": versions(), "machine": machine(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
                                  "wall_time_s": round(time.time() - t_start, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
            if eval_corpora:
                report["eval"] = _eval_pair(src.spec, tmp, eval_corpora, eval_seqlen, eval_max_windows, dtype, device)
            (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
            write_manifest(tmp, {"tool": "prunetune", "command": "shrink", "method": method, "ratio": ratio,
                                 "source_model": src.location()})
    report["manifest"].update(meas.as_dict())
    report["summary_table"] = summary_table(report)
    report["out"] = str(out_path)
    return report


def summary_table(report: dict) -> str:
    s, man = report["shrink"], report["manifest"]
    line = (f"shrink {s['method']}: hidden size {s['hidden_size_before']} -> {s['hidden_size']} (removed share "
            f"{s['removed_share']:.4f}), parameters {report['parameters']['before']:,} -> "
            f"{report['parameters']['after']:,}")
    if "energy_in_removed_directions" in s:
        line += f", energy in the removed directions {s['energy_in_removed_directions']:.4f}"
    lines = [line, f"wall {man.get('wall_time_s', 0):.1f}s, peak RSS {man.get('peak_rss_mb', 0):.0f} MB"]
    return "\n".join(lines + before_after_lines(report.get("eval")))
