"""``tune()`` and ``merge()``: from a model and a data file to adapters, a plain checkpoint and a report.

Nothing here knows a method by name: what differs between methods is in their class (``tuning/base.py``).

Output folder of ``tune`` (written in one rename when everything is done)::

    <out>/adapters/                    the method's adapter files + prunetune_adapter.json (base model,
                                       its fingerprint, method and method options: all ``merge`` needs)
    <out>/config.json, *.safetensors   the exported plain Hugging Face checkpoint (with ``merge=True``, or
    <out>/tokenizer*                   always for a method whose export is the result, e.g. PAT's smaller model)
    <out>/tune_report.json             the run's manifest, history and checks
    <out>/prunetune_manifest.json      sha256 of every file above, and the input as ``source_model``

Working folder: the hidden ``.<out>.partial`` next to ``out`` (as ``prune`` uses). Training checkpoints live
in ``.<out>.partial/train/checkpoints``; the final folder is assembled in ``.<out>.partial/out`` and renamed
to ``out``, then the working folder is removed. A crash or a kill leaves the working folder in place so
``resume=True`` can continue from its last checkpoint (the trainer refuses a checkpoint of a run with other
settings, another model or other data); a bad input found before or during training removes it (nothing
worth resuming), except when resuming (the interrupted run stays resumable). ``out`` is never touched
before the final rename. On CPU with the same settings, a run killed after its last checkpoint and resumed
ends with bit-identical weights to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data.bos import family_bos
from ..errors import OutputWriteError, PrunetuneError, write_failure, writing
from ..io import (check_output_dir, load_model, partial_dir_for, publish_dir, resolve_model, run_lock,
                  verify_manifest, write_manifest)
from ..manifest import machine, peak_rss_mb, reset_peak_rss, sha256_file, versions
from ..sparse_storage import check_save_format, compress_checkpoint
from .base import TuningMethod, get_method

log = logging.getLogger("prunetune")

REPORT = "tune_report.json"
MERGE_REPORT = "merge_report.json"
ADAPTER_DIR = "adapters"
ADAPTER_RECORD = "prunetune_adapter.json"
_WORK, _STAGE = "train", "out"
#: TrainConfig values of ``tune()`` where they differ from TrainConfig's own
TUNE_DEFAULTS = {"batch_size": 8, "checkpoint_every": 100}


class Calibration:
    """Token-id windows a method looks at before training (PAT's rotation and warm start), made on first use:
    ``samples`` random windows of ``seqlen`` tokens of the corpus ``source``, or without a source the first
    ``samples`` training examples."""

    def __init__(self, tokenizer, source, samples: int, seqlen: int, seed: int, train_examples: list[dict],
                 bos: str = "stream"):
        if int(samples) <= 0:
            raise PrunetuneError(f"calibration samples must be positive (got {samples})")
        if int(seqlen) <= 1:
            raise PrunetuneError(f"calibration seqlen must be at least 2 (got {seqlen})")
        self.tok, self.source, self.samples, self.seqlen, self.seed = tokenizer, source, int(samples), int(seqlen), seed
        self.train_examples = train_examples
        self.bos = bos
        self._windows, self._protocol = None, None

    def windows(self) -> list[torch.Tensor]:
        if self._windows is None:
            if self.source is None:
                ex = self.train_examples[:self.samples]
                self._windows = [torch.tensor(e["input_ids"], dtype=torch.long).unsqueeze(0) for e in ex]
                self._protocol = {"source": "the first training examples", "examples": len(ex)}
            else:
                from ..data.calibration import sample_calibration

                ids, self._protocol = sample_calibration(self.tok, self.source, self.samples, self.seqlen, self.seed,
                                                         bos=self.bos)
                self._windows = list(ids.split(4))
        return self._windows

    def describe(self) -> dict:
        w = self.windows()
        return {"calibration": self._protocol, "tokens": sum(int(t.numel()) for t in w)}


def split_options(cls: type[TuningMethod], options: dict) -> tuple[dict, dict]:
    """``(training options, method options)``: TrainConfig fields and the method's own; anything else is refused."""
    from .trainer import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"device", "progress", "stop_at_step"}
    train = {k: v for k, v in options.items() if k in train_fields and v is not None}
    mine = {k: v for k, v in options.items() if k not in train_fields and v is not None}
    unknown = sorted(set(mine) - set(cls.option_names()))
    if unknown:
        raise PrunetuneError(f"tuning method '{cls.name}' does not take option(s) {', '.join(map(repr, unknown))} "
                             f"(its options: {', '.join(cls.option_names()) or 'none'}; training options: "
                             f"{', '.join(sorted(train_fields))})")
    return train, mine


