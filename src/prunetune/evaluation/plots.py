"""The PNG plots of a report (matplotlib, drawn off-screen)."""

from __future__ import annotations

import io
import re

from ..errors import PrunetuneError

from .results import PplRow, Source, ZsEntry, _dense_for, _is_nm, sparsity_value  # noqa: F401
from .tables import _short_labels  # noqa: F401


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
