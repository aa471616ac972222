"""Sparse checkpoints stored compressed: compressed-tensors' ``sparse-bitmask`` layout.

A matrix ``W`` (rows x cols) with many zeros is stored as four tensors under its module's name (``W``'s
name without ``.weight``): ``compressed`` (the non-zero values in row-major order, ``W``'s dtype), ``bitmask``
(uint8, rows x ceil(cols / 8), bit ``j % 8`` of byte ``j // 8`` set where ``W[r, j] != 0``), ``row_offsets``
(int64, where each row's values start in ``compressed``) and ``shape`` (int64). ``config.json`` gets the
``quantization_config`` block (``quant_method: compressed-tensors`` with a ``sparsity_config`` of format
``sparse-bitmask``). This is, byte for byte, what compressed-tensors up to 0.14 (and llm-compressor on top of
it) wrote, checked by ``benchmarks/sparse_storage.py`` against that code.

Why prunetune reads these files itself: compressed-tensors 0.15+ dropped its sparse compressors, transformers
5 reads no ``sparsity_config`` and vLLM 0.32 refuses any checkpoint that has one ("Sparsity support has been
removed from compressed-tensors"). So a compressed checkpoint is for storage and transfer: every prunetune
command accepts it (it is decompressed tensor by tensor into a temporary dense copy, `dense_view`), and
``prunetune convert --save-format dense`` writes the plain checkpoint serving engines load.

Sizes: a matrix at sparsity s costs (1 - s) of its values, 1 bit per weight and 8 bytes per row: on SmolLM2's
matrices 0.534x their dense bytes at 50% (or 2:4) in float32 and 0.568x in bfloat16 (BENCHMARKS §10); a matrix
is stored compressed only where that is smaller.
A ``-0.0`` is read back as ``+0.0`` (the same number); every other bit is kept.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import PrunetuneError, writing

FORMAT = "sparse-bitmask"
PARAMS = ("shape", "compressed", "bitmask", "row_offsets")
INDEX = "model.safetensors.index.json"
SAVE_FORMATS = ("dense", "compressed")


# --- one matrix --------------------------------------------------------------------------------------------

def compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``W`` -> {shape, compressed, bitmask, row_offsets} (the layout above)."""
    if w.dim() != 2:
        raise ValueError(f"bitmask compression takes a matrix, got shape {tuple(w.shape)}")
    w = w.detach().cpu().contiguous()
    keep = w != 0
    counts = keep.sum(dim=-1)
    return {"shape": torch.tensor(list(w.shape), dtype=torch.int64),
            "compressed": w[keep],
            "bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense matrix back from its four stored tensors."""
    shape = [int(x) for x in parts["shape"].tolist()]
    bits = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=shape[-1], bitorder="little")
    keep = torch.from_numpy(bits.reshape(shape).astype(bool))
    values = parts["compressed"]
    if int(keep.sum()) != values.numel():
        raise PrunetuneError(f"damaged sparse tensor: its bitmask marks {int(keep.sum())} weights, "
                             f"{values.numel()} values are stored")
    out = torch.zeros(shape, dtype=values.dtype)
    out[keep] = values
    return out