def _train_config(cls, train_opts: dict, device: str, progress: bool):
    from .trainer import TrainConfig

    opts = {**TUNE_DEFAULTS, **train_opts}
    if opts.get("lr") is None:
        opts["lr"] = cls.default_lr
    for name in ("checkpoint_every", "eval_every"):
        if opts.get(name) is not None and int(opts[name]) < 0:
            raise PrunetuneError(f"{name} must not be negative (got {opts[name]})")
    return TrainConfig(**opts, progress=progress, device="cpu" if device == "cpu" else "cuda")


def steps_from_token_budget(options: dict, seq_len: int) -> dict:
    """``max_tokens`` (a training budget in tokens) turned into ``max_steps``: the fewest steps of ``batch_size``
    x ``grad_accum`` x processes windows of ``seq_len`` positions that read at least that many (packed text fills
    every position; instruction examples shorter than ``seq_len`` read fewer)."""
    tokens = options.get("max_tokens")
    options = {k: v for k, v in options.items() if k != "max_tokens"}
    if tokens is None:
        return options
    if int(tokens) <= 0:
        raise PrunetuneError(f"--max-tokens must be a positive number of tokens (got {tokens})")
    if options.get("max_steps") is not None:
        raise PrunetuneError("give --max-tokens or --max-steps, not both")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by `accelerate launch`
    per_step = (int(options.get("batch_size") or TUNE_DEFAULTS["batch_size"]) * int(options.get("grad_accum") or 1)
                * world * int(seq_len))
    options["max_steps"] = max(1, math.ceil(int(tokens) / per_step))
    return options


def _check_scalars(seq_len, max_records) -> None:
    if seq_len is None or int(seq_len) <= 0:
        raise PrunetuneError(f"--seq-len must be a positive number of tokens (got {seq_len})")
    if max_records is not None and int(max_records) <= 0:
        raise PrunetuneError(f"--max-records must be positive (got {max_records})")


def _open_run(out, resume: bool, overwrite: bool, src) -> tuple[Path, Path, int | None]:
    """``(out path, working folder, resumed-from step)``, refusing what would clobber or cannot resume."""
    out_path = Path(out).expanduser().resolve()
    partial = partial_dir_for(out_path)
    if not resume:
        check_output_dir(out_path, overwrite=overwrite, inputs=(src.home if src.kind != "hub" else None,))
        return out_path, partial, None
    if out_path.exists() and not overwrite:
        raise PrunetuneError(f"output directory '{out_path}' already exists (use --overwrite to replace it)")
    step = _latest_step(partial / _WORK)
    if step is None:
        raise PrunetuneError(f"nothing to resume: no interrupted run for '{out_path}'")
    return out_path, partial, step


def _latest_step(work: Path) -> int | None:
    from .trainer import _checkpoints

    ck = _checkpoints(work)
    return int(ck[-1].name.split("-")[1]) if ck else None


def _distillation(teacher, kd_temperature, kd_weight, src, cls, net, tok, dtype):
    """``(Distillation or None, report entry)`` for ``--teacher``."""
    from .teacher import load_teacher, resolve_teacher
    from .trainer import Distillation, model_fingerprint

    spec = resolve_teacher(teacher, src.spec, src.path if src.kind == "local" else None, cls.teacher_is_input)
    if spec is None:
        return None, None
    t_model, t_info = load_teacher(spec, net, tok, dtype=dtype)
    fp = model_fingerprint(t_model)
    d = Distillation(t_model, temperature=float(kd_temperature), weight=float(kd_weight), fingerprint=fp)
    return d, {"teacher": spec, "requested": str(teacher), "teacher_model": {**t_info, "fingerprint": fp},
               "temperature": d.temperature, "weight": d.weight,
               "loss": "weight * T^2 * KL(teacher || student) + (1 - weight) * cross-entropy, response tokens"}


