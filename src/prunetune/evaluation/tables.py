"""The Markdown sections of a report: perplexity, zero-shot (with the paired comparison), pruning runs, speed."""

from __future__ import annotations

import math

from .results import PplRow, Source, ZsEntry, _dense_for, _is_nm, _model_name, sparsity_value  # noqa: F401


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
