"""Streaming access to checkpoints, so a model far larger than RAM can be pruned layer by layer.

``open_streaming`` builds the model skeleton on the meta device and reads tensors from the safetensors
files on demand; ``ShardWriter`` writes finished layers to their own shard files and, at the end, the
index that makes the folder a normal sharded Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import PrunetuneError, write_failure


class SafetensorsSource:
    """Lazy tensor reader over a local HF checkpoint's safetensors file(s)."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise PrunetuneError(f"'{index}' is damaged (no weight_map)") from None
        elif (d / "model.safetensors").is_file():
            weight_map = None
        else:
            raise PrunetuneError(f"'{d}' has no safetensors weights")
        self._dir = d
        self._where: dict[str, str] = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for f in files:
            path = d / f
            if not path.is_file():
                raise PrunetuneError(f"weight file '{path}' is missing")
            try:
                with safe_open(str(path), framework="pt") as h:
                    keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise PrunetuneError(f"weight file '{path}' is damaged or truncated ({type(e).__name__})") from None
            for k in keys:
                self._where[k] = f

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name``, from the file header (no data is read)."""
        with safe_open(str(self._dir / self._where[name]), framework="pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise PrunetuneError(f"the checkpoint has no tensor '{name}' (does the config match the weights?)")
        try:
            # open per read: the file mapping is dropped right after, so pages of finished layers do not
            # stay mapped into this process (they would count towards its resident memory)
            with safe_open(str(self._dir / f), framework="pt") as h:
                return h.get_tensor(name)
        except Exception as e:
            raise PrunetuneError(f"cannot read tensor '{name}' from '{f}': the file is damaged or truncated ({type(e).__name__})") from None


def skeleton(directory: str | Path, dtype: torch.dtype):
    """The model of ``directory``'s config on the meta device (real buffers); no weight is read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise PrunetuneError(f"cannot read the config of '{directory}': {str(e).splitlines()[0]}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def check_shapes(model: torch.nn.Module, source: SafetensorsSource) -> None:
    """Refuse a config that does not match the stored weights, naming the first tensor that differs."""
    for name, p in model.named_parameters():
        if name in source:
            shape = source.shape(name)
            if shape != tuple(p.shape):
                raise PrunetuneError(f"config does not match the weights: '{name}' has shape {shape}, "
                                     f"config expects {tuple(p.shape)}")


def open_streaming(directory: str | Path, dtype: torch.dtype):
    """(skeleton model on meta with real buffers, source). Nothing large is read yet."""
    model = skeleton(directory, dtype)
    source = SafetensorsSource(directory)
    check_shapes(model, source)
    return model, source


def materialize(model: torch.nn.Module, prefix: str, module: torch.nn.Module, source, device, dtype) -> None:
    """Fill ``module``'s parameters (named from ``prefix``) from ``source``, checking shapes."""
    from accelerate.utils import set_module_tensor_to_device

    for name, p in list(module.named_parameters(recurse=True)):
        full = prefix + name
        t = source.get(full)
        if tuple(t.shape) != tuple(p.shape):
            raise PrunetuneError(f"config does not match the weights: '{full}' has shape {tuple(t.shape)}, config expects {tuple(p.shape)}")
        set_module_tensor_to_device(model, full, device, value=t, dtype=dtype)


def release(module: torch.nn.Module) -> None:
    """Drop a module's parameter storage (back to meta) once it has been written out."""
    module.to("meta")


class ShardWriter:
    """Writes one shard per finished layer plus one for everything else, then the index."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def layer_file(self, i: int) -> str:
        return f"model-layer-{i:05d}.safetensors"

    def write(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.dir / f".{filename}.tmp"
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, self.dir / filename)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            err = write_failure(e, self.dir / filename)
            if err is None:
                raise
            raise err from None

    def finish(self) -> None:
        weight_map, total = {}, 0
        for f in sorted(self.dir.glob("model-*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    weight_map[k] = f.name
                    sl = h.get_slice(k)
                    shape = sl.get_shape()
                    n = 1
                    for s in shape:
                        n *= s
                    total += n * _dtype_size(sl.get_dtype())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / self.INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _dtype_size(name: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)
