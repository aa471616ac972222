"""``shrink()``: one call from a model to a plain, smaller Hugging Face checkpoint (``hidden_size = k``).

Methods (all keep exactly the ``k`` PAT keeps for the same ratio: ``round((1 − ratio) · d)`` moved to the
nearest hidden size the family can load):

- ``pca`` (default): fold the RMSNorm gains, rotate the residual stream to the principal directions of its
  normalised activations on the calibration windows (the same function; ``rotation.py``), then drop the
  ``d − k`` directions of least variance (``slicing.py``). One global rotation, so the result is the family's
  own architecture, loadable by plain transformers.
- ``activation``: drop the ``d − k`` channels of least energy at the RMSNorm outputs (``channels.py``).
- ``magnitude``: drop the channels of smallest norm gains and reader-column norms (no data).

``structure`` other than ``hidden`` removes whole MLP neurons and attention heads instead (``neurons.py``,
``units.py``): the reader of each unit (down_proj, o_proj) is refit exactly on the kept columns, layer by layer
in prune's streamed, resumable driver; ``ratio`` is then the share of decoder-layer linear weights removed.
``auto`` chooses where to cut: it shrinks with every mix of ``AUTO_HEAD_SHARES`` (the share of the removed
weights taken from heads, the rest from MLP neurons; mixes the config cannot express are skipped) and keeps the
one with the lowest loss on held-out calibration windows (same corpus, another seed); the report records every
mix measured. ``target="prefill"`` makes ``ratio`` a share of this machine's prefill time instead of weights: the
counts come from timing a one-layer copy (``prefill.py``), per mix for ``auto``.

The output folder holds the checkpoint, ``shrink_report.json`` (protocol, kept channels or energy removed,
wall time, peak memory, optional perplexity before/after) and ``prunetune_manifest.json`` (file hashes and
the input as ``source_model``, which ``tune --teacher auto`` follows back).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import torch

from ..data.bos import family_bos
from ..data.calibration import sample_calibration
from ..errors import PrunetuneError
from ..evaluation.perplexity import before_after_lines, max_positions
from ..io import atomic_output_dir, check_output_dir, load_model, resolve_model, write_manifest
from ..manifest import machine, measure, peak_rss_mb, versions
from .prefill import TARGETS
from .slicing import check_ratio, check_sliceable, keep_count

SHRINK_METHODS = ("pca", "activation", "magnitude")
#: ``--structure auto``: shares of the removed weights taken from heads, each tried (0: MLP neurons only)
AUTO_HEAD_SHARES = (0.0, 0.25, 0.5)
#: held-out windows ``auto`` scores each mix on (calibration corpus, seed + HELD_OUT_SEED)
HELD_OUT_WINDOWS, HELD_OUT_SEED = 8, 1000
#: default calibration (windows, tokens per window) per structure. Units: 256 x 512, measured on SmolLM2-135M at
#: 25% (BENCHMARKS §9): 1.88x dense WikiText-2 against 1.95x with 128 x 2048, from half the tokens — windows of the
#: length served describe the activations that matter. Hidden channels (the rotation): 128 x 2048, as prune.
CALIB_DEFAULTS = {"hidden": (128, 2048), "units": (256, 512)}
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


@dataclass(frozen=True)
class ShrinkJob:
    """What a shrink was asked to do, gathered once from ``shrink()``'s arguments: the three flows (hidden,
    units, auto) read only this. Each flow checks the fields it uses, in the order the user meets them."""

    model: object
    ratio: float
    out: object
    structure: str = "hidden"
    method: str = "pca"              # hidden channels: pca | activation | magnitude
    select: str = "obs"              # units: how neurons and heads are chosen
    head_share: float | None = None
    damp: float = 0.01
    calib: str = "c4"
    nsamples: int | None = None      # None: CALIB_DEFAULTS for the structure (resolved on creation)
    seqlen: int | None = None
    seed: int = 0
    batch_size: int = 8
    calib_bos: str | None = None
    eval_corpora: tuple | list | None = None
    eval_seqlen: int = 512
    eval_max_windows: int | None = None
    dtype: str = "float32"
    device: str | None = None
    overwrite: bool = False
    progress: bool = True
    resume: bool = False
    cache_budget: object = "auto"
    target: str = "params"           # what ratio is a share of: decoder weights | this machine's prefill time

    def __post_init__(self):
        nsamples, seqlen = calib_size(self.structure, self.nsamples, self.seqlen)
        object.__setattr__(self, "nsamples", nsamples)
        object.__setattr__(self, "seqlen", seqlen)

    def prune_kwargs(self, **override) -> dict:
        """What prune's driver takes for a unit shrink (everything but the model, the plan and ``out``)."""
        kw = dict(calib=self.calib, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed,
                  batch_size=self.batch_size, eval_corpora=self.eval_corpora, eval_seqlen=self.eval_seqlen,
                  eval_max_windows=self.eval_max_windows, dtype=self.dtype, device=self.device,
                  overwrite=self.overwrite, progress=self.progress, resume=self.resume,
                  cache_budget=self.cache_budget, calib_bos=self.calib_bos)
        kw.update(override)
        return kw


