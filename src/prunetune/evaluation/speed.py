"""Speed and memory of one or more models, measured side by side with a stated protocol.

Every model is loaded first; then each repetition runs every cell (prefill at each batch size and sequence
length, decode at batch 1 and the largest batch) for every model in turn, so slow drift of the machine (heat,
other processes) hits all models alike. Warm-up repetitions are run the same way and discarded. Reported per
cell: median, min and max over the repetitions, and the ratio of each model's median to the first model's.

Prefill: one forward pass over ``batch x seq_len`` random token ids (seed 0), ``use_cache=False``, logits of
the last position only (``logits_to_keep=1``) where the model supports it. Decode: greedy ``generate()`` with
the KV cache, a prompt of ``min(seq_lens)`` random tokens and exactly ``decode_tokens`` new tokens (EOS is
suppressed); decode tokens/s = ``batch x (decode_tokens - 1) / t``, with ``t`` the time from the logits of
the first new token (the end of the prompt's prefill) to the end of generation.

Memory: on CUDA, the bytes the allocator holds for the model's weights plus the peak extra allocation during
its runs. On CPU, the peak resident memory (VmHWM) of a fresh process that loads the model and runs its
largest prefill cell and the largest-batch decode, minus that process's resident memory before loading.

With ``sparse_2to4=True`` on a CUDA GPU (fp16/bf16), each model whose linears follow a 2:4 pattern is also run
with those linears converted by ``torch.sparse.to_sparse_semi_structured`` and compared with the same model
dense, per linear shape (micro-benchmark) and end to end. Ratios below 1 (sparse slower) are reported as such.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import PrunetuneError
from ..io import check_output_file, load_model, parse_dtype, resolve_model
from ..manifest import machine, measure, versions, write_json_atomic
from . import semi_structured
from .timing import (allocated, decode_once, forward_kwargs, linear_sparsity, memory_probe, prefill_once,
                     run_memory_probe, stats, syncer, unique_tensor_bytes)
from .perplexity import max_positions

log = logging.getLogger("prunetune")

SPARSE_LABEL = "2:4 sparse kernels"

PROTOCOL_TEXT = {
    "prefill": "one forward pass over batch x seq_len random token ids (seed 0), use_cache=False, under "
               "torch.inference_mode; logits of the last position only (logits_to_keep=1) where supported; "
               "latency is wall time including device synchronisation",
    "decode": "greedy generate() with KV cache; prompt of prompt_len random tokens; exactly new_tokens new "
              "tokens (EOS suppressed); decode tokens/s = batch x (new_tokens - 1) / time from the first new "
              "token's logits to the end of generation; ttft_s = prompt prefill time",
    "order": "all models loaded first; for each repetition, for each cell, every model in turn (interleaved)",
    "statistics": "median, min, max over the repetitions; warm-up repetitions run the same way and discarded",
    "ratios": "ratio_to_first = this model's median / the first model's median (tokens/s > 1: faster; "
              "latency < 1: faster)",
}
MEMORY_TEXT = {
    "cuda": "CUDA allocator: bytes allocated by loading the model (weights_mb) + the peak extra allocation "
            "during its runs (peak_run_extra_mb); peak_mb is their sum",
    "cpu": "peak resident memory (VmHWM) of a fresh process that loads the model and runs its largest prefill "
           "cell and the largest-batch decode, minus the resident memory of that process after importing torch "
           "and transformers (before loading); weights_mb = parameter + buffer bytes",
}


# --- small helpers -------------------------------------------------------------------------------
def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrunetuneError(f"device '{device}' is not available on this machine (no CUDA GPU)")
        idx = device.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            raise PrunetuneError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA GPU(s) here)")
        return device
    if device != "cpu":
        raise PrunetuneError(f"unknown device '{device}' (use cpu, cuda or cuda:N)")
    return device


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()




def _check_ints(name: str, values, minimum: int) -> tuple[int, ...]:
    if isinstance(values, int):
        values = (values,)
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise PrunetuneError(f"{name} must be integers (got {values!r})") from None
    if not out:
        raise PrunetuneError(f"{name} must not be empty")
    bad = [v for v in out if v < minimum]
    if bad:
        raise PrunetuneError(f"{name} must be at least {minimum} (got {bad[0]})")
    return out


# --- the benchmark ------------------------------------------------------------------------------
def _labels(models: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for m in models:
        seen[m] = seen.get(m, 0) + 1
        out.append(m if seen[m] == 1 else f"{m} #{seen[m]}")
    return out


def _oom_error(label: str, what: str) -> PrunetuneError:
    return PrunetuneError(f"out of GPU memory running '{label}' ({what}); use smaller --batch-sizes / --seq-lens")


def bench(models: list[str], *, batch_sizes=(1, 8, 32), seq_lens=(128,), decode_tokens: int = 32, repeats: int = 5,
          warmup: int = 1, dtype: str = "float32", device: str | None = None, sparse_2to4: bool = False,
          out: str | Path | None = None, threads: int | None = None, progress: bool = True,
          memory_probe: bool = True) -> dict:
    """Prefill and decode speed, memory, size and sparsity of ``models``, measured interleaved.

    Returns one result dict with its manifest (``manifest.command == "bench"``); written atomically to ``out``
    when given. ``threads`` sets torch's CPU threads for the run (default: as is; on a shared machine fewer
    threads than cores avoids oversubscription). ``memory_probe=False`` skips the per-model subprocess on CPU (memory is then only the weight
    bytes). See the module docstring for the protocol."""
    if isinstance(models, (str, os.PathLike)):
        models = [str(models)]
    models = [str(m) for m in models]
    if not models:
        raise PrunetuneError("give at least one model to benchmark")
    batch_sizes = _check_ints("batch sizes", batch_sizes, 1)
    seq_lens = _check_ints("sequence lengths", seq_lens, 1)
    decode_tokens = _check_ints("decode tokens", decode_tokens, 2)[0]
    repeats = _check_ints("repeats", repeats, 1)[0]
    warmup = _check_ints("warm-up", warmup, 0)[0]
    device = _resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    if sparse_2to4:
        semi_structured.check_sparse_support(device, torch_dtype)
    if threads is not None:
        threads = _check_ints("threads", threads, 1)[0]
    for m in models:
        resolve_model(m)  # clear errors for bad paths before anything is loaded
    if out is not None:
        check_output_file(out)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(models, batch_sizes, seq_lens, decode_tokens, repeats, warmup, dtype, torch_dtype, device,
                      sparse_2to4, out, progress, memory_probe)
    finally:
        torch.set_num_threads(old_threads)


@dataclass
class _Run:
    """What one ``bench`` call measures, resolved once and read by every step."""

    batch_sizes: tuple
    seq_lens: tuple
    decode_tokens: int
    repeats: int
    warmup: int
    dtype: str
    torch_dtype: torch.dtype
    device: str
    sparse_2to4: bool
    progress: bool
    memory_probe: bool

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def prompt_len(self) -> int:
        return min(self.seq_lens)

    @property
    def decode_batches(self) -> list[int]:
        return sorted({1, max(self.batch_sizes)})


def _bench(models, batch_sizes, seq_lens, decode_tokens, repeats, warmup, dtype, torch_dtype, device, sparse_2to4,
           out, progress, memory_probe) -> dict:
    run = _Run(batch_sizes, seq_lens, decode_tokens, repeats, warmup, dtype, torch_dtype, device, sparse_2to4,
               progress, memory_probe)
    sync = syncer(device)
    t_start = time.time()
    with measure() as meas:
        entries = [_load_entry(label, spec, run) for label, spec in zip(_labels(models), models)]
        sparse_info = _add_sparse_variants(entries, run) if sparse_2to4 else {}
        cells, inputs, vocab = _cells(entries, run)
        times, ttft, peak_extra, failed = _time_cells(entries, cells, inputs, run, sync)
        memory = _memory(entries, peak_extra, vocab, run)
    prefill_rows, decode_rows = _speed_rows(entries, cells, times, ttft, run)
    result = {"models": _model_rows(entries, memory, failed), "prefill": prefill_rows, "decode": decode_rows}
    if sparse_2to4:
        result["sparse_2to4"] = _sparse_summary(entries, sparse_info, failed, times, cells, decode_tokens,
                                                batch_sizes, seq_lens, repeats, warmup, device, sync)
    result["manifest"] = _manifest(entries, run, t_start, meas)
    if out is not None:
        write_json_atomic(out, result)
    return result


def _load_entry(label: str, spec: str, run: _Run) -> dict:
    """Load one model and record what does not need timing (size, parameters, sparsity, weight bytes)."""
    before = allocated(run.device)
    try:
        model, _, info = load_model(spec, dtype=run.dtype, device=run.device, tokenizer=False)
    except torch.cuda.OutOfMemoryError:
        raise PrunetuneError(f"model '{spec}' does not fit in the memory of {run.device}") from None
    except RuntimeError as e:
        raise PrunetuneError(f"model '{spec}' cannot run on {run.device}: {str(e).strip().splitlines()[0]}") from None
    src = resolve_model(spec)
    limit = max_positions(model.config)
    if limit is not None and (max(run.seq_lens) > limit or run.prompt_len + run.decode_tokens > limit):
        raise PrunetuneError(f"model '{spec}' allows {limit} positions; sequence length {max(run.seq_lens)} "
                             f"(or prompt {run.prompt_len} + {run.decode_tokens} new tokens) is too long")
    kwargs, logits_note = forward_kwargs(model)
    entry = {
        "label": label, "spec": spec, "model": model, "kwargs": kwargs, "variant": "dense", "base": label,
        "info": info, "logits": logits_note,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_on_disk_bytes": sum(os.path.getsize(f) for f in src.weight_files) if src.weight_files else None,
        "sparsity": linear_sparsity(model),
        "weights_mb": unique_tensor_bytes(model) / 2**20,
        "vocab": int(model.get_input_embeddings().weight.shape[0]),
    }
    if run.cuda:
        entry["weights_mb"] = (allocated(run.device) - before) / 2**20
    return entry


def _add_sparse_variants(entries: list[dict], run: _Run) -> dict:
    """A copy of every 2:4 model with its 2:4 linears on the semi-structured sparse kernels, as its own entry."""
    sparse_info: dict = {}
    for e in list(entries):
        sp = e["sparsity"]
        if sp["linears_2to4"] == 0:
            sparse_info[e["label"]] = {"converted": 0, "note": "no linear follows a 2:4 pattern"}
            continue
        before = allocated(run.device)
        try:
            sm, converted, skipped = semi_structured.sparse_copy(e["model"])
        except torch.cuda.OutOfMemoryError:
            sparse_info[e["label"]] = {"converted": 0, "error": "out of GPU memory copying the model"}
            continue
        sparse_weights_mb = (allocated(run.device) - before) / 2**20 if run.cuda else unique_tensor_bytes(sm) / 2**20
        sparse_info[e["label"]] = {"converted": len(converted), "not_converted": skipped}
        if not converted:
            continue
        entries.append({**e, "label": f"{e['label']} [{SPARSE_LABEL}]", "model": sm, "variant": SPARSE_LABEL,
                        "base": e["label"], "converted": converted, "weights_mb": sparse_weights_mb})
    return sparse_info


def _cells(entries: list[dict], run: _Run) -> tuple[list, dict, int]:
    """The (kind, batch, length) cells and their token ids (seeded; the same for every model)."""
    vocab = min(e["vocab"] for e in entries)
    gen = torch.Generator().manual_seed(0)
    inputs, cells = {}, []
    for sl in run.seq_lens:
        for bs in run.batch_sizes:
            cells.append(("prefill", bs, sl))
            inputs[("prefill", bs, sl)] = torch.randint(3, vocab, (bs, sl), generator=gen).to(run.device)
    for bs in run.decode_batches:
        cells.append(("decode", bs, run.prompt_len))
        inputs[("decode", bs, run.prompt_len)] = torch.randint(3, vocab, (bs, run.prompt_len), generator=gen).to(run.device)
    return cells, inputs, vocab


def _time_cells(entries, cells, inputs, run: _Run, sync):
    """Every cell for every model, interleaved (repeat, then cell, then model), after the warm-up rounds."""
    device = run.device
    times: dict[tuple, list] = {(e["label"], c): [] for e in entries for c in cells}
    ttft: dict[tuple, list] = {(e["label"], c): [] for e in entries for c in cells if c[0] == "decode"}
    peak_extra = {e["label"]: 0.0 for e in entries}
    failed: dict[str, str] = {}
    bar = tqdm(total=(run.warmup + run.repeats) * len(cells) * len(entries), desc="bench", unit="run",
               disable=not run.progress, leave=False)
    for rep in range(run.warmup + run.repeats):
        for cell in cells:
            for e in entries:
                bar.update(1)
                if e["label"] in failed:
                    continue
                kind, bs, sl = cell
                if run.cuda:
                    torch.cuda.synchronize(torch.device(device))
                    torch.cuda.reset_peak_memory_stats(torch.device(device))
                    base = torch.cuda.memory_allocated(torch.device(device))
                try:
                    if kind == "prefill":
                        t = prefill_once(e["model"], inputs[cell], e["kwargs"], sync)
                    else:
                        t, t_first = decode_once(e["model"], inputs[cell], run.decode_tokens, sync)
                except torch.cuda.OutOfMemoryError:
                    if e["variant"] == "dense":
                        raise _oom_error(e["label"], f"{kind}, batch {bs} x {sl} tokens") from None
                    failed[e["label"]] = "out of GPU memory"
                    continue
                except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                    if e["variant"] == "dense":
                        raise
                    failed[e["label"]] = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    continue
                if run.cuda:
                    peak_extra[e["label"]] = max(peak_extra[e["label"]],
                                                 (torch.cuda.max_memory_allocated(torch.device(device)) - base) / 2**20)
                if rep >= run.warmup:
                    times[(e["label"], cell)].append(t)
                    if kind == "decode":
                        ttft[(e["label"], cell)].append(t_first)
                bar.set_postfix(model=e["label"][-24:], cell=f"{kind} {bs}x{sl}")
    bar.close()
    return times, ttft, peak_extra, failed


def _memory(entries, peak_extra, vocab: int, run: _Run) -> dict:
    """Peak memory per model: the allocator's on a GPU, a fresh probe process's on a CPU (or weights only)."""
    memory = {}
    for e in entries:
        if run.cuda:
            memory[e["label"]] = {"weights_mb": round(e["weights_mb"], 1),
                                  "peak_run_extra_mb": round(peak_extra[e["label"]], 1),
                                  "peak_mb": round(e["weights_mb"] + peak_extra[e["label"]], 1)}
        elif run.memory_probe and e["variant"] == "dense":
            probe = run_memory_probe({"spec": e["spec"], "dtype": run.dtype, "threads": torch.get_num_threads(),
                                       "batch_size": max(run.batch_sizes), "seq_len": max(run.seq_lens),
                                       "vocab": vocab, "decode_batch": max(run.decode_batches),
                                       "prompt_len": run.prompt_len, "decode_tokens": run.decode_tokens})
            memory[e["label"]] = {"weights_mb": round(e["weights_mb"], 1), **probe}
        else:
            memory[e["label"]] = {"weights_mb": round(e["weights_mb"], 1), "peak_mb": None,
                                  "note": "no memory probe run (weights only)"}
    return memory


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _speed_rows(entries, cells, times, ttft, run: _Run) -> tuple[list, list]:
    """Prefill and decode rows (median and range over the repeats), each with its ratio to the first model."""
    first = entries[0]["label"]
    decode_tokens = run.decode_tokens
    prefill_rows, decode_rows = [], []
    for cell in cells:
        kind, bs, sl = cell
        base_times = times[(first, cell)]
        for e in entries:
            ts = times[(e["label"], cell)]
            if not ts:
                continue
            if kind == "prefill":
                tps = [bs * sl / t for t in ts]
                row = {"model": e["label"], "batch_size": bs, "seq_len": sl, "latency_s": stats(ts),
                       "tokens_per_s": stats(tps)}
                rows = prefill_rows
            else:
                tps = [bs * (decode_tokens - 1) / t for t in ts]
                row = {"model": e["label"], "batch_size": bs, "prompt_len": sl, "new_tokens": decode_tokens,
                       "decode_s": stats(ts), "tokens_per_s": stats(tps),
                       "ms_per_token": statistics.median(ts) / (decode_tokens - 1) * 1e3,
                       "ttft_s": stats(ttft[(e["label"], cell)])}
                rows = decode_rows
            if base_times:
                bt = statistics.median(base_times)
                btps = statistics.median([bs * (sl if kind == "prefill" else decode_tokens - 1) / t for t in base_times])
                row["ratio_to_first"] = {"tokens_per_s": statistics.median(tps) / btps,
                                         "latency_s": statistics.median(ts) / bt}
            else:
                row["ratio_to_first"] = None
            rows.append(row)
    return prefill_rows, decode_rows


def _model_rows(entries, memory, failed) -> list[dict]:
    first_e, first = entries[0], entries[0]["label"]
    rows = []
    for e in entries:
        sp = e["sparsity"]
        mem = memory[e["label"]]
        rows.append({
            "model": e["label"], "spec": e["spec"], "variant": e["variant"], "parameters": e["parameters"],
            "size_on_disk_bytes": e["size_on_disk_bytes"], "linear_sparsity": sp["sparsity"],
            "linears": sp["linears"], "linears_2to4": sp["linears_2to4"], "logits": e["logits"], "memory": mem,
            "failed": failed.get(e["label"]),
            "ratio_to_first": {
                "parameters": _ratio(e["parameters"], first_e["parameters"]),
                "size_on_disk": _ratio(e["size_on_disk_bytes"], first_e["size_on_disk_bytes"]),
                "peak_mb": _ratio(mem.get("peak_mb"), memory[first].get("peak_mb")),
            },
        })
    return rows


def _manifest(entries, run: _Run, t_start: float, meas) -> dict:
    man = {
        "tool": "prunetune", "command": "bench",
        "models": [{"label": e["label"], **e["info"]} for e in entries if e["variant"] == "dense"],
        "device": run.device, "device_name": _device_name(run.device), "torch_threads": torch.get_num_threads(),
        "protocol": {"batch_sizes": list(run.batch_sizes), "seq_lens": list(run.seq_lens),
                     "decode_tokens": run.decode_tokens, "decode_batch_sizes": run.decode_batches,
                     "prompt_len": run.prompt_len, "repeats": run.repeats, "warmup": run.warmup,
                     "dtype": str(run.torch_dtype).replace("torch.", ""), "sparse_2to4": run.sparse_2to4,
                     "memory": MEMORY_TEXT["cuda" if run.cuda else "cpu"] if (run.cuda or run.memory_probe) else
                     "weights only (memory probe disabled)", **PROTOCOL_TEXT},
        "versions": versions(), "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)),
        **meas.as_dict(),
    }
    if run.cuda:
        man["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return man


def _sparse_summary(entries, sparse_info, failed, times, cells, decode_tokens, batch_sizes, seq_lens, repeats,
                    warmup, device, sync) -> dict:
    """Per-linear and end-to-end ratios of each 2:4 model with semi-structured kernels vs itself dense."""
    by_label = {e["label"]: e for e in entries}
    out = {"kernel": "torch.sparse.to_sparse_semi_structured",
           "backend": "cuSPARSELt" if getattr(torch.backends, "cusparselt", None) is not None
           and torch.backends.cusparselt.is_available() else "CUTLASS",
           "speedup": "dense median time / sparse median time (> 1: the sparse kernels are faster, < 1: slower)",
           "models": {}}
    for e in entries:
        if e["variant"] != SPARSE_LABEL:
            continue
        dense = by_label[e["base"]]
        rec = dict(sparse_info.get(e["base"], {}))
        if e["label"] in failed:
            rec["end_to_end_error"] = failed[e["label"]]
        e2e = []
        for cell in cells:
            kind, bs, sl = cell
            td, tsp = times[(dense["label"], cell)], times[(e["label"], cell)]
            if not td or not tsp:
                continue
            sp = statistics.median(td) / statistics.median(tsp)
            e2e.append({"kind": kind, "batch_size": bs, "seq_len": sl, "dense_s": statistics.median(td),
                        "sparse_s": statistics.median(tsp), "speedup": sp, "verdict": "faster" if sp > 1 else "slower"})
        rec["end_to_end"] = e2e
        tokens = sorted({max(batch_sizes) * max(seq_lens), max(batch_sizes)}, reverse=True)
        rec["per_linear"] = semi_structured.micro_bench(dense["model"], e["converted"], tokens, repeats, max(warmup, 1), device, sync)
        out["models"][e["base"]] = rec
    for label, info in sparse_info.items():
        out["models"].setdefault(label, info)
    return out


def _span(st: dict) -> str:
    return f"{st['median']:.1f} [{st['min']:.1f}-{st['max']:.1f}]"


def summary_table(result: dict) -> str:
    """A plain-text summary of a bench result (what the CLI prints)."""
    man = result["manifest"]
    prot = man["protocol"]
    lines = [f"{man['device_name']} ({man['device']}), {man['torch_threads']} threads, {prot['dtype']}, "
             f"{prot['repeats']} repeats after {prot['warmup']} warm-up, interleaved; median [min-max], x first model"]
    labels = [m["model"] for m in result["models"]]
    short = {l: Path(l.split(" [")[0]).name + (" [" + l.split(" [", 1)[1] if " [" in l else "") for l in labels}
    if len(set(short.values())) != len(set(labels)):
        short = {l: l for l in labels}
    lines.append(f"{'model':<40}{'params':>13}{'disk MiB':>10}{'sparsity':>10}{'peak MiB':>10}")
    for m in result["models"]:
        size = m["size_on_disk_bytes"]
        peak = (m.get("memory") or {}).get("peak_mb")
        lines.append(f"{short[m['model']][-40:]:<40}{m['parameters']:>13,}{size / 2**20 if size else float('nan'):>10.1f}"
                     f"{m['linear_sparsity']:>10.4f}{peak if peak is not None else float('nan'):>10.1f}")
    lines.append(f"{'prefill':<40}{'batch':>6}{'seq':>6}{'ms':>10}{'tokens/s':>26}{'x first':>9}")
    for r in result["prefill"]:
        st = r["tokens_per_s"]
        ratio = (r.get("ratio_to_first") or {}).get("tokens_per_s")
        lines.append(f"{short.get(r['model'], r['model'])[-40:]:<40}{r['batch_size']:>6}{r['seq_len']:>6}{r['latency_s']['median'] * 1e3:>10.2f}"
                     f"{_span(st):>26}"
                     f"{ratio if ratio is not None else float('nan'):>9.3f}")
    lines.append(f"{'decode':<40}{'batch':>6}{'new':>6}{'ms/tok':>10}{'tokens/s':>26}{'x first':>9}")
    for r in result["decode"]:
        st = r["tokens_per_s"]
        ratio = (r.get("ratio_to_first") or {}).get("tokens_per_s")
        lines.append(f"{short.get(r['model'], r['model'])[-40:]:<40}{r['batch_size']:>6}{r['new_tokens']:>6}{r['ms_per_token']:>10.2f}"
                     f"{_span(st):>26}"
                     f"{ratio if ratio is not None else float('nan'):>9.3f}")
    for label, rec in (result.get("sparse_2to4") or {}).get("models", {}).items():
        for x in rec.get("end_to_end", []):
            lines.append(f"2:4 kernels {label[-30:]} {x['kind']} batch {x['batch_size']}: x{x['speedup']:.3f} "
                         f"({x['verdict']} than dense)")
        if rec.get("note") or rec.get("error") or rec.get("end_to_end_error"):
            lines.append(f"2:4 kernels {label[-30:]}: {rec.get('note') or rec.get('error') or rec.get('end_to_end_error')}")
    return "\n".join(lines)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="internal: memory probe of one model in a fresh process")
    ap.add_argument("--memory-probe", required=True, help="JSON settings")
    a = ap.parse_args(argv)
    res = memory_probe(json.loads(a.memory_probe))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