def compressed_bytes(w: torch.Tensor) -> int:
    """What ``compress(w)`` occupies, without building it."""
    rows, cols = w.shape
    return int((w != 0).sum()) * w.element_size() + rows * ((cols + 7) // 8) + rows * 8 + 16


def _eligible(name: str, t: torch.Tensor) -> bool:
    """Matrices of the decoder (not embeddings, not the LM head), stored compressed where that is smaller."""
    if t.dim() != 2 or not t.is_floating_point() or not name.endswith(".weight"):
        return False
    if "embed" in name or name.startswith("lm_head") or ".lm_head" in name:
        return False
    return compressed_bytes(t) < t.numel() * t.element_size()


# --- a checkpoint folder -----------------------------------------------------------------------------------

def _shards(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise PrunetuneError(f"'{directory}' has no safetensors weights to store compressed")


def sparsity_config(directory: str | Path) -> dict | None:
    """The ``sparsity_config`` of a checkpoint stored compressed, or None."""
    cfg = Path(directory) / "config.json"
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    sc = q.get("sparsity_config") if q.get("quant_method") == "compressed-tensors" else None
    return sc if sc and sc.get("format") else None


def is_compressed(directory: str | Path) -> bool:
    return sparsity_config(directory) is not None


def _structure(t: torch.Tensor) -> str:
    """"2:4" when every group of 4 consecutive inputs keeps at most 2, else "unstructured"."""
    if t.shape[1] % 4 == 0 and int((t.reshape(t.shape[0], -1, 4) != 0).sum(-1).max()) <= 2:
        return "2:4"
    return "unstructured"


def compress_checkpoint(directory: str | Path) -> dict:
    """Rewrite a finished (staged) checkpoint folder in place with its sparse matrices stored compressed.

    Shard by shard (memory: one shard); each shard is replaced by one rename. Returns what was stored: the
    matrices compressed, their dense and stored bytes, and the whole weight files' bytes before and after."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = Path(directory)
    shards = _shards(d)
    before = sum(f.stat().st_size for f in shards)
    weight_map, names, dense_b, stored_b, zeros, total, structures = {}, [], 0, 0, 0, 0, set()
    for f in shards:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        out = {}
        for k, t in tensors.items():
            if _eligible(k, t):
                module = k[: -len(".weight")]
                parts = compress(t)
                out.update({f"{module}.{p}": v for p, v in parts.items()})
                names.append(module)
                dense_b += t.numel() * t.element_size()
                stored_b += sum(v.numel() * v.element_size() for v in parts.values())
                zeros += t.numel() - parts["compressed"].numel()
                total += t.numel()
                structures.add(_structure(t))
            else:
                out[k] = t
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(out, str(tmp), metadata=meta or {"format": "pt"})
        os.replace(tmp, f)
        weight_map.update({k: f.name for k in out})
    if not names:
        raise PrunetuneError("no matrix of this model is sparse enough to store compressed "
                             "(--save-format compressed is for pruned models)")
    if (d / INDEX).is_file() or len(shards) > 1:
        size = sum(f.stat().st_size for f in shards)
        (d / INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                           "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    sparsity = zeros / total
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
        "config_groups": {}, "ignore": [], "kv_cache_scheme": None,
        "global_compression_ratio": round(dense_b / stored_b, 4),
        "sparsity_config": {"format": FORMAT, "global_sparsity": round(sparsity, 6),
                            "sparsity_structure": structures.pop() if len(structures) == 1 else "unstructured",
                            "targets": sorted(names), "ignore": []}}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    after = sum(f.stat().st_size for f in shards)
    return {"format": FORMAT, "matrices": len(names), "sparsity": round(sparsity, 6),
            "matrix_dense_bytes": dense_b, "matrix_stored_bytes": stored_b,
            "matrix_ratio": round(stored_b / dense_b, 4),
            "weight_file_bytes_dense": before, "weight_file_bytes_stored": after,
            "checkpoint_ratio": round(after / before, 4)}


def decompress_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Write ``src`` (stored compressed) into the folder ``dst`` as a plain dense checkpoint, tensor by tensor.

    Every other file is copied (a prunetune manifest is left out: ``dst`` is a new output)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = _shards(src)
    weight_map = {}
    for f in shards:
        out, groups = {}, {}
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata()
                for k in h.keys():
                    module, _, param = k.rpartition(".")
                    if param in PARAMS:
                        groups.setdefault(module, {})[param] = h.get_tensor(k)
                    else:
                        out[k] = h.get_tensor(k)
        except PrunetuneError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise PrunetuneError(f"weight file '{f}' is damaged or truncated ({type(e).__name__})") from None
        for module, parts in groups.items():
            missing = [p for p in PARAMS if p not in parts]
            if missing:
                raise PrunetuneError(f"'{f}': sparse tensor '{module}' lacks {', '.join(missing)}")
            out[f"{module}.weight"] = decompress(parts)
        save_file(out, str(dst / f.name), metadata=meta or {"format": "pt"})
        weight_map.update({k: f.name for k in out})
    if (src / INDEX).is_file():
        size = sum((dst / f.name).stat().st_size for f in shards)
        (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, "prunetune_manifest.json"):
            shutil.copy2(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


_VIEWS: dict[tuple, Path] = {}


def dense_view(directory: str | Path) -> Path:
    """A temporary dense copy of a compressed checkpoint (in ``$TMPDIR``, as large as the dense model), made once
    per process and removed at exit."""
    d = Path(directory).resolve()
    key = (str(d), tuple((f.name, f.stat().st_mtime_ns) for f in _shards(d)))
    if key in _VIEWS and _VIEWS[key].is_dir():
        return _VIEWS[key]
    view = Path(tempfile.mkdtemp(prefix="prunetune-dense-"))
    atexit.register(shutil.rmtree, view, True)
    try:
        with writing(view):  # a full temporary folder is one line naming it, not a traceback
            decompress_checkpoint(d, view)
    except BaseException:
        shutil.rmtree(view, ignore_errors=True)
        raise
    _VIEWS[key] = view
    return view


def check_save_format(fmt: str) -> str:
    if fmt not in SAVE_FORMATS:
        raise PrunetuneError(f"unknown save format '{fmt}' (choose from: {', '.join(SAVE_FORMATS)})")
    return fmt
