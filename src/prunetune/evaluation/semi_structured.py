"""2:4 semi-structured sparse kernels (``torch.sparse.to_sparse_semi_structured``, CUDA only): a model's valid 2:4
linears converted, and each distinct linear shape timed dense against sparse (``bench --sparse-2to4``)."""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from ..errors import PrunetuneError
from .timing import decoder_linears, is_2to4, stats

_MICRO_ITERS = 20


def check_sparse_support(device: str, dtype: torch.dtype) -> None:
    if not device.startswith("cuda"):
        raise PrunetuneError("semi-structured sparse kernels need a CUDA GPU (--sparse-2to4 cannot run on the CPU)")
    if dtype not in (torch.float16, torch.bfloat16):
        raise PrunetuneError("semi-structured sparse kernels need --dtype float16 or bfloat16 "
                             f"(got {str(dtype).replace('torch.', '')})")
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major < 8:
        raise PrunetuneError(f"semi-structured sparse kernels need an Ampere or newer GPU (compute capability 8.0+, "
                             f"this one is {major}.{minor})")


def to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight.detach().contiguous())


def sparse_copy(model) -> tuple[torch.nn.Module, list[str], dict[str, str]]:
    """A copy of ``model`` whose valid 2:4 linears hold semi-structured sparse weights."""
    sm = copy.deepcopy(model)
    converted, skipped = [], {}
    for name, lin in decoder_linears(sm):
        if not is_2to4(lin.weight):
            skipped[name] = "not 2:4"
            continue
        try:
            lin.weight = torch.nn.Parameter(to_semi_structured(lin.weight), requires_grad=False)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            skipped[name] = (str(e).strip().splitlines() or [type(e).__name__])[0]
            continue
        converted.append(name)
    return sm, converted, skipped


def time_linear(x, w, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(_MICRO_ITERS):
        F.linear(x, w)
    sync()
    return (time.perf_counter() - t0) / _MICRO_ITERS


def micro_bench(model, converted: list[str], token_counts: list[int], repeats: int, warmup: int, device: str,
                 sync) -> list[dict]:
    """Each distinct shape of the converted linears: dense F.linear vs semi-structured, interleaved."""
    mods = dict(model.named_modules())
    shapes: dict[tuple, torch.Tensor] = {}
    for name in converted:
        w = mods[name].weight
        shapes.setdefault(tuple(w.shape), w.detach())
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        for shape, w in shapes.items():
            try:
                ws = to_semi_structured(w)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                rows.append({"shape": list(shape), "error": str(e).strip().splitlines()[0]})
                continue
            for tokens in token_counts:
                x = torch.randn(tokens, shape[1], dtype=w.dtype, device=device, generator=g)
                try:
                    ref, got = F.linear(x, w), F.linear(x, ws)
                    err = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6))
                    dense_t, sparse_t = [], []
                    for r in range(warmup + repeats):
                        td, tsp = time_linear(x, w, sync), time_linear(x, ws, sync)
                        if r >= warmup:
                            dense_t.append(td)
                            sparse_t.append(tsp)
                except RuntimeError as e:
                    rows.append({"shape": list(shape), "tokens": tokens, "error": str(e).strip().splitlines()[0]})
                    continue
                dmed, smed = statistics.median(dense_t), statistics.median(sparse_t)
                rows.append({"shape": list(shape), "tokens": tokens, "dense_ms": stats([t * 1e3 for t in dense_t]),
                             "sparse_ms": stats([t * 1e3 for t in sparse_t]), "speedup": dmed / smed,
                             "verdict": "faster" if dmed > smed else "slower", "max_rel_diff": err})
    return rows
