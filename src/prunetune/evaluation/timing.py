"""What ``bench`` measures with, one model at a time: the timed prefill and decode, the fresh-process memory
probe, and the size and sparsity facts of a loaded model (``speed.py`` runs them side by side)."""

from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ..io import load_model, resolve_model
from ..manifest import _status_mb, peak_rss_mb, reset_peak_rss


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


def decoder_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """Every nn.Linear except the output embedding (LM head), which pruning leaves dense."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def is_2to4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input weights (the layout the kernels use)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool(groups.max() <= 2)


def linear_sparsity(model) -> dict:
    lins = decoder_linears(model)
    total = sum(m.weight.numel() for _, m in lins)
    zeros = sum(int((m.weight.detach() == 0).sum()) for _, m in lins)
    n24 = sum(is_2to4(m.weight) for _, m in lins)
    return {"linears": len(lins), "params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0,
            "linears_2to4": n24}


def unique_tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel()) if t.layout == torch.strided else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def rss_mb() -> float:
    rss = _status_mb("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss / 2**20




# --- the timed operations ------------------------------------------------------------------------
def allocated(device: str) -> int:
    """Bytes held by the CUDA allocator on ``device`` (0 elsewhere)."""
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize(torch.device(device))
    return torch.cuda.memory_allocated(torch.device(device))


def syncer(device: str):
    if device.startswith("cuda"):
        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def forward_kwargs(model) -> tuple[dict, str]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}, "last position only (logits_to_keep=1)"
    return {}, "all positions (the model has no logits_to_keep)"


def prefill_once(model, ids: torch.Tensor, kwargs: dict, sync) -> float:
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, **kwargs)
        sync()
        return time.perf_counter() - t0


def decode_once(model, ids: torch.Tensor, new_tokens: int, sync) -> tuple[float, float]:
    """Greedy generation of exactly ``new_tokens``; returns (decode seconds after the first token, ttft seconds)."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class _Clock(LogitsProcessor):
        first = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                sync()
                self.first = time.perf_counter()
            return scores

    clock = _Clock()
    cfg = model.config
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(cfg, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = list(eos)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    gcfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                            use_cache=True, eos_token_id=eos, pad_token_id=pad)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gcfg,
                             logits_processor=LogitsProcessorList([clock]))
        sync()
        t1 = time.perf_counter()
    produced = out.shape[1] - ids.shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate() produced {produced} tokens instead of {new_tokens}")
    return t1 - clock.first, clock.first - t0


# --- memory on CPU: a fresh process per model ---------------------------------------------------
def import_model_code(spec: str) -> None:
    """Import the modelling code of ``spec`` (building it on the meta device) without loading weights."""
    import transformers  # noqa: F401

    src = resolve_model(spec)
    if src.kind != "local":
        return
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(src.path)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001  best effort: the real load below reports real problems
        pass


def memory_probe(cfg: dict) -> dict:
    """Run inside a fresh process: RSS before loading, after loading, and the peak over the largest cells."""
    torch.set_num_threads(int(cfg["threads"]))
    import_model_code(cfg["spec"])  # library code is not the model's memory: import it before the baseline
    base = rss_mb()
    hwm_reset = reset_peak_rss()
    model, _, _ = load_model(cfg["spec"], dtype=cfg["dtype"], device="cpu", tokenizer=False)
    kwargs, _ = forward_kwargs(model)
    g = torch.Generator().manual_seed(0)
    vocab = int(cfg["vocab"])
    ids = torch.randint(3, vocab, (cfg["batch_size"], cfg["seq_len"]), generator=g)
    prefill_once(model, ids, kwargs, lambda: None)
    ids = torch.randint(3, vocab, (cfg["decode_batch"], cfg["prompt_len"]), generator=g)
    decode_once(model, ids, cfg["decode_tokens"], lambda: None)
    peak = peak_rss_mb()
    return {"baseline_rss_mb": round(base, 1), "peak_mb": round(peak - base, 1), "peak_source": "VmHWM after reset" if hwm_reset else "ru_maxrss"}


def run_memory_probe(cfg: dict, timeout: float = 1800) -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        proc = subprocess.run([sys.executable, "-m", "prunetune.evaluation.speed", "--memory-probe", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout:.0f}s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory probe failed: {tail}"}
    return json.loads(lines[-1])
