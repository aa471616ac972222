"""``prune()``: one call from a model reference to a pruned, plain Hugging Face checkpoint + report."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import ShardWriter, materialize, open_streaming, release
from ..data.bos import family_bos
from ..data.calibration import sample_calibration
from ..errors import PrunetuneError
from ..evaluation.perplexity import before_after_lines, max_positions, perplexity
from ..io import (all_finite, atomic_output_dir, check_output_dir, load_model, parse_dtype, partial_dir_for,
                  resolve_model, run_lock, verify_manifest, write_manifest)
from ..manifest import machine, measure, peak_rss_mb, versions
from ..models import get_adapter
from ..models import preflight
from ..sparse_storage import check_save_format, compress_checkpoint
from .masks import parse_sparsity
from .methods import check_options, get_method
from .owl import outlier_ratios, owl_layer_specs
from .activations import JOURNAL, ActivationCache, Slot, parse_budget, read_journal
from .sequential import DriverConfig, LayerResult, sequential_prune

log = logging.getLogger("prunetune")
REPORT = "prune_report.json"
RESUME = "resume"


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Equal-size batches (the recorded attention kwargs are shared by all of them)."""
    n = ids.shape[0]
    bs = max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)
    return list(ids.split(bs))


def _load_tokenizer(src):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, **({"gguf_file": src.gguf_file} if src.gguf_file else {}))
    except (OSError, ValueError) as e:
        raise PrunetuneError(f"cannot load the tokenizer of '{src.spec}': {str(e).splitlines()[0]}") from None


