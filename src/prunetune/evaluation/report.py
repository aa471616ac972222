"""One Markdown report with plots from prunetune result files.

Reads ``prunetune eval --out`` results, prune outputs (``prune_report.json`` or the directory holding it),
``prunetune bench`` results and the result file of ``benchmarks/prune_smollm2.py``; anything else is refused
with one line naming the file. Writes ``report.md`` and PNG plots into ``out_dir``: a new folder is assembled
next to it and renamed in one step, with a manifest of their hashes; into an existing folder (it may hold the
results themselves) each file is replaced atomically.

Perplexity rows are keyed by model (the last component of its path or Hub id), method and sparsity. An eval of a
directory that holds a ``prune_report.json`` takes its method and sparsity from it; any other eval counts as the
dense model. Ratios to dense use the dense perplexity of the same file when it has one (a prune report's
``eval.before``), else a dense entry of the same model and corpus from the other files.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrunetuneError, writing
from ..io import MANIFEST, check_writable, partial_dir_for, write_manifest

PRUNE_REPORT = "prune_report.json"
KNOWN = "prunetune eval, prune and bench results and benchmarks/prune_smollm2.py result files"


# --- reading and validating --------------------------------------------------------------------
@dataclass
class Source:
    path: Path
    kind: str  # "eval", "prune", "bench", "prune_benchmark"
    data: dict


def _bad(path: Path, why: str) -> PrunetuneError:
    return PrunetuneError(f"'{path}' {why}")


def _require(cond: bool, path: Path, kind: str, what: str) -> None:
    if not cond:
        raise _bad(path, f"is not a valid prunetune {kind} result ({what})")


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_result(path: str | os.PathLike) -> Source:
    """Read and classify one result file; a directory means its prune_report.json."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / PRUNE_REPORT).is_file():
            raise _bad(p, f"is a directory without {PRUNE_REPORT} (not a prunetune prune output)")
        p = p / PRUNE_REPORT
    if not p.exists():
        raise _bad(p, "does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _bad(p, "is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise _bad(p, f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except OSError as e:
        raise _bad(p, f"cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise _bad(p, f"is not a prunetune result (expected a JSON object; report reads {KNOWN})")
    man = data.get("manifest")
    if isinstance(man, dict) and man.get("tool") == "prunetune":
        cmd = man.get("command")
        if cmd == "eval":
            ppl = data.get("perplexity")
            _require(isinstance(ppl, dict), p, "eval", "no 'perplexity' object")
            for c, r in ppl.items():
                _require(isinstance(r, dict) and _is_num(r.get("ppl")), p, "eval", f"perplexity '{c}' has no number")
            zs = data.get("zeroshot")
            if zs is not None:
                _require(isinstance(zs, dict) and isinstance(zs.get("tasks"), dict), p, "eval", "zeroshot without tasks")
            _require(isinstance(man.get("model"), dict), p, "eval", "manifest without model")
            return Source(p, "eval", data)
        if cmd == "prune":
            _require(isinstance(data.get("total"), dict) and isinstance(data.get("layers"), list), p, "prune",
                     "no 'layers'/'total'")
            _require("method" in man and "sparsity" in man, p, "prune", "manifest without method/sparsity")
            ev = data.get("eval")
            if ev is not None:
                ok = isinstance(ev, dict) and all(isinstance(ev.get(k), dict) for k in ("before", "after"))
                _require(ok, p, "prune", "'eval' without before/after")
                for tag in ("before", "after"):
                    for c, r in ev[tag].items():
                        _require(isinstance(r, dict) and _is_num(r.get("ppl")), p, "prune", f"eval.{tag}.{c} has no ppl")
            return Source(p, "prune", data)
        if cmd == "bench":
            ok = all(isinstance(data.get(k), list) for k in ("models", "prefill", "decode"))
            _require(ok, p, "bench", "no 'models'/'prefill'/'decode' lists")
            return Source(p, "bench", data)
        raise _bad(p, f"is a prunetune '{cmd}' result, which report does not read (it reads {KNOWN})")
    prot, runs = data.get("protocol"), data.get("runs")
    if isinstance(prot, dict) and isinstance(runs, dict) and isinstance(prot.get("versions"), dict) \
            and "prunetune" in prot["versions"]:
        for key, r in runs.items():
            ok = isinstance(r, dict) and "method" in r and "sparsity" in r and isinstance(r.get("ppl"), dict) \
                and all(_is_num(v) for v in r["ppl"].values())
            _require(ok, p, "benchmark", f"run '{key}' has no method/sparsity/ppl")
        return Source(p, "prune_benchmark", data)
    raise _bad(p, f'is not a prunetune result (no manifest.tool == "prunetune"; report reads {KNOWN})')


# --- gathering ---------------------------------------------------------------------------------
def _model_name(spec) -> str:
    s = str(spec or "?").rstrip("/\\")
    return Path(s).name or s


def sparsity_value(s) -> float | None:
    """0.5 -> 0.5, "2:4" -> 0.5 (2 of 4 kept), "dense"/0 -> 0.0; None when unknown."""
    if s is None:
        return None
    s = str(s).strip()
    if s in ("", "dense", "-"):
        return 0.0
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        return 1.0 - n / mm if mm else None
    try:
        return float(s)
    except ValueError:
        return None


def _is_nm(s) -> bool:
    return bool(re.fullmatch(r"\d+:\d+", str(s).strip()))


@dataclass
class PplRow:
    model: str
    method: str
    sparsity: str
    ppl: dict  # corpus -> ppl
    source: str
    dense_ref: dict = field(default_factory=dict)  # corpus -> dense ppl from the same file
    protocol: str = ""  # how the numbers were measured (windows, calibration)


@dataclass
class ZsEntry:
    label: str
    tasks: dict
    average: dict
    metric: str
    source: str
    protocol: str = ""
    files: dict = None  # task -> sha256 of the documents scored (pairs only form over the same documents)


def _pruned_identity(model_info: dict) -> tuple[str, str, str] | None:
    """(base model, method, sparsity) when an evaluated directory is a prune output."""
    path = model_info.get("path")
    if not path:
        return None
    rep = Path(path) / PRUNE_REPORT
    if not rep.is_file():
        return None
    try:
        man = json.loads(rep.read_text())["manifest"]
        return _model_name(man["model"]["spec"]), str(man["method"]), str(man["sparsity"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _ppl_protocol(results: dict) -> str:
    """``seqlen``-token windows and how many, per corpus, from eval result entries."""
    parts = []
    for c, r in results.items():
        n, sl = r.get("windows"), r.get("seqlen")
        if n is not None and sl is not None:
            parts.append(f"{c} {n} x {sl}")
    return "windows: " + ", ".join(parts) if parts else ""


def _calib_protocol(cal) -> str:
    if not isinstance(cal, dict):
        return ""
    src = cal.get("source") or {}
    name = src.get("name") if isinstance(src, dict) else src
    return f"calibration {name} {cal.get('nsamples')} x {cal.get('seqlen')} seed {cal.get('seed')}"


def _zs_protocol(z: dict) -> str:
    ns = sorted({r.get("n") for r in z["tasks"].values() if isinstance(r, dict) and r.get("n") is not None})
    return f"n = {', '.join(map(str, ns))} examples per task" if ns else ""


def _gather(sources: list[Source]):
    ppl_rows: list[PplRow] = []
    zs: list[ZsEntry] = []
    prunes: list[dict] = []
    benches: list[Source] = []
    for s in sources:
        d, name = s.data, s.path.name if s.path.name != PRUNE_REPORT else f"{s.path.parent.name}/{PRUNE_REPORT}"
        if s.kind == "eval":
            info = d["manifest"]["model"]
            ident = _pruned_identity(info)
            model, method, sp = ident if ident else (_model_name(info.get("spec")), "dense", "0")
            if d["perplexity"]:
                ppl_rows.append(PplRow(model, method, sp, {c: r["ppl"] for c, r in d["perplexity"].items()}, name,
                                       protocol=_ppl_protocol(d["perplexity"])))
            if d.get("zeroshot"):
                z = d["zeroshot"]
                label = model if method == "dense" else f"{model} {method} {sp}"
                files = {t: (i or {}).get("sha256") for t, i in (z.get("protocol", {}).get("tasks") or {}).items()}
                zs.append(ZsEntry(label, z["tasks"], z.get("average") or {}, z.get("average_metric", "acc"), name,
                                  _zs_protocol(z), files))
        elif s.kind == "prune":
            man = d["manifest"]
            model = _model_name((man.get("model") or {}).get("spec"))
            prunes.append({"model": model, "method": man["method"], "sparsity": str(man["sparsity"]),
                           "measured": d["total"].get("sparsity_of_pruned_matrices"),
                           "rel_error": d["total"].get("mean_rel_error"), "wall_s": man.get("wall_time_s"),
                           "peak_rss_mb": man.get("peak_rss_mb"), "source": name})
            if d.get("eval"):
                before = {c: r["ppl"] for c, r in d["eval"]["before"].items()}
                after = {c: r["ppl"] for c, r in d["eval"]["after"].items()}
                prot = _ppl_protocol(d["eval"]["after"])
                ppl_rows.append(PplRow(model, "dense", "0", before, name, protocol=prot))
                ppl_rows.append(PplRow(model, man["method"], str(man["sparsity"]), after, name, dense_ref=before,
                                       protocol="; ".join(x for x in (prot, _calib_protocol(man.get("calibration")))
                                                          if x)))
        elif s.kind == "bench":
            benches.append(s)
        elif s.kind == "prune_benchmark":
            model = _model_name(d["protocol"].get("model"))
            prot = "; ".join(str(d["protocol"][k]) for k in ("perplexity", "calibration") if d["protocol"].get(k))
            dense = None
            for key, r in d["runs"].items():
                if r["method"] == "dense":
                    dense = dict(r["ppl"])
            for key, r in d["runs"].items():
                is_dense = r["method"] == "dense"
                ppl_rows.append(PplRow(model, "dense" if is_dense else str(r["method"]),
                                       "0" if is_dense else str(r["sparsity"]), dict(r["ppl"]), name,
                                       dense_ref={} if is_dense or dense is None else dense, protocol=prot))
    # the same dense numbers from several files appear once
    seen, unique = set(), []
    for r in ppl_rows:
        key = (r.model, r.method, r.sparsity, tuple(sorted((c, round(v, 9)) for c, v in r.ppl.items())))
        if key in seen:
            continue
        seen.add(key)
        unique.append(r)
    return unique, zs, prunes, benches


def _dense_for(row: PplRow, rows: list[PplRow], corpus: str) -> float | None:
    if corpus in row.dense_ref:
        return row.dense_ref[corpus]
    for r in rows:
        if r.model == row.model and r.method == "dense" and corpus in r.ppl:
            return r.ppl[corpus]
    return None


# --- formatting --------------------------------------------------------------------------------
def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _row_sort_key(r: PplRow):
    sv = sparsity_value(r.sparsity)
    return (r.model, r.method != "dense", r.method, _is_nm(r.sparsity), sv if sv is not None else 9.0, r.sparsity)


def _ppl_section(rows: list[PplRow]) -> list[str]:
    if not rows:
        return []
    corpora = list(dict.fromkeys(c for r in rows for c in r.ppl))
    header = ["model", "method", "sparsity"]
    for c in corpora:
        header += [f"{c} ppl", "× dense"]
    header += ["protocol", "source"]
    body = []
    for r in sorted(rows, key=_row_sort_key):
        cells = [r.model, r.method, "dense" if r.method == "dense" else r.sparsity]
        for c in corpora:
            v = r.ppl.get(c)
            dense = _dense_for(r, rows, c) if v is not None else None
            cells += [_f(v), _f(v / dense) if v is not None and dense else "–"]
        cells += [r.protocol or "–", r.source]
        body.append(cells)
    return ["## Perplexity", "",
            "Lower is better. `× dense`: perplexity / the dense model's on the same corpus (same file when it has "
            "one). Sparsity 0.5 = half of every pruned matrix is zero; N:M keeps N of every M consecutive input weights.",
            "", *_table(header, body), ""]


def _acc_cell(r: dict, key: str) -> str:
    v, se = r.get(key), r.get(f"{key}_stderr")
    return _f(v, 4) + (f" ± {se:.3f}" if isinstance(se, float) else "")


def _zs_section(entries: list[ZsEntry]) -> list[str]:
    if not entries:
        return []
    tasks = list(dict.fromkeys(t for e in entries for t in e.tasks))
    header = ["task"]
    for e in entries:
        header += [f"{e.label} acc", f"{e.label} acc_norm"]
    body = []
    for t in tasks:
        row = [t]
        for e in entries:
            r = e.tasks.get(t) or {}
            row += [_acc_cell(r, "acc"), _acc_cell(r, "acc_norm")]
        body.append(row)
    metrics = sorted({e.metric for e in entries})
    avg = ["**average**"]
    prot = ["protocol"]
    for e in entries:
        avg += [_f(e.average.get("acc"), 4), _f(e.average.get("acc_norm"), 4)]
        prot += [e.protocol or "–", e.source]
    body += [avg, prot]
    return ["## Zero-shot accuracy", "",
            f"Average: unweighted mean over the requested tasks; headline metric: {', '.join(metrics)}. "
            "acc_norm is the length-normalised accuracy; ± one standard error (lm-eval's). Zero-shot "
            "log-likelihood multiple choice (lm-evaluation-harness); the last row: examples scored and the source "
            "file.", "", *_table(header, body), "", *_zs_paired(entries, tasks)]


def _zs_paired(entries: list[ZsEntry], tasks: list[str]) -> list[str]:
    """Each model against the first, document by document (paired standard error): which differences are
    beyond noise."""
    from .zeroshot import NOISE_Z, paired_difference

    ref, rows = entries[0], []
    for e in entries[1:]:
        for t in tasks:
            a, b = e.tasks.get(t) or {}, ref.tasks.get(t) or {}
            same_docs = (e.files or {}).get(t) == (ref.files or {}).get(t)
            if not (a.get("correct") and b.get("correct") and same_docs and len(a["correct"]) == len(b["correct"])):
                continue
            d = paired_difference(a["correct"], b["correct"])
            rows.append([e.label, t, d["n"], f"{d['diff']:+.4f}", f"{d['stderr']:.4f}",
                         "within noise" if d["within_noise"] else "**resolved**"])
    if not rows:
        return []
    return [f"### Against {ref.label}, document by document", "",
            f"acc of the model minus acc of {ref.label} on the same documents; stderr of the mean per-document "
            f"difference (paired). Resolved: |difference| >= {NOISE_Z} stderr (two-sided 95%).", "",
            *_table(["model", "task", "n", "Δ acc", "stderr", "verdict"], rows), ""]


def _prune_section(prunes: list[dict]) -> list[str]:
    if not prunes:
        return []
    body = [[p["model"], p["method"], p["sparsity"], _f(p["measured"], 4), _f(p["rel_error"], 4), _f(p["wall_s"], 1),
             _f(p["peak_rss_mb"], 0), p["source"]] for p in prunes]
    return ["## Pruning runs", "", *_table(["model", "method", "sparsity", "measured sparsity", "mean rel. layer error",
                                              "wall s", "peak RSS MB", "source"], body), ""]


def _short_labels(labels: list[str]) -> dict[str, str]:
    """Last path component of each label, unless that would make two labels look the same."""
    short = {l: _model_name(l) for l in labels}
    return short if len(set(short.values())) == len(set(labels)) else {l: l for l in labels}


def _range(st: dict, scale: float = 1.0, nd: int = 1) -> str:
    return f"{st['median'] * scale:.{nd}f} [{st['min'] * scale:.{nd}f}–{st['max'] * scale:.{nd}f}]"


def _bench_section(s: Source) -> list[str]:
    d = s.data
    man = d["manifest"]
    prot = man.get("protocol", {})
    name = _short_labels([m["model"] for m in d["models"]])
    lines = [f"## Speed — {s.path.name}", "",
             f"Device: {man.get('device_name', man.get('device'))} ({man.get('device')}), torch threads "
             f"{man.get('torch_threads')}, dtype {prot.get('dtype')}, {prot.get('repeats')} repeats after "
             f"{prot.get('warmup')} warm-up, interleaved across models. Median [min–max]; `× first`: ratio of the "
             "median to the first model's (tokens/s: > 1 is faster).", ""]
    body = []
    for m in d["models"]:
        mem = m.get("memory") or {}
        r = m.get("ratio_to_first") or {}
        size = m.get("size_on_disk_bytes")
        body.append([name.get(m["model"], m["model"]), f"{m['parameters']:,}", _f(r.get("parameters")),
                     _f(size / 2**20 if size else None, 1), _f(r.get("size_on_disk")),
                     _f(m.get("linear_sparsity"), 4), _f(mem.get("peak_mb"), 1), _f(r.get("peak_mb"))])
    lines += ["### Models", "", *_table(["model", "parameters", "× first", "size on disk MiB", "× first",
                                         "linear sparsity", "peak memory MiB", "× first"], body), ""]
    if prot.get("memory"):
        lines += [f"Memory: {prot['memory']}.", ""]
    body = [[name.get(r["model"], r["model"]), r["batch_size"], r["seq_len"], _range(r["latency_s"], 1e3, 2), _range(r["tokens_per_s"]),
             _f((r.get("ratio_to_first") or {}).get("tokens_per_s"))] for r in d["prefill"]]
    lines += ["### Prefill", "", *_table(["model", "batch", "seq len", "latency ms", "tokens/s", "× first"], body), ""]
    body = [[name.get(r["model"], r["model"]), r["batch_size"], r["prompt_len"], r["new_tokens"], _range(r["tokens_per_s"]),
             _f(r.get("ms_per_token"), 2), _f((r.get("ratio_to_first") or {}).get("tokens_per_s"))] for r in d["decode"]]
    lines += ["### Decode", "", *_table(["model", "batch", "prompt", "new tokens", "tokens/s", "ms/token", "× first"],
                                        body), ""]
    sp = d.get("sparse_2to4")
    if sp:
        lines += ["### 2:4 semi-structured kernels", "", f"{sp.get('kernel', '')} ({sp.get('backend', '')}); "
                  f"speedup = {sp.get('speedup', 'dense time / sparse time')}.", ""]
        for model, rec in (sp.get("models") or {}).items():
            model = _model_name(model)
            if rec.get("error") or rec.get("note") or rec.get("end_to_end_error"):
                lines += [f"- {model}: {rec.get('error') or rec.get('note') or rec.get('end_to_end_error')}"]
            e2e = [[x["kind"], x["batch_size"], x["seq_len"], _f(x["dense_s"] * 1e3, 2), _f(x["sparse_s"] * 1e3, 2),
                    _f(x["speedup"]), x["verdict"]] for x in rec.get("end_to_end", [])]
            if e2e:
                lines += ["", f"{model} end to end ({rec.get('converted')} linears converted):", "",
                          *_table(["cell", "batch", "seq len", "dense ms", "sparse ms", "speedup", ""], e2e)]
            per = [["×".join(map(str, x["shape"])), x.get("tokens", "–"),
                    _f(x["dense_ms"]["median"], 4) if "dense_ms" in x else "–",
                    _f(x["sparse_ms"]["median"], 4) if "sparse_ms" in x else "–",
                    _f(x.get("speedup")), x.get("verdict") or x.get("error", "")] for x in rec.get("per_linear", [])]
            if per:
                lines += ["", f"{model} per linear shape (out × in):", "",
                          *_table(["shape", "tokens", "dense ms", "sparse ms", "speedup", ""], per)]
        lines.append("")
    return lines


# --- plots -------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:60] or "x"


def _new_figure(w=7.0, h=4.5):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PrunetuneError("report needs matplotlib for its plots (pip install 'prunetune[eval]')") from None
    return Figure(figsize=(w, h), dpi=110)


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")  # a bare Figure draws with the Agg canvas
    return buf.getvalue()


def _ppl_plots(rows: list[PplRow]) -> dict[str, bytes]:
    out = {}
    groups: dict[tuple, list[PplRow]] = {}
    for r in rows:
        for c in r.ppl:
            groups.setdefault((r.model, c), []).append(r)
    for (model, corpus), rs in groups.items():
        if len({sparsity_value(r.sparsity) for r in rs} - {None}) < 2:
            continue
        dense = next((r.ppl[corpus] for r in rs if r.method == "dense"), None)
        fig = _new_figure()
        ax = fig.add_subplot(1, 1, 1)
        methods = sorted({r.method for r in rs if r.method != "dense"})
        for meth in methods:
            pts = sorted((sparsity_value(r.sparsity), r.ppl[corpus]) for r in rs
                         if r.method == meth and not _is_nm(r.sparsity) and sparsity_value(r.sparsity) is not None)
            if dense is not None:
                pts = [(0.0, dense)] + pts
            if len(pts) > 1 or (pts and dense is None):
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth)[0]
                color = line.get_color()
            else:
                color = None
            nm = [(sparsity_value(r.sparsity), r.ppl[corpus], r.sparsity) for r in rs if r.method == meth and _is_nm(r.sparsity)]
            if nm:
                sc = ax.scatter([p[0] for p in nm], [p[1] for p in nm], marker="s", s=45, color=color,
                                label=f"{meth} (N:M)")
                for x, y, lab in nm:
                    ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                                color=sc.get_facecolor()[0] if color is None else color)
        if dense is not None:
            ax.axhline(dense, color="grey", linestyle=":", linewidth=1, label="dense")
        ax.set_xlabel("sparsity (fraction of zeros in the pruned matrices)")
        ax.set_ylabel(f"{corpus} perplexity")
        ax.set_title(f"{model}: perplexity vs sparsity")
        if max(r.ppl[corpus] for r in rs) / max(min(r.ppl[corpus] for r in rs), 1e-9) > 20:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        out[f"ppl_vs_sparsity_{_slug(model)}_{_slug(corpus)}.png"] = _png_bytes(fig)
    return out


def _zs_plot(entries: list[ZsEntry]) -> dict[str, bytes]:
    if not entries:
        return {}
    metric = entries[0].metric if len({e.metric for e in entries}) == 1 else "acc"
    tasks = list(dict.fromkeys(t for e in entries for t in e.tasks))
    labels = tasks + ["average"]
    fig = _new_figure(max(6.0, 1.0 + 0.9 * len(labels) * max(1, len(entries)) ** 0.5), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(entries)
    for i, e in enumerate(entries):
        vals = [(e.tasks.get(t) or {}).get(metric) for t in tasks] + [e.average.get(metric)]
        xs = [j + (i - (len(entries) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width=width, label=e.label)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(f"zero-shot {metric}")
    ax.set_ylim(0, 1)
    ax.set_title(f"Zero-shot accuracy per task ({metric})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return {"zeroshot_accuracy.png": _png_bytes(fig)}


def _speed_plot(s: Source) -> dict[str, bytes]:
    d = s.data
    name = _short_labels([m["model"] for m in d["models"]])
    fig = _new_figure(10.0, 4.5)
    for k, (kind, title) in enumerate((("prefill", "prefill"), ("decode", "decode (KV cache)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        series: dict[str, list] = {}
        for r in d[kind]:
            key = name.get(r["model"], r["model"]) + (f" (seq {r['seq_len']})" if kind == "prefill" and len(d["manifest"].get("protocol", {}).get("seq_lens", [])) > 1 else "")
            series.setdefault(key, []).append((r["batch_size"], r["tokens_per_s"]["median"],
                                               r["tokens_per_s"]["min"], r["tokens_per_s"]["max"]))
        for label, pts in series.items():
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s (median, min–max)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return {f"speed_{_slug(s.path.stem)}.png": _png_bytes(fig)}


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