def tune(model=None, *, method: str, data, out, merge: bool = False, teacher: str | None = None,
         kd_temperature: float = 1.0, kd_weight: float = 1.0, calib: str | None = None, calib_samples: int = 64,
         calib_seqlen: int = 512, seq_len: int = 256, eval_size: float | int = 0.05, max_records: int | None = None,
         data_mode: str = "auto", dtype: str = "float32", device: str | None = None, overwrite: bool = False,
         resume: bool = False, progress: bool = True, save_format: str = "dense", **options) -> dict:
    """Fine-tune ``model`` with ``method`` on ``data`` and write adapters (+ a plain checkpoint) to ``out``.

    ``method``: a registered tuning method (``spp``, ``lora``, ``lora-masked``, ``dora``, ``full``, ``pat``,
    ``pat-units``; see
    ``available()``). ``options``: the training options (``lr`` — default the method's —, ``max_steps`` or
    ``max_tokens`` (a budget in tokens, turned into steps: `steps_from_token_budget`),
    ``epochs`` (1), ``batch_size`` (8), ``grad_accum``, ``warmup``, ``schedule``, ``weight_decay``, ``seed``,
    ``eval_every``, ``checkpoint_every`` (100)) and the method's own (e.g. ``ratio`` for PAT, ``groups`` for
    SPP); anything else is refused. ``data``: an Alpaca ``.jsonl`` (loss on the response only), a ``.jsonl``
    with ``text`` or a ``.txt`` (packed into ``seq_len`` windows), or ``alpaca`` / ``tinystories``.
    ``teacher``: distil from this model (``"auto"``: the model the input was pruned or shrunk from, or the
    input itself for PAT) with ``kd_weight · T² · KL + (1 − kd_weight) · CE`` at ``T = kd_temperature``.
    ``calib`` / ``calib_samples`` / ``calib_seqlen``: the windows methods look at before training (PAT's
    rotation and mask warm start): a corpus, or None for the first training examples. ``merge``: also export
    the merged checkpoint. ``resume``: continue the interrupted run of the same settings into ``out``.
    ``save_format="compressed"``: the merged checkpoint of a method that keeps the zeros (spp, lora-masked) is
    stored in the sparse-bitmask layout (`prunetune.sparse_storage`).

    Returns the report written to ``out/tune_report.json`` (plus ``out``)."""
    from ..devices import resolve_device as _device

    cls = get_method(method)
    _check_scalars(seq_len, max_records)
    options = steps_from_token_budget(options, seq_len)
    train_opts, method_opts = split_options(cls, options)
    tm = cls(**method_opts)
    _check_compressed_output(cls, save_format, merge or cls.always_exports)
    if calib is not None and not tm.uses_calibration():
        raise PrunetuneError(f"--calib is not used by {tm.name} with these options (it feeds pat's --rotate and "
                             "--mask-init activation)")
    device = _device(device)
    tcfg = _train_config(cls, train_opts, device, progress)
    from .data import check_data_file, resolve_data

    data_path = resolve_data(data)
    check_data_file(data_path, data_mode)
    src = resolve_model(model)
    if src.kind == "local":
        from ..models import preflight

        skeleton = preflight(src.path)  # an unsupported model is said before any weight is read
        if skeleton is not None:
            tm.check_structure(skeleton)
    from accelerate import PartialState

    main = PartialState(cpu=tcfg.device == "cpu").is_main_process  # under `accelerate launch`: rank 0 writes
    out_path, partial, resumed_from = _open_run(out, resume, overwrite, src)
    with run_lock(out_path) if main else nullcontext():  # a second run into the same `out` refuses to start
        t_start, t0 = time.time(), time.perf_counter()
        reset_peak_rss()  # report this job's own peak
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        job = _prepare_job(tm, src, data_path, data_mode, seq_len, eval_size, max_records, tcfg.seed, dtype, calib,
                           calib_samples, calib_seqlen, merge, teacher, kd_temperature, kd_weight)
        job.save_format = save_format
        res = _run_training(tm, job, tcfg, partial, resume)
        if res is None:  # another process of a distributed run: rank 0 writes
            return {}
        report = _report(tm, job, res, tcfg, resumed_from, device, t_start, t0)
        _write_tune_output(tm, job, res, report, partial, out_path, overwrite, merge)
    report["out"] = str(out_path)
    return report


class _Job:
    """What ``tune()`` loaded before training: model, data, checks, the teacher, the method's setup."""


