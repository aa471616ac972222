"""Reading prunetune result files (eval, prune, bench, benchmark JSON) and gathering their rows for a report.

Perplexity rows are keyed by model (the last component of its path or Hub id), method and sparsity. An eval of a
directory that holds a ``prune_report.json`` takes its method and sparsity from it; any other eval counts as the
dense model. Ratios to dense use the dense perplexity of the same file when it has one (a prune report's
``eval.before``), else a dense entry of the same model and corpus from the other files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrunetuneError

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