def calib_size(structure: str, nsamples: int | None, seqlen: int | None) -> tuple[int, int]:
    """The calibration windows and their length a shrink of ``structure`` uses: the ones asked, else
    ``CALIB_DEFAULTS``."""
    d_n, d_len = CALIB_DEFAULTS["hidden" if structure == "hidden" else "units"]
    return (d_n if nsamples is None else nsamples), (d_len if seqlen is None else seqlen)


def shrink(model=None, *, ratio: float, out, method: str = "pca", calib: str = "c4", nsamples: int | None = None,
           seqlen: int | None = None, seed: int = 0, batch_size: int = 8, eval_corpora=None, eval_seqlen: int = 512,
           eval_max_windows: int | None = None, dtype: str = "float32", device: str | None = None,
           overwrite: bool = False, progress: bool = True, structure: str = "hidden", select: str = "obs",
           head_share: float | None = None, damp: float = 0.01, resume: bool = False,
           cache_budget="auto", calib_bos: str | None = None, target: str = "params") -> dict:
    """Remove the fraction ``ratio`` of hidden channels of ``model`` (HF dir, Hub id or GGUF) — or, with
    ``structure`` ``mlp`` / ``heads`` / ``mlp+heads``, that share of decoder-layer weights as whole MLP neurons
    and heads — and write the smaller plain checkpoint plus ``shrink_report.json`` to ``out`` (see the module
    docstring). ``select``, ``head_share``, ``damp``, ``resume`` and ``cache_budget`` apply to the unit path;
    ``calib_bos``: BOS in the calibration windows (None: the family's convention, see `data.bos`);
    ``nsamples`` / ``seqlen`` None: ``CALIB_DEFAULTS`` (128 x 2048 for hidden channels, 256 x 512 for units);
    ``target``: what ``ratio`` is a share of for a unit shrink — ``"params"`` (decoder-layer linear weights) or
    ``"prefill"`` (this machine's prefill time at batch 8 x 128, measured: ``prefill.py``)."""
    job = ShrinkJob(model, ratio, out, structure, method, select, head_share, damp, calib, nsamples, seqlen, seed,
                    batch_size, calib_bos, eval_corpora, eval_seqlen, eval_max_windows, dtype, device, overwrite,
                    progress, resume, cache_budget, target)
    if target not in TARGETS:
        raise PrunetuneError(f"unknown --target '{target}' (use {', '.join(TARGETS)})")
    if target != "params" and structure == "hidden":
        raise PrunetuneError("--target prefill applies to --structure mlp, heads, mlp+heads or auto (a hidden "
                             "shrink's --ratio is the share of hidden channels)")
    if structure == "auto":
        return _shrink_auto(job)
    if structure != "hidden":
        return _shrink_units(job)
    return _shrink_hidden(job)