def _prepare_job(tm, src, data_path, data_mode, seq_len, eval_size, max_records, seed, dtype, calib,
                 calib_samples, calib_seqlen, merge, teacher, kd_temperature, kd_weight) -> _Job:
    from .data import load_tuning_data
    from .trainer import model_fingerprint

    job = _Job()
    job.src, job.data_path, job.seq_len, job.eval_size, job.max_records = src, data_path, seq_len, eval_size, \
        max_records
    job.net, job.tok, job.model_info = load_model(src.spec, dtype=dtype, device="cpu")
    job.model_info["path"] = src.location()
    job.model_info["fingerprint"] = model_fingerprint(job.net)
    job.bos = family_bos(job.net.config.model_type)
    job.data = load_tuning_data(data_path, job.tok, mode=data_mode, seq_len=int(seq_len), bos=job.bos,
                                eval_size=eval_size, seed=seed, limit=max_records)
    job.warnings = list(tm.check(job.net))
    job.sparsity_before = _sparsity(job.net)
    job.export = bool(merge or tm.always_exports)
    job.masks = zero_masks(job.net) if job.export and tm.zero_pattern else None
    job.linear_names = _linear_weight_names(job.net) if job.masks is not None else None
    calibration = Calibration(job.tok, calib, calib_samples, calib_seqlen, seed, job.data.train, bos=job.bos)
    job.setup = tm.setup(job.net, calibration)
    job.distill, job.distill_info = _distillation(teacher, kd_temperature, kd_weight, src, type(tm), job.net,
                                                  job.tok, dtype)
    return job


def _run_training(tm, job, tcfg, partial: Path, resume: bool) -> dict | None:
    """Train in the working folder; clean it up on bad input (keep it when it can be resumed)."""
    from accelerate import PartialState

    from .trainer import train

    work = partial / _WORK
    state = PartialState(cpu=tcfg.device == "cpu")  # several processes under `accelerate launch`: rank 0 writes
    if not resume and partial.exists() and state.is_main_process:
        log.warning("removing the leftovers of an earlier interrupted run: %s (use --resume to continue one)",
                    partial)
        shutil.rmtree(partial)
    state.wait_for_everyone()
    try:
        with writing(work):
            res = train(job.net, job.tok, tm, job.data, tcfg, work, resume=resume, distill=job.distill)
    except OutputWriteError as e:
        raise _write_failed(e, partial, work, state.is_main_process) from None
    except PrunetuneError:
        if not resume and state.is_main_process:  # bad input found while starting: nothing worth resuming
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return res if state.is_main_process else None