def _fingerprint(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()


def prune(model=None, *, method: str, sparsity, out, calib: str = "c4", nsamples: int = 128, seqlen: int = 2048,
          seed: int = 0, damp: float | None = None, blocksize: int = 128, owl: bool = False, owl_lambda: float = 0.08,
          owl_m: float = 5.0, true_sequential: bool = True, eval_corpora=None, eval_seqlen: int = 512,
          eval_max_windows: int | None = None, dtype: str = "float32", device: str | None = None,
          overwrite: bool = False, resume: bool = False, batch_size: int = 8, method_opts: dict | None = None,
          stream: bool | None = None, cache_budget="auto", compute_dtype: str = "auto", progress: bool = True,
          units=None, save_format: str = "dense", calib_bos: str | None = None) -> dict:
    """Prune ``model`` (HF dir, Hub id or GGUF) and write a plain HF checkpoint plus ``prune_report.json`` to ``out``.

    ``sparsity``: 0.5 = half of every pruned matrix is zero; "2:4" keeps 2 of every 4 consecutive input
    weights. ``damp``: Hessian dampening (None: the method's default, see `methods.register`). Local
    safetensors checkpoints are streamed one layer at a time (bounded memory); others are loaded whole. The
    activations between layers stay in RAM up to ``cache_budget`` MB (``"auto"``: a quarter of the memory
    available), else on disk in the working folder. ``resume=True`` continues a killed run from its last
    finished layer. ``compute_dtype``: what each layer runs in while it is pruned (``"auto"``: float32 on a CPU
    for a bfloat16/float16 model, else ``dtype``); the written weights keep ``dtype``.

    ``units`` (a ``structured.neurons.UnitPlan``; ``method`` and ``sparsity`` are then ignored): remove whole
    MLP neurons and heads instead of weights, in the same streamed, resumable driver (``shrink --structure``).

    ``calib_bos``: where BOS goes in the calibration windows (`data.bos`; None: the family's convention, as
    ``eval --bos``: a BOS per window for Gemma, the tokenizer's own elsewhere).

    ``save_format="compressed"``: the pruned matrices are stored in compressed-tensors' sparse-bitmask layout
    (`prunetune.sparse_storage`: 0.53x their dense bytes at 50% in float32); every prunetune command reads it,
    ``prunetune convert`` turns it back into the dense checkpoint serving engines load. Default ``dense``.
    """
    job = _resolve_job(model, method=method, sparsity=sparsity, out=out, nsamples=nsamples, seqlen=seqlen,
                       damp=damp, blocksize=blocksize, owl=owl, method_opts=method_opts, device=device,
                       dtype=dtype, compute_dtype=compute_dtype, cache_budget=cache_budget, resume=resume,
                       overwrite=overwrite, units=units, save_format=save_format)
    with run_lock(job.out):  # held until the run ends: a second run into the same --out refuses to start
        if not resume and job.partial.exists():
            log.info("removing the leftovers of an earlier interrupted run: %s", job.partial)
            shutil.rmtree(job.partial)
        if job.src.kind == "local":
            preflight(job.src.path)  # an unsupported model is said before any weight is read
        run = _Run(job, time.time())
        with measure() as meas:
            run.open(stream, dtype)
            run.calibrate(calib, nsamples, seqlen, seed, batch_size, calib_bos, dict(
                blocksize=blocksize, true_sequential=true_sequential,
                owl={"lambda": owl_lambda, "m": owl_m} if owl else None, method_opts=method_opts or {}))
            run.load_outside_layers()
            # kept after a crash, a kill or a full disk once a finished layer can be resumed
            resumable = lambda tmp: (tmp / RESUME / JOURNAL).is_file()  # noqa: E731
            with atomic_output_dir(job.out, overwrite=overwrite, keep_partial=resumable) as tmp:
                run.prune_layers(tmp, DriverConfig(
                    method=job.method, spec=job.spec, damp=job.damp, blocksize=blocksize,
                    true_sequential=true_sequential, method_opts=dict(method_opts or {}),
                    compute_dtype=None if job.run_dtype == job.torch_dtype else job.run_dtype),
                    owl=(owl_lambda, owl_m) if owl else None, progress=progress)
                report = run.write(tmp)
                if eval_corpora:
                    report["eval"] = _eval_pair(job.src.spec, tmp, eval_corpora, eval_seqlen, eval_max_windows,
                                                dtype, job.device)
                report = run.write_report(tmp, report)
        # wall time and peak memory of the whole job, including the evaluation
        report["manifest"].update(meas.as_dict())
        if units is None:
            report["summary_table"] = summary_table(report)
        return report


@dataclass
class PruneJob:
    """What a prune (or unit shrink) was asked to do, checked and resolved once: the flows read only this."""

    src: object             # io.ModelSource
    out: Path
    partial: Path           # the working folder beside ``out``
    method: object          # a registered PruneMethod, or a structured.neurons.UnitPlan
    spec: object            # SparsitySpec (the UnitPlan for a shrink)
    damp: float
    device: str
    torch_dtype: torch.dtype
    run_dtype: torch.dtype  # what each layer runs in while it is pruned
    budget_mb: float
    resume: bool
    units: object = None
    save_format: str = "dense"

    @property
    def command(self) -> str:
        return "prune" if self.units is None else "shrink"

    @property
    def journal(self) -> Path:
        return self.partial / RESUME / JOURNAL


def _resolve_job(model, *, method, sparsity, out, nsamples, seqlen, damp, blocksize, owl, method_opts, device,
                 dtype, compute_dtype, cache_budget, resume, overwrite, units, save_format) -> PruneJob:
    """Every argument checked (one clear line for bad input, before anything is read or written)."""
    from ..devices import resolve_device

    pm = get_method(method) if units is None else units
    spec = parse_sparsity(sparsity) if units is None else units
    if nsamples <= 0:
        raise PrunetuneError(f"--nsamples must be positive (got {nsamples})")
    if seqlen <= 0:
        raise PrunetuneError(f"--seqlen must be positive (got {seqlen})")
    damp = pm.damp if damp is None else damp
    if damp < 0:
        raise PrunetuneError(f"--damp must be non-negative (got {damp})")
    check_save_format(save_format)
    if units is not None and save_format != "dense":
        raise PrunetuneError("a shrunk model has no zeros to store compressed (--save-format is for prune)")
    if owl and spec.kind != "unstructured":
        raise PrunetuneError("--owl sets per-layer unstructured sparsity; it cannot be combined with N:M")
    if units is None:
        check_options(pm, spec, dict(method_opts or {}), damp=damp, blocksize=blocksize)
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    if compute_dtype == "auto":
        half = torch_dtype in (torch.bfloat16, torch.float16)
        run_dtype = torch.float32 if half and torch.device(device).type == "cpu" else torch_dtype
    else:
        run_dtype = parse_dtype(compute_dtype)
    budget_mb = parse_budget(cache_budget)
    src = resolve_model(model)
    out_path = Path(out).expanduser().resolve()
    job = PruneJob(src, out_path, partial_dir_for(out_path), pm, spec, damp, device, torch_dtype, run_dtype,
                   budget_mb, resume, units, save_format)
    if resume:
        if out_path.exists() and not overwrite:
            raise PrunetuneError(f"output directory '{out_path}' already exists (use --overwrite to replace it)")
        if not job.journal.is_file():
            raise PrunetuneError(f"nothing to resume: no interrupted run for '{out_path}'")
    else:
        check_output_dir(out_path, overwrite=overwrite, inputs=(src.home if src.kind != "hub" else None,))
    return job


class _Run:
    """One prune run's state, step by step: the opened model, its calibration batches and protocol, the layers
    pruned (or resumed), the written checkpoint and report."""

    def __init__(self, job: PruneJob, t_start: float):
        self.job, self.t_start = job, t_start
        self.state = None  # the journal of the interrupted run being resumed

    def open(self, stream, dtype: str) -> None:
        """The model (streamed layer by layer when it can be), its tokenizer and adapter; targets checked."""
        job = self.job
        self.net, self.source, self.model_info, self.streaming = _open_model(job.src, stream, dtype, job.torch_dtype)
        self.tok = _load_tokenizer(job.src)
        self.adapter = get_adapter(self.net)
        _check_targets(self.net, self.adapter, job.spec, job.units)

    def calibrate(self, calib, nsamples, seqlen, seed, batch_size, calib_bos, settings: dict) -> None:
        """The calibration batches, the run's protocol and fingerprint; a resume of other settings refused."""
        job, net = self.job, self.net
        limit = max_positions(net.config)
        if limit is not None and seqlen > limit:
            log.warning("calibration seqlen %d clipped to the model's %d positions", seqlen, limit)
            seqlen = limit
        ids, calib_protocol = sample_calibration(self.tok, calib, nsamples, seqlen, seed,
                                                 bos=calib_bos or family_bos(net.config.model_type))
        self.batches = _batches(ids, batch_size)
        spec = job.spec
        self.protocol = {
            "model": {k: v for k, v in self.model_info.items() if k != "loading"}, "method": job.method.name,
            "sparsity": str(spec), "sparsity_semantics": _semantics(spec), "calibration": calib_protocol,
            "damp": job.damp, "blocksize": settings["blocksize"], "true_sequential": settings["true_sequential"],
            "owl": settings["owl"], "method_opts": settings["method_opts"],
            "dtype": str(job.torch_dtype).replace("torch.", ""), "prunetune": versions()["prunetune"],
            "compute_dtype": str(job.run_dtype).replace("torch.", ""),
        }
        if job.units is not None:  # what decides a unit shrink (the fingerprint of its resume)
            self.protocol.update(sparsity=None, sparsity_semantics=None, damp=job.units.damp, blocksize=None,
                                 units=job.units.describe())
        self.fingerprint = _fingerprint(self.protocol)
        if job.resume:  # checked before the working folder is opened: a refused resume leaves it intact
            self.state = read_journal(job.journal.parent)
            if self.state.get("fingerprint") != self.fingerprint:
                raise PrunetuneError("cannot resume: the interrupted run used other settings or another model "
                                     "(start again without --resume)")

    def load_outside_layers(self) -> None:
        """The weights outside the decoder layers on the device (streamed: only what the first layer needs),
        each checked for NaN/Inf."""
        net, adapter, device = self.net, self.adapter, self.job.device
        if self.streaming:
            _load_outside_layers(net, adapter, self.source, device, self.job.torch_dtype)
        else:
            for name, p in net.named_parameters():
                if not name.startswith(adapter.layers_path + "."):
                    p.data = p.data.to(device)
        for name, p in net.named_parameters():
            if (not name.startswith(adapter.layers_path + ".") and p.device.type != "meta"
                    and not all_finite(p.data)):
                raise PrunetuneError(f"weights of '{name}' contain NaN/Inf")

    def _materialize(self, i, layer) -> None:
        materialize(self.net, self.adapter.layer_prefix(i), layer, self.source, self.job.device, self.job.torch_dtype)

    def prune_layers(self, tmp: Path, cfg: DriverConfig, *, owl, progress: bool) -> None:
        """Every layer (from the journal's next one when resuming) through the driver, each written as a shard
        and journalled as soon as it is done."""
        job, net, adapter, state = self.job, self.net, self.adapter, self.state
        torch_dtype, device, streaming = job.torch_dtype, job.device, self.streaming
        self.writer = ShardWriter(tmp)
        shapes = [(int(b.shape[0]), int(b.shape[1]), int(adapter.hidden_size)) for b in self.batches]
        self.cache = cache = ActivationCache(tmp / RESUME, shapes, torch_dtype, job.budget_mb)
        start_layer, slot, done, layer_specs, earlier, layer_times = 0, "a", [], None, [], []
        if job.resume:
            start_layer, slot = state["layer"] + 1, state["slot"]
            earlier = state.get("parts", [])
            layer_times = list(state.get("layer_wall_time_s", []))
            done = [LayerResult(**r) for r in state["results"]]
            layer_specs = state.get("layer_specs")
            layer_specs = [parse_sparsity(x) for x in layer_specs] if layer_specs else None
        else:
            cache.check_disk()
            for sl in cache.slots.values():
                sl.create()
        materialize_layer = self._materialize if streaming else None
        if streaming:  # layer 0 runs once while each layer's arguments are recorded
            materialize_layer(0, adapter.layers[0])
        inputs = adapter.first_layer_inputs(self.batches, device, sink=_Discard() if job.resume else cache.slots["a"])
        if streaming:  # the embedding was only needed for these inputs; _write_rest copies it from the source
            _release_outside_layers(net, adapter)
        if owl is not None and layer_specs is None:
            owl_lambda, owl_m = owl
            extra = Slot(tmp / RESUME / "hidden-owl.bin", shapes, torch_dtype, False)
            extra.create()
            ratios = outlier_ratios(net, cache.slots["a"], inputs.layer_kwargs, device, m=owl_m,
                                    materialize_layer=materialize_layer,
                                    release_layer=(lambda i, l: release(l)) if streaming else None,
                                    scratch=(cache.slots["b"], extra))
            extra.path.unlink(missing_ok=True)
            layer_specs = owl_layer_specs(ratios, job.spec, owl_lambda)
        cfg.layer_specs = layer_specs
        if job.units is not None:
            from ..structured.neurons import prune_units_layer

            cfg.layer_fn = prune_units_layer
        self.done, self.layer_times, self.earlier, self.start_layer = done, layer_times, earlier, start_layer
        clock = [time.time()]

        def on_layer_done(i, layer, results, hidden, kw, out_slot):
            prefix = adapter.layer_prefix(i)
            self.writer.write(self.writer.layer_file(i), {prefix + k: v for k, v in layer.state_dict().items()})
            # the layer's wall time: pruning it, its outputs for the next one, and writing it (the copy to the CPU
            # also waits for a GPU's queued work)
            layer_times.append(round(time.time() - clock[0], 1))
            clock[0] = time.time()
            done.extend(results)
            # each part of a run that was killed and resumed leaves its time and peak memory up to its last
            # finished layer, so the final report covers the whole run, not only its last part
            part = {"from_layer": start_layer, "to_layer": i, "wall_time_s": round(time.time() - self.t_start, 1),
                    "cpu_time_s": round(time.process_time(), 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
            cache.write_journal({"fingerprint": self.fingerprint, "layer": i, "slot": out_slot,
                                 "results": [asdict(r) for r in done],
                                 "layer_specs": [str(x) for x in layer_specs] if layer_specs else None,
                                 "parts": earlier + [part], "layer_wall_time_s": layer_times})
            if streaming:
                release(layer)

        sequential_prune(net, batches=self.batches, cfg=cfg, device=device, on_layer_done=on_layer_done,
                         start_layer=start_layer, layer_kwargs=inputs.layer_kwargs, cache=cache, slot=slot,
                         materialize_layer=materialize_layer, progress=progress)

    def write(self, tmp: Path) -> dict:
        """The rest of the checkpoint (config with the new sizes after a shrink, tokenizer, embeddings), stored
        as asked; the report of the layers."""
        job, net = self.job, self.net
        self.input_config = net.config
        if job.units is not None:  # every layer now has the new sizes: the config says so
            from ..structured.neurons import new_config

            net.config = new_config(self.input_config, job.units)
        _write_rest(net, self.adapter, self.source, self.writer, tmp, self.tok, job.torch_dtype)
        shutil.rmtree(tmp / RESUME, ignore_errors=True)
        report = _report(self.done, self.protocol, net, self.adapter)
        report["storage"] = compress_checkpoint(tmp) if job.save_format == "compressed" else {"format": "dense"}
        report["activation_cache"] = self.cache.describe()
        report["manifest"] = _run_manifest(job.command, self.protocol, job.device, self.t_start,
                                           self.start_layer if job.resume else None, self.layer_times, self.earlier)
        return report

    def write_report(self, tmp: Path, report: dict) -> dict:
        """``prune_report.json`` (``shrink_report.json`` in the shrink's terms) and the manifest of hashes."""
        job = self.job
        if job.units is not None:
            from ..structured.neurons import units_report

            report = units_report(report, self.input_config, job.units, self.model_info)
        (tmp / (REPORT if job.units is None else "shrink_report.json")).write_text(
            json.dumps(report, indent=2, default=str) + "\n")
        write_manifest(tmp, {"tool": "prunetune", "command": job.command, "fingerprint": self.fingerprint,
                             "source_model": job.src.location()})
        return report


def _run_manifest(command, protocol, device, t_start, resumed_from, layer_times, earlier) -> dict:
    """What the run was (its protocol) and what it cost: per-layer times, the killed parts before a resume, wall
    time and peak memory up to now (the caller adds the evaluation's share at the very end)."""
    man = {"tool": "prunetune", "command": command, **protocol, "versions": versions(), "machine": machine(),
           "device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
           "resumed_from_layer": resumed_from, "layer_wall_time_s": layer_times}
    if earlier:  # the killed parts before this one, each up to its last finished layer
        man["earlier_parts"] = earlier
    man.update(wall_time_s=round(time.time() - t_start, 3), peak_rss_mb=round(peak_rss_mb(), 1))
    if str(device).startswith("cuda"):  # the allocator's peak since measure() reset it
        man["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return man


def _open_model(src, stream: bool | None, dtype: str, torch_dtype):
    """``(model, source, model info, streaming)``: a local safetensors checkpoint as a skeleton whose layers are
    read one at a time (``source``), anything else loaded whole (``source`` None)."""
    streaming = src.kind == "local" and any(f.endswith(".safetensors") for f in src.weight_files)
    if stream is not None:
        streaming = stream and streaming
    if streaming:
        verify_manifest(src.path)  # a prunetune output: every file must still match its recorded hash
        net, source = open_streaming(src.path, torch_dtype)
        renamed = [n for n, _ in net.named_parameters() if n not in source]
        if not renamed:
            model_info = src.describe()
            model_info.update(model_type=net.config.model_type, dtype=str(torch_dtype).replace("torch.", ""),
                              loading="streamed layer by layer")
            return net, source, model_info, True
        # transformers converts such checkpoints (e.g. per-expert MoE tensors) while loading
        log.info("'%s' stores '%s' under another name: loading the whole model", src.spec, renamed[0])
    net, _, model_info = load_model(src.spec, dtype=dtype, device="cpu", tokenizer=False)
    model_info["loading"] = "whole model in memory"
    return net, None, model_info, False


def _check_targets(net, adapter, spec, units) -> None:
    """Refuse, before any calibration, a unit plan the model cannot take or an N:M pattern a linear cannot."""
    if units is not None:
        from ..structured.neurons import check_plan, geometry

        geometry(net.config, adapter)
        check_plan(net.config, units)
        return
    if spec.kind == "nm":
        for i, layer in enumerate(adapter.layers):
            for name, lin in adapter.linears(layer).items():
                spec.check_fits(lin.in_features, f"{adapter.layer_prefix(i)}{name}")


def _load_outside_layers(net, adapter, source, device, dtype) -> None:
    """Load the weights outside the decoder layers that computing the first layer's inputs needs.

    An untied LM head is only checked for NaN/Inf (read, checked, dropped): pruning never runs it, and
    keeping it would hold vocab x hidden weights (262 MB for a 7B model in bf16) for the whole run."""
    from accelerate.utils import set_module_tensor_to_device

    tied = bool(getattr(net.config, "tie_word_embeddings", False))
    head = adapter.lm_head_path + ".weight"
    for name, p in net.named_parameters():
        if name.startswith(adapter.layers_path + ".") or p.device.type != "meta" or name not in source:
            continue
        t = source.get(name)
        if name == head and not tied:
            if not all_finite(t, dtype):  # as the loaded weights would be, e.g. after a cast to float16
                raise PrunetuneError(f"weights of '{name}' contain NaN/Inf")
            del t
            continue
        set_module_tensor_to_device(net, name, device, value=t, dtype=dtype)
    if tied:
        net.tie_weights()


def _release_outside_layers(net, adapter) -> None:
    """Drop the weights outside the decoder layers (back to meta) once the first layer's inputs exist."""
    from accelerate.utils import set_module_tensor_to_device

    for name, p in list(net.named_parameters(remove_duplicate=False)):  # a tied head holds the embedding too
        if not name.startswith(adapter.layers_path + ".") and p.device.type != "meta":
            set_module_tensor_to_device(net, name, "meta")


class _Discard:
    """A sink for the first layer's inputs when they are not needed (a resumed run reads its cache)."""

    def write(self, i, t):
        pass


def _semantics(spec) -> str:
    if spec.kind == "nm":
        return f"{spec.n}:{spec.m} keeps {spec.n} of every {spec.m} consecutive input weights ({spec.sparsity:.0%} zeros)"
    return f"{spec.sparsity:.0%} of the weights of every pruned matrix are zero"


def _write_rest(net, adapter, source, writer: ShardWriter, tmp: Path, tok, dtype) -> None:
    """Everything that is not a decoder layer (embeddings, final norm, untied LM head), config, tokenizer."""
    prefix = adapter.layers_path + "."
    tied = bool(getattr(net.config, "tie_word_embeddings", False))
    rest = {}
    names = source.names() if source is not None else list(net.state_dict().keys())
    sd = None if source is not None else net.state_dict()
    for name in names:
        if name.startswith(prefix):
            continue
        if tied and name == adapter.lm_head_path + ".weight":
            continue
        rest[name] = source.get(name).to(dtype) if source is not None else sd[name]
    writer.write("model-rest.safetensors", rest)
    writer.finish()
    net.config.dtype = str(dtype).replace("torch.", "")
    net.config.save_pretrained(tmp)
    if getattr(net, "generation_config", None) is not None:
        try:
            net.generation_config.save_pretrained(tmp)
        except (ValueError, OSError):
            pass
    tok.save_pretrained(tmp)


def _report(done: list[LayerResult], protocol: dict, net, adapter) -> dict:
    layers = [asdict(r) for r in done]
    pruned = sum(r.shape[0] * r.shape[1] for r in done)
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in done)
    return {
        "layers": layers,
        "total": {
            "pruned_matrices": len(done), "pruned_params": pruned,
            "sparsity_of_pruned_matrices": zeros / pruned if pruned else 0.0,
            "mean_rel_error": sum(r.rel_error for r in done) / len(done) if done else 0.0,
            "error_basis": sorted({r.error_basis for r in done}),
        },
    }


def _eval_pair(model_spec, pruned_dir, corpora, seqlen, max_windows, dtype, device) -> dict:
    """Perplexity before (input model) and after (the pruned checkpoint just written)."""
    res = {}
    for tag, spec in (("before", model_spec), ("after", str(pruned_dir))):
        m, tok, _ = load_model(spec, dtype=dtype, device=device)
        res[tag] = {c: perplexity(m, tok, c, seqlen=seqlen, max_windows=max_windows) for c in corpora}
        del m
    return res


def summary_table(report: dict) -> str:
    man = report["manifest"]
    lines = [f"method {man['method']}  sparsity {man['sparsity']} ({man['sparsity_semantics']})",
             f"pruned matrices: {report['total']['pruned_matrices']}, measured sparsity "
             f"{report['total']['sparsity_of_pruned_matrices']:.4f}, mean relative layer error "
             f"{report['total']['mean_rel_error']:.4f}, wall {man.get('wall_time_s', 0):.1f}s, peak RSS {man.get('peak_rss_mb', 0):.0f} MB"]
    return "\n".join(lines + before_after_lines(report.get("eval")))
