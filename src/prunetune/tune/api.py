"""``tune()`` and ``merge()``: from a model and a data file to adapters, a plain checkpoint and a report.

Output folder of ``tune`` (written in one rename when everything is done)::

    <out>/adapters/                    the method's adapter files + prunetune_adapter.json (base model,
                                       its fingerprint, method and method config: all ``merge`` needs)
    <out>/config.json, *.safetensors   the exported plain Hugging Face checkpoint (SPP/LoRA with
    <out>/tokenizer*                   ``merge=True``; always for PAT, which exports the shrunk model)
    <out>/tune_report.json             the run's manifest, history and checks
    <out>/prunetune_manifest.json      sha256 of every file above

Working folder: the hidden ``.<out>.partial`` next to ``out`` (as ``prune`` uses). Training checkpoints live
in ``.<out>.partial/train/checkpoints``; the final folder is assembled in ``.<out>.partial/out`` and renamed
to ``out``, then the working folder is removed. A crash or a kill leaves the working folder in place so
``resume=True`` can continue from its last checkpoint (the trainer refuses a checkpoint of a run with other
settings, another model or other data); a bad input found before or during training removes it (nothing
worth resuming), except when resuming (the interrupted run stays resumable). ``out`` is never touched
before the final rename.

On CPU with the same settings, a run killed after its last checkpoint and resumed ends with bit-identical
weights to an uninterrupted run (tests kill it with ``PRUNETUNE_TEST_KILL_AFTER_STEP=k``: SIGKILL just
before optimiser step ``k``, i.e. after ``k`` steps and the checkpoint at ``k`` when ``k`` is a multiple
of ``checkpoint_every``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import OutputWriteError, PrunetuneError, write_failure, writing
from ..io import check_output_dir, load_model, partial_dir_for, resolve_model, verify_manifest, write_manifest
from ..manifest import machine, peak_rss_mb, reset_peak_rss, sha256_file, versions

log = logging.getLogger("prunetune")

METHODS = ("spp", "lora", "lora-masked", "pat")
#: learning rates used when ``lr`` is None (small-model defaults)
DEFAULT_LR = {"spp": 4e-3, "lora": 2e-4, "lora-masked": 2e-4, "pat": 5e-5}
REPORT = "tune_report.json"
MERGE_REPORT = "merge_report.json"
ADAPTER_DIR = "adapters"
ADAPTER_RECORD = "prunetune_adapter.json"
NAMED_DATA = ("alpaca", "tinystories")
KILL_ENV = "PRUNETUNE_TEST_KILL_AFTER_STEP"
_WORK, _STAGE = "train", "out"


# --- inputs ------------------------------------------------------------------------------------------

def _check_method(method) -> str:
    if method not in METHODS:
        raise PrunetuneError(f"unknown tuning method '{method}' (use {', '.join(METHODS)})")
    return method


def resolve_data(data) -> Path:
    """A data file, or ``alpaca`` (the local data folder's instruct/alpaca_14k.jsonl) or ``tinystories``
    (the bundled TinyStories excerpt, plain text)."""
    from ..paths import TINYSTORIES, data_dir

    if data is None or str(data) == "":
        raise PrunetuneError("no tuning data given (a .jsonl/.txt file, 'alpaca' or 'tinystories')")
    s = str(data)
    if s == "tinystories" and not Path(s).exists():
        return TINYSTORIES
    if s == "alpaca" and not Path(s).exists():
        d = data_dir()
        f = d / "instruct" / "alpaca_14k.jsonl" if d is not None else None
        if f is None or not f.is_file():
            raise PrunetuneError("'alpaca' needs the local data folder with instruct/alpaca_14k.jsonl "
                                 "(set PRUNETUNE_DATA) or give the path of a .jsonl file")
        return f
    p = Path(s).expanduser()
    if not p.is_file():
        raise PrunetuneError(f"data file not found: {p}")
    return p


def _check_text(path: Path) -> None:
    """Refuse a binary or non-UTF-8 data file in one line (its first 64 KiB tell)."""
    import codecs

    with path.open("rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise PrunetuneError(f"{path}: looks like a binary file, not text")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as e:
        raise PrunetuneError(f"{path}: is not UTF-8 text (byte {e.start})") from None


def _check_data_fields(path: Path, mode: str) -> None:
    """Refuse a jsonl whose first record is neither Alpaca (instruction/output) nor text, in one line."""
    _check_text(path)
    if mode != "auto" or path.suffix == ".txt":
        return
    with path.open(encoding="utf-8", errors="replace") as f:  # _check_text has refused non-UTF-8 starts
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise PrunetuneError(f"{path}: the data file is empty")
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        raise PrunetuneError(f"{path}: line 1 is not valid JSON") from None
    if not isinstance(rec, dict):
        raise PrunetuneError(f"{path}: line 1 is not a JSON object")
    if "instruction" not in rec and "text" not in rec:
        found = ", ".join(sorted(map(str, rec))[:6]) or "none"
        raise PrunetuneError(f"{path}: records need Alpaca fields (instruction, input, output) or a 'text' field "
                             f"(line 1 has: {found})")


def _model_path(src) -> str:
    if src.kind == "hub":
        return src.spec
    p = Path(src.path) / src.gguf_file if src.gguf_file else Path(src.path)
    return str(p.expanduser().resolve())


def _device(device) -> str:
    from ..api import _device as dev

    d = dev(device)
    if d.startswith("cuda:"):
        torch.cuda.set_device(int(d.split(":", 1)[1]))
    return d


# --- methods -----------------------------------------------------------------------------------------

def method_config(method: str, *, spp_r=16, spp_alpha=32.0, spp_groups=16, spp_dropout=0.05, lora_r=8,
                  lora_alpha=16.0, lora_dropout=0.05, ratio=0.25, hio_rank=None, identity_loss=True,
                  frozen_mask=False, mask_init="zero", mask_init_scale=0.1, milestone=1 / 3) -> dict:
    """The method's configuration as a plain dict (validated), as recorded next to the adapters."""
    if method == "spp":
        from .spp import SPPConfig

        return asdict(SPPConfig(r=spp_r, alpha=spp_alpha, groups=spp_groups, dropout=spp_dropout))
    if method in ("lora", "lora-masked"):
        if int(lora_r) <= 0:
            raise PrunetuneError(f"LoRA r must be positive (got {lora_r})")
        if not 0 <= lora_dropout < 1:
            raise PrunetuneError(f"LoRA dropout must be in [0, 1) (got {lora_dropout})")
        return {"r": int(lora_r), "alpha": float(lora_alpha), "dropout": float(lora_dropout), "targets": None}
    from .pat import PATConfig

    if ratio is None:
        ratio = 0.25
    return asdict(PATConfig(ratio=ratio, hio_rank=hio_rank, identity_loss=identity_loss, frozen_mask=frozen_mask,
                            mask_init=mask_init, mask_init_scale=mask_init_scale, milestone_frac=milestone, lora_r=lora_r,
                            lora_alpha=lora_alpha, lora_dropout=lora_dropout))


def build_method(method: str, config: dict):
    """The ``TuningMethod`` for a method name and its recorded configuration."""
    if method == "spp":
        from .spp import SPPConfig, SPPMethod

        return SPPMethod(SPPConfig(**config), on_dense="ignore")  # the density check is done (once) by tune()
    if method in ("lora", "lora-masked"):
        from .lora import LoRAMethod

        return LoRAMethod(r=config["r"], alpha=config["alpha"], dropout=config["dropout"],
                          targets=config.get("targets"), masked_merge=method == "lora-masked")
    from .pat import PATConfig, PATMethod

    return PATMethod(PATConfig(**config))


def _install_kill_hook(tm) -> None:
    """Tests only: SIGKILL this process just before optimiser step ``$PRUNETUNE_TEST_KILL_AFTER_STEP``."""
    at = os.environ.get(KILL_ENV)
    if not at:
        return
    k = int(at)
    orig = tm.on_step_begin

    def on_step_begin(model, step, total_steps):
        if step == k:
            os.kill(os.getpid(), signal.SIGKILL)
        orig(model, step, total_steps)

    tm.on_step_begin = on_step_begin


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

    a = get_adapter(model)
    return {f"{a.layers_path}.{i}.{n}.weight" for i in range(a.num_layers) for n in a.linear_names()}


def _sparsity(model) -> float:
    from .spp import weight_sparsity

    return weight_sparsity(model)


def _export(method: str, tm, model, stage: Path, tok, masks, linear_names) -> dict:
    """Export the plain checkpoint into ``stage`` and return what the report records about it."""
    info: dict = {}
    merged = tm.export(model, stage, tok)
    if method == "pat":
        pi = dict(getattr(merged, "_prunetune_pat_info", {}) or {})
        info["pat"] = {"hidden_size_before": pi.get("hidden_size_before"), "hidden_size": pi.get("hidden_size"),
                       "ratio_removed": pi.get("ratio"), "kept_channels": pi.get("kept_channels"),
                       "parameters": sum(p.numel() for p in merged.parameters())}
        return info
    info["sparsity_after_merge"] = _sparsity(merged)
    check = verify_zero_pattern(stage, masks, linear_names)
    info["zero_pattern_check"] = check
    if method == "spp" and not check["identical"]:
        bad = (check["mismatched"] or check["missing"])[0]
        raise PrunetuneError(f"SPP merge check failed: the zero pattern of '{bad}' differs from the input model's")
    return info


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``stage`` to ``out`` (an existing ``out`` is replaced only now)."""
    old = None
    if out.exists():
        if not overwrite:
            raise PrunetuneError(f"output directory '{out}' already exists (use --overwrite to replace it)")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _latest_step(work: Path) -> int | None:
    from .trainer import _checkpoints

    ck = _checkpoints(work)
    return int(ck[-1].name.split("-")[1]) if ck else None


# --- tune --------------------------------------------------------------------------------------------

def tune(model=None, *, method: str, data, out, seq_len: int = 256, batch_size: int = 8, grad_accum: int = 1,
         lr: float | None = None, epochs: float = 1.0, max_steps: int | None = None, warmup: int = 0,
         schedule: str = "cosine", weight_decay: float = 0.0, seed: int = 0, eval_every: int = 0,
         eval_size: float | int = 0.05, max_records: int | None = None, data_mode: str = "auto",
         checkpoint_every: int = 100, merge: bool = False, ratio: float = 0.25, spp_groups: int = 16,
         spp_r: int = 16, spp_alpha: float = 32.0, spp_dropout: float = 0.05, lora_r: int = 8,
         lora_alpha: float = 16.0, lora_dropout: float = 0.05, hio_rank: int | None = None,
         no_identity_loss: bool = False, frozen_mask: bool = False, mask_init: str = "zero",
         mask_init_examples: int = 64, mask_init_scale: float = 0.1, mask_init_data: str | None = None,
         mask_init_seqlen: int = 512, milestone: float = 1 / 3, on_dense: str = "warn",
         dtype: str = "float32", device: str | None = None, overwrite: bool = False, resume: bool = False,
         progress: bool = True) -> dict:
    """Fine-tune ``model`` with ``method`` on ``data`` and write adapters (+ a plain checkpoint) to ``out``.

    ``method``: ``spp`` (sparsity-preserving; the merge keeps the zero pattern exactly), ``lora`` (plain
    merge, dense result), ``lora-masked`` (merge masked by the input's zeros) or ``pat`` (learns which
    hidden channels to drop; always exports the shrunk model, ``ratio`` = fraction removed).
    ``data``: an Alpaca ``.jsonl`` (instruction/input/output; loss on the response only), a ``.jsonl`` with
    ``text`` or a ``.txt`` (packed into ``seq_len`` windows), or ``alpaca`` / ``tinystories``.
    ``seq_len``: cut-off (instruction) or window length (text) in tokens. Global batch =
    ``batch_size · grad_accum`` (· processes). ``lr`` None: 4e-3 for spp, 2e-4 for lora, 5e-5 for pat.
    ``max_steps`` overrides ``epochs``. ``merge``: also export the merged checkpoint (spp/lora).
    ``mask_init`` (pat): ``zero`` (W_M = 0, as published) or ``activation`` (warm start: the channels with the
    most energy at the RMSNorm outputs on the first ``mask_init_examples`` training examples start live, or,
    with ``mask_init_data`` (a corpus name or text file), on ``mask_init_examples`` random windows of
    ``mask_init_seqlen`` tokens of it, the same importance the channel-pruning baselines use;
    ``mask_init_scale`` spreads W_M: larger fades weak channels out earlier and faster). ``milestone``
    (pat): the fraction of steps after which the mask is binary (default 1/3).
    ``on_dense``: what to do when SPP is given a dense model ("warn", "error", "ignore").
    ``resume``: continue the interrupted run of the same settings into the same ``out``.

    Returns the report written to ``out/tune_report.json`` (plus ``out``)."""
    from .data import load_tuning_data
    from .trainer import TrainConfig, model_fingerprint, train

    _check_method(method)
    if on_dense not in ("warn", "error", "ignore"):
        raise PrunetuneError(f"on_dense must be warn, error or ignore (got {on_dense})")
    if seq_len is None or int(seq_len) <= 0:
        raise PrunetuneError(f"--seq-len must be a positive number of tokens (got {seq_len})")
    if checkpoint_every is None or int(checkpoint_every) < 0:
        raise PrunetuneError(f"--checkpoint-every must be 0 (never) or positive (got {checkpoint_every})")
    if max_records is not None and int(max_records) <= 0:
        raise PrunetuneError(f"--max-records must be positive (got {max_records})")
    if eval_every is not None and int(eval_every) < 0:
        raise PrunetuneError(f"--eval-every must not be negative (got {eval_every})")
    mcfg = method_config(method, spp_r=spp_r, spp_alpha=spp_alpha, spp_groups=spp_groups, spp_dropout=spp_dropout,
                         lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, ratio=ratio,
                         hio_rank=hio_rank, identity_loss=not no_identity_loss, frozen_mask=frozen_mask,
                         mask_init=mask_init, mask_init_scale=mask_init_scale, milestone=milestone)
    if mask_init_data is not None and (method != "pat" or mask_init != "activation"):
        raise PrunetuneError("--mask-init-data only applies to pat with --mask-init activation")
    device = _device(device)
    lr = DEFAULT_LR[method] if lr is None else float(lr)
    tcfg = TrainConfig(lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                       warmup_steps=warmup, schedule=schedule, weight_decay=weight_decay, seed=seed,
                       eval_every=eval_every, checkpoint_every=int(checkpoint_every), progress=progress,
                       device="cpu" if device == "cpu" else "cuda")
    data_path = resolve_data(data)
    _check_data_fields(data_path, data_mode)
    src = resolve_model(model)

    out_path = Path(out).expanduser().resolve()
    partial = partial_dir_for(out_path)
    work, stage = partial / _WORK, partial / _STAGE
    resumed_from = None
    if resume:
        if out_path.exists() and not overwrite:
            raise PrunetuneError(f"output directory '{out_path}' already exists (use --overwrite to replace it)")
        resumed_from = _latest_step(work)
        if resumed_from is None:
            raise PrunetuneError(f"nothing to resume: no interrupted run for '{out_path}'")
    else:
        check_output_dir(out_path, overwrite=overwrite, inputs=(src.path if src.kind != "hub" else None,))

    t_start, t0 = time.time(), time.perf_counter()
    reset_peak_rss()  # report this job's own peak
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    net, tok, model_info = load_model(src.spec, dtype=dtype, device="cpu")
    model_info["path"] = _model_path(src)
    model_info["fingerprint"] = model_fingerprint(net)
    tdata = load_tuning_data(data_path, tok, mode=data_mode, seq_len=int(seq_len), eval_size=eval_size, seed=seed,
                             limit=max_records)
    warnings_: list[str] = []
    if method == "pat":
        from .pat import PATConfig, check_model

        check_model(net, PATConfig(**mcfg))
    sparsity_before = _sparsity(net)
    masks = linear_names = None
    if method != "pat":
        from .spp import DENSE_SPARSITY

        if method == "spp" and on_dense != "ignore" and sparsity_before < DENSE_SPARSITY:
            msg = (f"SPP on a dense model (only {sparsity_before:.2%} of the decoder-layer weights are zero): "
                   "there is no sparsity pattern to preserve; prune it first for a sparse result")
            if on_dense == "error":
                raise PrunetuneError(msg)
            log.warning(msg)
            warnings_.append(msg)
        if merge:
            masks, linear_names = zero_masks(net), _linear_weight_names(net)
    tm = build_method(method, mcfg)
    mask_init_info = None
    if method == "pat" and mcfg.get("mask_init") == "activation":
        from .pat.channels import channel_scores

        if int(mask_init_examples) <= 0:
            raise PrunetuneError(f"mask_init_examples must be positive (got {mask_init_examples})")
        if mask_init_data is None:
            calib = [e["input_ids"] for e in tdata.train[:int(mask_init_examples)]]
            source = "the first training examples"
        else:
            from ..data.calibration import sample_calibration

            calib, proto = sample_calibration(tok, mask_init_data, int(mask_init_examples), int(mask_init_seqlen),
                                              seed=seed)
            source = proto
        tm.init_scores = channel_scores(net, "activation", calib)
        mask_init_info = {"importance": "activation energy at every RMSNorm output", "examples": len(calib),
                          "tokens": sum(len(c) for c in calib), "source": source}
    _install_kill_hook(tm)

    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")  # several processes under `accelerate launch`: rank 0 writes
    if not resume and partial.exists() and state.is_main_process:
        log.warning("removing the leftovers of an earlier interrupted run: %s (use --resume to continue one)",
                    partial)
        shutil.rmtree(partial)
    state.wait_for_everyone()
    try:
        with writing(work):
            res = train(net, tok, tm, tdata, tcfg, work, resume=resume)
    except OutputWriteError as e:
        raise _write_failed(e, partial, work, state.is_main_process) from None
    except PrunetuneError:
        if not resume and state.is_main_process:  # bad input found while starting: nothing worth resuming
            shutil.rmtree(partial, ignore_errors=True)
        raise
    trained = res.pop("model")
    if not state.is_main_process:
        return {k: v for k, v in res.items()}

    if stage.exists():
        shutil.rmtree(stage)
    try:
        exported: dict = {}
        export = merge or method == "pat"
        if export:
            exported = _export(method, tm, trained, stage, tok, masks, linear_names)
        stage.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "adapters", stage / ADAPTER_DIR)
        record = {"format": 1, "tool": "prunetune", "method": method, "method_config": mcfg,
                  "base_model": {k: model_info.get(k) for k in ("spec", "kind", "path", "gguf_file", "model_type",
                                                                "dtype", "weights_sha256", "fingerprint")},
                  "run_fingerprint": res["fingerprint"]}
        (stage / ADAPTER_DIR / ADAPTER_RECORD).write_text(json.dumps(record, indent=1) + "\n")

        hist = res["history"]
        report = {
            "method": method, "method_config": mcfg, "model": model_info,
            "data": {"source": str(data_path.resolve()), "sha256": sha256_file(data_path), "mode": tdata.kind,
                     "records": tdata.info.get("records", tdata.info.get("documents")), "dropped": tdata.dropped,
                     "max_records": max_records, "train_examples": len(tdata.train),
                     "eval_examples": len(tdata.eval), "eval_size": eval_size, "split_seed": seed,
                     "fingerprint": tdata.fingerprint()},
            "seq_len": int(seq_len), "global_batch": res["global_batch"], "world_size": res["world_size"],
            "steps": res["steps"], "total_steps": res["total_steps"], "seed": seed,
            "trainable_parameters": res.get("trainable_parameters"),
            "train_config": asdict(tcfg), "resumed_from_step": resumed_from,
            "first_loss": hist[0]["loss"] if hist else None, "final_loss": hist[-1]["loss"] if hist else None,
            "final_eval_loss": res["eval_loss"], "history": hist, "warnings": warnings_,
            "outputs": {"adapters": ADAPTER_DIR, "checkpoint": "." if export else None},
        }
        if method != "pat":
            report["sparsity"] = {"before": sparsity_before, "after_merge": exported.get("sparsity_after_merge"),
                                  "of": "decoder-layer linear weights"}
            if "zero_pattern_check" in exported:
                report["zero_pattern_check"] = exported["zero_pattern_check"]
        else:
            report["pat"] = exported.get("pat")
            if mask_init_info is not None:
                report["pat"]["mask_init"] = mask_init_info
        man = {"tool": "prunetune", "command": "tune", "run_fingerprint": res["fingerprint"], "device": device,
               "versions": versions(), "machine": machine(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
               "train_wall_s": round(res["wall_s"], 3), "wall_time_s": round(time.perf_counter() - t0, 3),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
        if torch.cuda.is_available():
            man["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report["manifest"] = man
        (stage / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_manifest(stage, {"tool": "prunetune", "command": "tune", "method": method,
                               "run_fingerprint": res["fingerprint"]})
        _publish(stage, out_path, overwrite)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)  # the training state stays resumable
        err = _as_write_error(e, out_path)
        if err is not None:
            raise _write_failed(err, partial, work, True) from None
        raise
    shutil.rmtree(partial, ignore_errors=True)
    report["out"] = str(out_path)
    return report


# --- merge -------------------------------------------------------------------------------------------

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


def merge(adapters, *, out, method: str | None = None, model=None, dtype: str | None = None,
          device: str | None = None, overwrite: bool = False) -> dict:
    """Turn the adapters of a ``tune`` output into a plain Hugging Face checkpoint in ``out``.

    ``adapters``: the ``tune`` output folder (or its ``adapters/`` subfolder). ``method``: defaults to the one
    the adapters were trained with; LoRA adapters can be merged as ``lora`` (plain, dense) or ``lora-masked``.
    ``model``: the base model (default: the recorded one; it must have the recorded fingerprint).
    SPP: merged sparse checkpoint with the input's zero pattern (verified); PAT: the shrunk model."""
    from .trainer import model_fingerprint

    adir = find_adapters(adapters)
    if adir.name == ADAPTER_DIR:
        verify_manifest(adir.parent)  # a tune output: adapters and checkpoint must match their recorded hashes
    try:
        rec = json.loads((adir / ADAPTER_RECORD).read_text())
        trained, mcfg, base = rec["method"], rec["method_config"], rec["base_model"]
    except (ValueError, KeyError):
        raise PrunetuneError(f"'{adir / ADAPTER_RECORD}' is damaged (not a prunetune adapter record)") from None
    _check_method(trained)
    method = trained if method is None else _check_method(method)
    lora_family = {"lora", "lora-masked"}
    if method != trained and not {method, trained} <= lora_family:
        raise PrunetuneError(f"these adapters were trained with '{trained}'; they cannot be merged as '{method}'")
    device = _device(device)
    dtype = dtype or base.get("dtype") or "float32"
    spec = model if model is not None else base.get("path") or base.get("spec")
    src = resolve_model(spec)
    out_path = check_output_dir(out, overwrite=overwrite,
                                inputs=(src.path if src.kind != "hub" else None, str(adir)))

    t_start, t0 = time.time(), time.perf_counter()
    reset_peak_rss()  # report this job's own peak
    net, tok, info = load_model(src.spec, dtype=dtype, device=device)
    fp = model_fingerprint(net)
    if base.get("fingerprint") and fp != base["fingerprint"]:
        raise PrunetuneError(f"model '{src.spec}' is not the base model these adapters were trained on "
                             f"(fingerprint {fp} != {base['fingerprint']})")
    sparsity_before = _sparsity(net)
    masks = zero_masks(net) if method != "pat" else None
    names = _linear_weight_names(net) if method != "pat" else None
    tm = build_method(method, mcfg)
    torch.manual_seed(0)
    net = tm.prepare(net)
    tm.load_adapters(net, adir)
    net.eval()
    stage = out_path.parent / f".{out_path.name}.merge-{uuid.uuid4().hex[:8]}"
    try:
        exported = _export(method, tm, net, stage, tok, masks, names)
        report = {"method": method, "trained_with": trained, "method_config": mcfg, "adapters": str(adir.resolve()),
                  "model": {**info, "path": _model_path(src), "fingerprint": fp}}
        if method != "pat":
            report["sparsity"] = {"before": sparsity_before, "after_merge": exported["sparsity_after_merge"],
                                  "of": "decoder-layer linear weights"}
            report["zero_pattern_check"] = exported["zero_pattern_check"]
        else:
            report["pat"] = exported["pat"]
        report["manifest"] = {"tool": "prunetune", "command": "merge", "device": device, "versions": versions(),
                              "machine": machine(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
                              "wall_time_s": round(time.perf_counter() - t0, 3),
                              "peak_rss_mb": round(peak_rss_mb(), 1)}
        (stage / MERGE_REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_manifest(stage, {"tool": "prunetune", "command": "merge", "method": method})
        _publish(stage, out_path, overwrite)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        err = _as_write_error(e, out_path)
        if err is not None:
            raise err from None
        raise
    report["out"] = str(out_path)
    return report


def summary(report: dict) -> str:
    """A few printable lines about a ``tune`` or ``merge`` report."""
    lines = []
    if "history" in report:
        fl, ll, ev = report.get("first_loss"), report.get("final_loss"), report.get("final_eval_loss")
        loss = f"loss {fl:.4f} -> {ll:.4f}" if fl is not None and ll is not None else "no step run"
        lines.append(f"tuned {report['method']}: {report['steps']} steps x global batch {report['global_batch']} "
                     f"(seq_len {report['seq_len']}), {loss}"
                     + (f", eval loss {ev:.4f}" if ev is not None and not math.isnan(ev) else "")
                     + (f" (resumed from step {report['resumed_from_step']})"
                        if report.get("resumed_from_step") is not None else ""))
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
        lines.append(f"PAT: hidden size {pat['hidden_size_before']} -> {pat['hidden_size']} "
                     f"({len(pat['kept_channels'])} channels kept), {pat['parameters']:,} parameters")
    man = report.get("manifest", {})
    lines.append(f"wall {man.get('wall_time_s', 0):.1f}s, peak RSS {man.get('peak_rss_mb', 0):.0f} MB")
    return "\n".join(lines)