def _shrink_hidden(job: ShrinkJob) -> dict:
    """``shrink(structure="hidden")``: the whole model loaded, rotated (``pca``) or scored, sliced, written."""
    from ..devices import resolve_device
    from ..pruning.api import _eval_pair

    method, ratio = job.method, job.ratio
    if method not in SHRINK_METHODS:
        raise PrunetuneError(f"unknown shrink method '{method}' (use {', '.join(SHRINK_METHODS)})")
    check_ratio(ratio, "--ratio")
    for name, v in (("--nsamples", job.nsamples), ("--seqlen", job.seqlen), ("--batch-size", job.batch_size)):
        if int(v) <= 0:
            raise PrunetuneError(f"{name} must be positive (got {v})")
    device = resolve_device(job.device)
    src = resolve_model(job.model)
    if src.kind == "local":
        from ..models import preflight

        preflight(src.path)
    out_path = check_output_dir(job.out, overwrite=job.overwrite,
                                inputs=(src.home if src.kind != "hub" else None,))
    t_start = time.time()
    with measure() as meas:
        net, tok, model_info = load_model(src.spec, dtype=job.dtype, device=device)
        check_sliceable(net, "shrinking the hidden size")
        calib_ids, calib_protocol = None, None
        if method != "magnitude":
            limit = max_positions(net.config)
            seqlen = min(int(job.seqlen), limit) if limit else int(job.seqlen)
            ids, calib_protocol = sample_calibration(tok, job.calib, int(job.nsamples), seqlen, job.seed,
                                                     bos=job.calib_bos or family_bos(net.config.model_type))
            calib_ids = list(ids.split(int(job.batch_size)))
        small, info = shrink_model(net, ratio, method=method, calib=calib_ids)
        del net
        with atomic_output_dir(out_path, overwrite=job.overwrite) as tmp:
            small.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            report = {"shrink": info, "model": model_info, "calibration": calib_protocol,
                      "parameters": {"before": model_info.get("parameters"),
                                     "after": sum(p.numel() for p in small.parameters())}}
            report["manifest"] = {"tool": "prunetune", "command": "shrink", "method": method, "ratio": ratio,
                                  "dtype": job.dtype, "device": device, "versions": versions(), "machine": machine(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
                                  "wall_time_s": round(time.time() - t_start, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
            if job.eval_corpora:
                report["eval"] = _eval_pair(src.spec, tmp, job.eval_corpora, job.eval_seqlen, job.eval_max_windows,
                                            job.dtype, device)
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


def _config_of(src):
    from transformers import AutoConfig

    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(src.path, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise PrunetuneError(f"cannot read the config of '{src.spec}': {str(e).splitlines()[0]}") from None


def _shrink_units(job: ShrinkJob) -> dict:
    """``shrink(structure=mlp|heads|mlp+heads)``: the plan from the config (checked before any weight is read),
    then prune's layer-by-layer driver with the unit remover in place of a pruning method."""
    from ..pruning.api import prune
    from .neurons import geometry

    src = resolve_model(job.model)
    config = _config_of(src)
    if src.kind == "local":
        from ..models import preflight

        meta = preflight(src.path)
        if meta is not None:
            from ..models import get_adapter

            geometry(config, get_adapter(meta))
    if float(job.damp) < 0:
        raise PrunetuneError(f"--damp must be non-negative (got {job.damp})")
    if job.target != "params":  # refused before the timing, as prune itself would refuse it after
        check_output_dir(job.out, overwrite=job.overwrite, inputs=(src.home if src.kind != "hub" else None,))
    sized = _Sizer(job, src, config)
    plan = sized.plan(job.structure, job.head_share)
    report = prune(src.spec, method="units", sparsity=None, out=job.out, units=plan, **job.prune_kwargs())
    sized.done()
    report["summary_table"] = units_summary(report)
    return report


class _Sizer:
    """The unit counts a shrink asks for: from the share of weights, or measured against this machine's prefill
    time (``prefill.py``). Measured plans are kept in ``.<out>.target.json`` until the shrink is published, so a
    killed run resumes with the plan it measured rather than a re-timed one."""

    def __init__(self, job: ShrinkJob, src, config):
        from pathlib import Path

        self.job, self.src, self.config, self.clock = job, src, config, None
        out = Path(str(job.out)).expanduser()
        self.cache = out.parent / f".{out.name}.target.json"

    def plan(self, structure: str, head_share):
        from .neurons import UnitPlan, plan_for_ratio

        job = self.job
        opts = dict(select=job.select, damp=float(job.damp))
        if job.target == "params":
            return plan_for_ratio(self.config, job.ratio, structure, head_share=head_share, **opts)
        from ..devices import resolve_device
        from ..io import parse_dtype
        from .prefill import PrefillClock, plan_for_time, target_info

        device = resolve_device(job.device)
        key = json.dumps([self.src.location(), structure, head_share, job.ratio, job.dtype, device,
                          torch.get_num_threads()], default=str)
        saved = json.loads(self.cache.read_text()) if self.cache.is_file() else {}
        if key in saved:
            counts, info = saved[key]
            return UnitPlan(**counts, **opts, target=info)
        if self.clock is None:
            self.clock = PrefillClock(self.config, dtype=parse_dtype(job.dtype), device=device)
        plan, search = plan_for_time(self.config, job.ratio, structure, self.clock.measure, head_share=head_share,
                                     **opts)
        plan.target = target_info(job.ratio, search, self.clock)
        saved[key] = [{"neurons": plan.neurons, "kv_heads": plan.kv_heads, "q_heads": plan.q_heads}, plan.target]
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, default=str))
        tmp.replace(self.cache)
        return plan

    def done(self) -> None:
        self.cache.unlink(missing_ok=True)


@torch.no_grad()
def held_out_loss(model_dir, calib: str, nsamples: int, seqlen: int, seed: int, dtype: str, device: str,
                  bos: str | None = None) -> dict:
    """Mean next-token loss of a checkpoint on ``nsamples`` calibration-corpus windows drawn with ``seed``."""
    net, tok, _ = load_model(str(model_dir), dtype=dtype, device=device)
    ids, proto = sample_calibration(tok, calib, nsamples, seqlen, seed, bos=bos or family_bos(net.config.model_type))
    total = 0.0
    for b in ids.split(4):
        total += float(net(b.to(device), labels=b.to(device)).loss) * b.shape[0]
    del net
    return {"loss": total / ids.shape[0], "windows": proto}


def _shrink_auto(job: ShrinkJob) -> dict:
    """``shrink(structure="auto")``: every mix of ``AUTO_HEAD_SHARES``, the best on held-out windows published.
    Finished candidates stay in ``.<out>.auto`` until the end, so a killed search goes on where it stopped."""
    import shutil

    from ..devices import resolve_device
    from ..io import publish_dir
    from ..pruning.api import _eval_pair, prune
    from .neurons import params_removed_share

    ratio, calib = job.ratio, job.calib
    nsamples, seqlen, seed, dtype = job.nsamples, job.seqlen, job.seed, job.dtype
    device = resolve_device(job.device)
    src = resolve_model(job.model)
    config = _config_of(src)
    out_path = check_output_dir(job.out, overwrite=job.overwrite, inputs=(src.home if src.kind != "hub" else None,))
    sized = _Sizer(job, src, config)
    plans = []
    for share in AUTO_HEAD_SHARES:
        try:
            plan = sized.plan("mlp" if share == 0 else "mlp+heads", share or None)
        except PrunetuneError:
            continue
        if all(plan != p for _, p in plans):
            plans.append((share, plan))
    if not plans:
        raise PrunetuneError(f"--ratio {ratio}: no mix of MLP neurons and heads reaches it for this model")
    work = out_path.parent / f".{out_path.name}.auto"
    work.mkdir(parents=True, exist_ok=True)
    alts = []
    for share, plan in plans:
        # named by everything that decides it, so a folder left by another search is never taken for this one
        key = json.dumps([src.location(), plan.describe(), calib, nsamples, seqlen, seed, dtype], default=str)
        d = work / f"mix-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if not (d / "shrink_report.json").is_file():
            # each candidate is evaluated once, after the choice; its folder is written afresh
            prune(src.spec, method="units", sparsity=None, out=str(d), units=plan,
                  **job.prune_kwargs(overwrite=True, resume=False, device=device, eval_corpora=None,
                                   eval_max_windows=None))
        score = held_out_loss(d, calib, HELD_OUT_WINDOWS, seqlen, seed + HELD_OUT_SEED, dtype, device, job.calib_bos)
        alts.append({"head_share_asked": share, "structure": str(plan),
                     "decoder_linear_weights_removed_share": params_removed_share(config, plan),
                     **({"prefill_share_removed_fitted": plan.target["prefill_share_removed_fitted"]}
                        if plan.target else {}),
                     "held_out_loss": score["loss"], "dir": d})
    best = min(alts, key=lambda a: a["held_out_loss"])
    rpath = best["dir"] / "shrink_report.json"
    report = json.loads(rpath.read_text())
    report["where_to_cut"] = {
        "criterion": f"mean loss on {HELD_OUT_WINDOWS} held-out {calib} windows of {seqlen} tokens "
                     f"(seed {seed + HELD_OUT_SEED})", "chosen": best["structure"],
        "alternatives": [{k: v for k, v in a.items() if k != "dir"} for a in alts]}
    if job.eval_corpora:
        report["eval"] = _eval_pair(src.spec, best["dir"], job.eval_corpora, job.eval_seqlen, job.eval_max_windows,
                                    dtype, device)
    rpath.write_text(json.dumps(report, indent=2, default=str) + "\n")
    publish_dir(best["dir"], out_path, overwrite=job.overwrite)
    shutil.rmtree(work, ignore_errors=True)
    sized.done()
    report["summary_table"] = units_summary(report) + "\nwhere to cut: " + ", ".join(
        f"{a['structure']} loss {a['held_out_loss']:.4f}{' (chosen)' if a is best else ''}" for a in alts)
    report["out"] = str(out_path)
    return report


def units_summary(report: dict) -> str:
    s, man, p = report["shrink"], report["manifest"], report["parameters"]
    b, a = s["sizes_before"], s["sizes_after"]
    lines = [f"shrink {s['structure']} (select {s['plan']['select']}): intermediate {b['intermediate_size']} -> "
             f"{a['intermediate_size']}, heads {b['num_attention_heads']}/{b['num_key_value_heads']} kv -> "
             f"{a['num_attention_heads']}/{a['num_key_value_heads']} kv; decoder linear weights removed "
             f"{s['decoder_linear_weights_removed_share']:.4f}; parameters {p['before']:,} -> {p['after']:,}",
             "mean relative reader error: " + ", ".join(f"{k} {v:.4f}" for k, v in s["mean_rel_error"].items()),
             f"wall {man.get('wall_time_s', 0):.1f}s, peak RSS {man.get('peak_rss_mb', 0):.0f} MB"]
    t = s.get("target")
    if t:
        lines.insert(1, f"prefill time removed on this machine (batch {t['shape'][0]} x {t['shape'][1]}, "
                        f"{t['threads']} thread{'s' if t['threads'] != 1 else ''}): {t['share_asked']} asked, {t['prefill_share_removed_fitted']:.3f} "
                        f"fitted over {len(t['probes'])} plans timed, {t['prefill_share_removed_measured']:.3f} "
                        "measured for this one")
    return "\n".join(lines + before_after_lines(report.get("eval")))
