"""One Markdown report with plots from prunetune result files.

Reads ``prunetune eval --out`` results, prune outputs (``prune_report.json`` or the directory holding it),
``prunetune bench`` results and the result file of ``benchmarks/prune_smollm2.py`` (``results.py``: anything
else is refused with one line naming the file); writes ``report.md`` (``tables.py``) and PNG plots
(``plots.py``) into ``out_dir``: a new folder is assembled next to it and renamed in one step, with a manifest
of their hashes; into an existing folder (it may hold the results themselves) each file is replaced atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import PrunetuneError, writing
from ..io import MANIFEST, check_writable, partial_dir_for, write_manifest
from .plots import _ppl_plots, _speed_plot, _zs_plot
from .results import PRUNE_REPORT, KNOWN, Source, _gather, read_result  # noqa: F401  (re-exported)
from .tables import _bench_section, _ppl_section, _prune_section, _zs_section


# --- writing -----------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def report(paths: list[str], *, out_dir) -> dict:
    """Read result files, write ``report.md`` and PNG plots into ``out_dir``; returns the paths written."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise PrunetuneError("give at least one result file to report on")
    sources = [read_result(p) for p in paths]
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise PrunetuneError(f"output path '{out}' exists and is not a directory")
    check_writable(out.parent)

    ppl_rows, zs, prunes, benches = _gather(sources)
    plots: dict[str, bytes] = {}
    plots.update(_ppl_plots(ppl_rows))
    plots.update(_zs_plot(zs))
    for b in benches:
        plots.update(_speed_plot(b))

    lines = ["# prunetune report", "", "Sources:", ""]
    for s in sources:
        man = s.data.get("manifest") or s.data.get("protocol") or {}
        ver = (man.get("versions") or {}).get("prunetune", "?")
        lines.append(f"- `{s.path}` — {s.kind}, prunetune {ver}"
                     + (f", device {man['device']}" if isinstance(man.get("device"), str) else "")
                     + (f", started {man['started']}" if man.get("started") else ""))
    lines.append("")
    lines += _ppl_section(ppl_rows)
    lines += _zs_section(zs)
    lines += _prune_section(prunes)
    for b in benches:
        lines += _bench_section(b)
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]

    files = {**plots, "report.md": "\n".join(lines).encode("utf-8")}
    record = {"tool": "prunetune", "command": "report", "inputs": [str(s.path) for s in sources]}
    fresh = not out.exists()
    target = partial_dir_for(out) if fresh else out
    try:
        with writing(target):
            if fresh:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
            for name, data in files.items():
                _write_atomic(target / name, data)
            if fresh:  # an existing folder may be another command's output: its manifest is not ours to replace
                write_manifest(target, record)
                os.replace(target, out)
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    md = out / "report.md"
    plots_written = [str(out / name) for name in plots]
    return {"report": str(md), "plots": plots_written,
            "written": [str(md), *plots_written, *([str(out / MANIFEST)] if fresh else [])],
            "inputs": [{"path": str(s.path), "kind": s.kind} for s in sources]}