def _report(tm, job, res, tcfg, resumed_from, device, t_start, t0) -> dict:
    hist = res["history"]
    d = job.data
    report = {
        "method": tm.name, "method_config": tm.options(), "model": job.model_info,
        "data": {"source": str(job.data_path.resolve()), "sha256": sha256_file(job.data_path), "mode": d.kind,
                 "records": d.info.get("records", d.info.get("documents")), "dropped": d.dropped,
                 "max_records": job.max_records, "train_examples": len(d.train), "eval_examples": len(d.eval),
                 "eval_size": job.eval_size, "split_seed": tcfg.seed, "fingerprint": d.fingerprint()},
        "seq_len": int(job.seq_len), "global_batch": res["global_batch"], "world_size": res["world_size"],
        "steps": res["steps"], "total_steps": res["total_steps"], "seed": tcfg.seed,
        "token_budget": res["total_steps"] * res["global_batch"] * int(job.seq_len),
        "trainable_parameters": res.get("trainable_parameters"), "train_config": dataclasses.asdict(tcfg),
        "resumed_from_step": resumed_from, "first_loss": hist[0]["loss"] if hist else None,
        "final_loss": hist[-1]["loss"] if hist else None, "final_eval_loss": res["eval_loss"], "history": hist,
        "setup": job.setup, "distillation": job.distill_info, "warnings": job.warnings,
        "outputs": {"adapters": ADAPTER_DIR, "checkpoint": "." if job.export else None},
    }
    if tm.zero_pattern:
        report["sparsity"] = {"before": job.sparsity_before, "after_merge": None, "of": "decoder-layer linear weights"}
    man = {"tool": "prunetune", "command": "tune", "run_fingerprint": res["fingerprint"], "device": device,
           "versions": versions(), "machine": machine(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
           "train_wall_s": round(res["wall_s"], 3), "wall_time_s": round(time.perf_counter() - t0, 3),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available():
        man["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    report["manifest"] = man
    return report


def _write_tune_output(tm, job, res, report, partial: Path, out_path: Path, overwrite: bool, merge: bool) -> None:
    work, stage = partial / _WORK, partial / _STAGE
    if stage.exists():
        shutil.rmtree(stage)
    try:
        if job.export:
            exported = _export(tm, res.pop("model"), stage, job.tok, job.masks, job.linear_names)
            if "sparsity_after_merge" in exported:
                report["sparsity"]["after_merge"] = exported.pop("sparsity_after_merge")
            report.update(exported)
            if job.save_format == "compressed":
                report["storage"] = compress_checkpoint(stage)
        stage.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "adapters", stage / ADAPTER_DIR)
        base = {k: job.model_info.get(k) for k in ("spec", "kind", "path", "gguf_file", "model_type", "dtype",
                                                   "weights_sha256", "fingerprint")}
        record = {"format": 2, "tool": "prunetune", "method": tm.name, "method_config": tm.options(),
                  "base_model": base, "run_fingerprint": res["fingerprint"]}
        (stage / ADAPTER_DIR / ADAPTER_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        report["warnings"] += _quality_warnings(tm, report)
        (stage / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_manifest(stage, {"tool": "prunetune", "command": "tune", "method": tm.name,
                               "run_fingerprint": res["fingerprint"], "source_model": job.model_info["path"]})
        publish_dir(stage, out_path, overwrite)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)  # the training state stays resumable
        err = _as_write_error(e, out_path)
        if err is not None:
            raise _write_failed(err, partial, work, True) from None
        raise
    shutil.rmtree(partial, ignore_errors=True)


#: a tune whose held-out loss ends this much above where it started is reported as far worse than its input
WORSE_NATS = 1.0


def _quality_warnings(tm, report: dict) -> list[str]:
    """One line each when the result is far worse than the input, and the method's own (e.g. a mask that
    missed its target)."""
    out = []
    hist = report["history"]
    first = hist[0]["loss"] if hist else None
    last = report.get("final_eval_loss")
    if first is not None and last is not None and math.isfinite(first) and (not math.isfinite(last)
                                                                            or last > first + WORSE_NATS):
        out.append(f"the tuned model is far worse than its input: held-out loss {last:.3f} vs {first:.3f} on the "
                   f"first training batch (more than {WORSE_NATS:g} nat higher; too few steps, or a learning rate "
                   "too high?)")
    out += tm.result_warnings(report)
    for w in out:
        log.warning(w)
    return out


# --- checks and exports ------------------------------------------------------------------------------

@torch.no_grad()
def zero_masks(model) -> dict[str, torch.Tensor]:
    """``{state-dict name: (W == 0)}`` of every floating tensor of a plain model (on CPU)."""
    return {k: (v == 0).cpu() for k, v in model.state_dict().items() if torch.is_floating_point(v)}


def verify_zero_pattern(directory: Path, masks: dict[str, torch.Tensor], required: set[str]) -> dict:
    """Compare the zeros of every tensor saved in ``directory`` with ``masks`` (the input model's)."""
    from safetensors import safe_open

    checked, mismatched, zeros = 0, [], 0
    seen = set()
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k not in masks:
                    continue
                t = sf.get_tensor(k)
                seen.add(k)
                checked += 1
                if t.shape != masks[k].shape or not torch.equal(t == 0, masks[k]):
                    mismatched.append(k)
                zeros += int((t == 0).sum())
    missing = sorted(required - seen)
    return {"identical": not mismatched and not missing, "tensors_checked": checked, "zeros": zeros,
            "mismatched": mismatched[:20], "missing": missing[:20]}


def _linear_weight_names(model) -> set[str]:
    from ..models import get_adapter

    return {p + ".weight" for p in get_adapter(model).linear_paths()}


def _sparsity(model) -> float:
    from .methods.spp import weight_sparsity

    return weight_sparsity(model)


def _export(tm, model, stage: Path, tok, masks, linear_names) -> dict:
    """Export the plain checkpoint into ``stage``; return what the report records about it."""
    merged = tm.export(model, stage, tok)
    info = dict(tm.export_info(merged))
    if tm.zero_pattern is None:
        return info
    check = verify_zero_pattern(stage, masks, linear_names)
    info["sparsity_after_merge"] = _sparsity(merged)
    info["zero_pattern_check"] = check
    if tm.zero_pattern == "identical" and not check["identical"]:
        bad = (check["mismatched"] or check["missing"])[0]
        raise PrunetuneError(f"{tm.name} merge check failed: the zero pattern of '{bad}' differs from the input "
                             "model's")
    return info


def _as_write_error(e: BaseException, where: Path) -> OutputWriteError | None:
    if isinstance(e, OutputWriteError):
        return e
    return write_failure(e, where) if isinstance(e, Exception) else None


def _write_failed(e: OutputWriteError, partial: Path, work: Path, main: bool) -> OutputWriteError:
    """A refused write (disk full...): keep the training state when a checkpoint can resume it, else clean up."""
    if _latest_step(work) is not None:
        return OutputWriteError(f"{e} (the training checkpoints are kept in '{partial}': make room and rerun "
                                "with --resume)")
    if main:
        shutil.rmtree(partial, ignore_errors=True)
    return e


# --- merge and loading adapters ------------------------------------------------------------------------

def find_adapters(path) -> Path:
    """The adapters folder of a ``tune`` output (``<out>/adapters``), or that folder itself."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PrunetuneError(f"adapter path '{p}' does not exist")
    for cand in (p / ADAPTER_DIR, p):
        if (cand / ADAPTER_RECORD).is_file():
            return cand
    raise PrunetuneError(f"'{p}' holds no prunetune adapters (expected {ADAPTER_DIR}/{ADAPTER_RECORD}, "
                         "as written by 'prunetune tune')")


def _read_record(adir: Path) -> dict:
    try:
        rec = json.loads((adir / ADAPTER_RECORD).read_text())
        rec["method"], rec["method_config"], rec["base_model"]  # noqa: B018  (all three must be there)
    except (ValueError, KeyError, TypeError):
        raise PrunetuneError(f"'{adir / ADAPTER_RECORD}' is damaged (not a prunetune adapter record)") from None
    return rec


def load_adapted(adapters, *, model=None, method: str | None = None, dtype: str | None = None,
                 device: str | None = None):
    """The base model with the trained adapters of a ``tune`` output applied, unmerged:
    ``(model, tokenizer, method instance, info)``. Works for every method (SPP and PAT adapters have their
    own formats; LoRA's is a standard PEFT folder that ``peft.PeftModel.from_pretrained`` also loads)."""
    from ..devices import resolve_device as _device
    from .trainer import model_fingerprint

    adir = find_adapters(adapters)
    if adir.name == ADAPTER_DIR:
        verify_manifest(adir.parent)  # a tune output: adapters and checkpoint must match their recorded hashes
    rec = _read_record(adir)
    trained = get_method(rec["method"])
    cls = trained if method is None else get_method(method)
    if cls is not trained and cls.name not in trained.merges_as:
        raise PrunetuneError(f"these adapters were trained with '{trained.name}'; they cannot be merged as "
                             f"'{cls.name}'")
    base = rec["base_model"]
    spec = model if model is not None else base.get("path") or base.get("spec")
    src = resolve_model(spec)
    net, tok, info = load_model(src.spec, dtype=dtype or base.get("dtype") or "float32", device=_device(device))
    fp = model_fingerprint(net)
    if base.get("fingerprint") and fp != base["fingerprint"]:
        raise PrunetuneError(f"model '{src.spec}' is not the base model these adapters were trained on "
                             f"(fingerprint {fp} != {base['fingerprint']})")
    tm = cls(**rec["method_config"])
    info.update(path=src.location(), fingerprint=fp, adapters=str(adir.resolve()), trained_with=trained.name)
    info["sparsity_before"] = _sparsity(net)
    info["masks"] = zero_masks(net) if tm.zero_pattern else None
    info["linear_names"] = _linear_weight_names(net) if tm.zero_pattern else None
    tm.restore(net, adir)
    torch.manual_seed(0)
    net = tm.prepare(net)
    tm.load_adapters(net, adir)
    net.eval()
    return net, tok, tm, info


def merge(adapters, *, out, method: str | None = None, model=None, dtype: str | None = None,
          device: str | None = None, overwrite: bool = False, stream: bool | None = None,
          save_format: str = "dense") -> dict:
    """Turn the adapters of a ``tune`` output into a plain Hugging Face checkpoint in ``out``.

    ``adapters``: the ``tune`` output folder (or its ``adapters/`` subfolder). ``method``: defaults to the one
    the adapters were trained with; LoRA adapters can be merged as ``lora`` (plain, dense) or ``lora-masked``.
    ``model``: the base model (default: the recorded one; it must have the recorded fingerprint).
    SPP: merged sparse checkpoint with the input's zero pattern (verified); PAT: the shrunk model.
    ``stream``: merge tensor by tensor without loading the model (``tuning/streamed.py``); default: when the
    base is a local safetensors checkpoint and the method can (SPP, PAT). ``save_format="compressed"``: an
    SPP merge stored in the sparse-bitmask layout (`prunetune.sparse_storage`)."""
    adir = find_adapters(adapters)
    if adir.name == ADAPTER_DIR:
        verify_manifest(adir.parent)  # a tune output: adapters must match their recorded hashes
    rec = _read_record(adir)
    spec = model if model is not None else rec["base_model"].get("path") or rec["base_model"].get("spec")
    src = resolve_model(spec)
    out_path = check_output_dir(out, overwrite=overwrite, inputs=(src.home if src.kind != "hub" else None, str(adir)))
    trained = get_method(rec["method"])
    cls = trained if method is None else get_method(method)
    _check_compressed_output(cls, save_format, True)
    can_stream = src.kind == "local" and any(f.endswith(".safetensors") for f in src.weight_files) \
        and hasattr(cls, "stream_tensors") and cls is trained
    stream = can_stream if stream is None else bool(stream and can_stream)
    t_start, t0 = time.time(), time.perf_counter()
    reset_peak_rss()  # report this job's own peak
    stage = out_path.parent / f".{out_path.name}.merge-{time.time_ns():x}"
    try:
        if stream:
            tm, report = _merge_streamed(adir, rec, cls, src, stage, dtype)
        else:
            net, tok, tm, info = load_adapted(adir, model=model, method=method, dtype=dtype, device=device)
            masks, names = info.pop("masks"), info.pop("linear_names")
            report = {"method": tm.name, "trained_with": info.pop("trained_with"), "method_config": tm.options(),
                      "adapters": info.pop("adapters"), "model": info, "streamed": False}
            exported = _export(tm, net, stage, tok, masks, names)
            before = info.pop("sparsity_before")
            if tm.zero_pattern:
                report["sparsity"] = {"before": before, "after_merge": exported.pop("sparsity_after_merge"),
                                      "of": "decoder-layer linear weights"}
            report.update(exported)
        if save_format == "compressed":
            report["storage"] = compress_checkpoint(stage)
        report["manifest"] = {"tool": "prunetune", "command": "merge", "versions": versions(), "machine": machine(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
                              "wall_time_s": round(time.perf_counter() - t0, 3),
                              "peak_rss_mb": round(peak_rss_mb(), 1)}
        (stage / MERGE_REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_manifest(stage, {"tool": "prunetune", "command": "merge", "method": tm.name,
                               "source_model": src.location()})
        publish_dir(stage, out_path, overwrite)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        err = _as_write_error(e, out_path)
        if err is not None:  # name the output the user asked for, not the removed staging folder
            raise OutputWriteError(f"cannot write '{out_path}': {str(err).rpartition(chr(39) + ': ')[2]}") from None
        raise
    report["out"] = str(out_path)
    return report


def _check_compressed_output(cls, save_format: str, exports: bool) -> None:
    """Refuse, before any work, a compressed output that would have no zeros to store (or no checkpoint)."""
    if check_save_format(save_format) == "dense":
        return
    if not exports:
        raise PrunetuneError("--save-format compressed stores the merged checkpoint: add --merge")
    if not cls.keeps_zeros:
        raise PrunetuneError(f"--save-format compressed is for sparse checkpoints; {cls.name} does not keep the "
                             "input's zeros (use spp)")


def _merge_streamed(adir: Path, rec: dict, cls, src, stage: Path, dtype) -> tuple:
    """``merge`` tensor by tensor from the base checkpoint's files (``tuning/streamed.py``)."""
    from ..io import parse_dtype
    from .streamed import BaseTensors, fingerprint, write_streamed

    base_rec = rec["base_model"]
    verify_manifest(src.path)
    base = BaseTensors(src.path, parse_dtype(dtype or base_rec.get("dtype") or "float32"))
    fp = fingerprint(base)
    if base_rec.get("fingerprint") and fp != base_rec["fingerprint"]:
        raise PrunetuneError(f"model '{src.spec}' is not the base model these adapters were trained on "
                             f"(fingerprint {fp} != {base_rec['fingerprint']})")
    tm = cls(**rec["method_config"])
    exported = write_streamed(tm, adir, base, stage, Path(src.path))
    report = {"method": tm.name, "trained_with": rec["method"], "method_config": tm.options(),
              "adapters": str(adir.resolve()), "streamed": True,
              "model": {**src.describe(), "path": src.location(), "fingerprint": fp}}
    report.update(exported)
    if tm.zero_pattern:
        check, before, after = _zero_pattern_streamed(stage, base)
        report["sparsity"] = {"before": before, "after_merge": after, "of": "decoder-layer linear weights"}
        report["zero_pattern_check"] = check
        if tm.zero_pattern == "identical" and not check["identical"]:
            bad = (check["mismatched"] or check["missing"])[0]
            raise PrunetuneError(f"{tm.name} merge check failed: the zero pattern of '{bad}' differs from the input "
                                 "model's")
    return tm, report


def _zero_pattern_streamed(stage: Path, base) -> tuple[dict, float, float]:
    """The zero-pattern check of every decoder-layer linear, tensor by tensor; ``(check, sparsity before,
    sparsity after)`` over those weights."""
    from safetensors import safe_open

    from ..models import get_adapter

    names = {p + ".weight" for p in get_adapter(base.model).linear_paths()}
    mismatched, seen, zb, za, total = [], set(), 0, 0, 0
    for f in sorted(stage.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k not in names:
                    continue
                t, b = sf.get_tensor(k), base(k)
                seen.add(k)
                if t.shape != b.shape or not torch.equal(t == 0, b == 0):
                    mismatched.append(k)
                zb, za, total = zb + int((b == 0).sum()), za + int((t == 0).sum()), total + b.numel()
    missing = sorted(names - seen)
    check = {"identical": not mismatched and not missing, "tensors_checked": len(seen), "zeros": za,
             "mismatched": mismatched[:20], "missing": missing[:20]}
    return check, zb / max(1, total), za / max(1, total)


def summary(report: dict) -> str:
    """A few printable lines about a ``tune`` or ``merge`` report."""
    lines = []
    if "history" in report:
        fl, ll, ev = report.get("first_loss"), report.get("final_loss"), report.get("final_eval_loss")
        loss = f"loss {fl:.4f} -> {ll:.4f}" if fl is not None and ll is not None else "no step run"
        lines.append(f"tuned {report['method']}: {report['steps']} steps x global batch {report['global_batch']} "
                     f"(seq_len {report['seq_len']}"
                     + (f"; {report['token_budget']:,} token positions" if "token_budget" in report else "")
                     + f"), {loss}"
                     + (f", eval loss {ev:.4f}" if ev is not None and not math.isnan(ev) else "")
                     + (f" (resumed from step {report['resumed_from_step']})"
                        if report.get("resumed_from_step") is not None else ""))
        kd = report.get("distillation")
        if kd:
            lines.append(f"distilled from {kd['teacher']} (T={kd['temperature']:g}, weight {kd['weight']:g})")
    else:
        lines.append(f"merged {report['method']} adapters ({report['adapters']})")
    sp = report.get("sparsity")
    if sp is not None:
        s = f"decoder-layer sparsity {sp['before']:.4f}"
        if sp.get("after_merge") is not None:
            chk = report.get("zero_pattern_check", {})
            s += f" -> {sp['after_merge']:.4f} after merge (zero pattern identical: {'yes' if chk.get('identical') else 'no'})"
        lines.append(s)
    pat = report.get("pat")
    if pat:
        n = pat.get("parameters")  # a streamed merge (tuning/streamed.py) does not count them
        lines.append(f"hidden size {pat['hidden_size_before']} -> {pat['hidden_size']} "
                     f"({len(pat['kept_channels'])} channels kept)" + (f", {n:,} parameters" if n is not None else ""))
    man = report.get("manifest", {})
    lines.append(f"wall {man.get('wall_time_s', 0):.1f}s, peak RSS {man.get('peak_rss_mb', 0):.0f} MB")
    return "\n".join(lines)
