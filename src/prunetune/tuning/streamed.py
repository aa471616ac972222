"""Merging adapters into a checkpoint tensor by tensor, without loading the model.

For a local safetensors base model and a method with a streamed export (SPP's merge, PAT's shrink), ``merge``
builds the model on the meta device from its config (no weight), reads each base tensor from the files
when it is needed, turns it into the output tensor with the method's ``stream_tensors`` and writes it to a
shard of its decoder layer right away. Peak memory is then a few tensors (chunked where a product would be
large), not the model: a 7B checkpoint merges in a small fraction of its size. The fingerprint that proves
the base is the one the adapters were trained on is computed the same way, tensor by tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import SafetensorsSource, ShardWriter, skeleton
from ..errors import PrunetuneError
from ..manifest import trim_heap

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class BaseTensors:
    """The base checkpoint's tensors by state-dict name, read on demand in the working dtype (a tied LM head
    reads the embedding)."""

    def __init__(self, directory, dtype: torch.dtype):
        self.source = SafetensorsSource(directory)
        self.model = skeleton(directory, dtype)
        self.dtype = dtype
        self.config = self.model.config
        emb = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        path = {id(m): n for n, m in self.model.named_modules()}
        self.tied = {}  # a tied LM head is not in the files: it reads the embedding
        if head is not None and id(head) in path and (path[id(head)] + ".weight") not in self.source:
            self.tied[path[id(head)] + ".weight"] = path[id(emb)] + ".weight"

    def keys(self) -> list[str]:
        return list(self.model.state_dict().keys())

    def __call__(self, key: str) -> torch.Tensor:
        name = key if key in self.source else self.tied.get(key, key)
        return self.source.get(name).to(self.dtype)


class AdapterTensors:
    """An adapter file's tensors by name, the file opened per read (as ``SafetensorsSource.get``): the pages read
    for finished layers do not stay mapped into the process, so its memory does not grow with the depth."""

    def __init__(self, path):
        from safetensors import safe_open

        self._open = lambda: safe_open(str(path), framework="pt")
        with self._open() as h:
            self._keys = list(h.keys())

    def keys(self) -> list[str]:
        return self._keys

    def get_tensor(self, name: str) -> torch.Tensor:
        with self._open() as h:
            return h.get_tensor(name)


@torch.no_grad()
def fingerprint(base: BaseTensors) -> str:
    """``trainer.model_fingerprint`` of the model ``base`` describes, computed tensor by tensor."""
    from .trainer import _hash

    cfg = base.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    tensors = []
    for name, p in base.model.state_dict().items():
        if not torch.is_floating_point(p):
            continue
        t = base(name)
        tensors.append([name, list(t.shape), str(t.dtype), int(torch.count_nonzero(t)), f"{float(t.double().sum()):.9e}"])
        del t
    return _hash([cfg, tensors])


def write_streamed(tm, adir: Path, base: BaseTensors, stage: Path, tokenizer_dir: Path) -> dict:
    """Write the method's plain checkpoint into ``stage`` tensor by tensor (one shard per decoder layer, each
    written as soon as the layer's tensors are done; every other tensor in a shard of its own); returns the
    method's export info."""
    from transformers import AutoTokenizer

    out_config, tensors, info = tm.stream_tensors(adir, base)
    text = out_config.get_text_config() if hasattr(out_config, "get_text_config") else out_config
    tied = set(base.tied) if getattr(text, "tie_word_embeddings", False) else set()  # a tied head is not saved
    stage.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(stage)
    shard, pending, n_rest = None, {}, 0
    for key, t in tensors:
        if key in tied:
            continue
        t = t.to(base.dtype).contiguous()
        m = _LAYER.search(key)
        if m is None:
            writer.write(f"model-rest-{n_rest:03d}.safetensors", {key: t})
            n_rest += 1
            del t
            trim_heap()  # freed float64 temporaries stay resident otherwise (and add up layer after layer)
            continue
        name = writer.layer_file(int(m.group(1)))
        if name != shard and pending:
            writer.write(shard, pending)
            pending = {}
            trim_heap()
        shard = name
        pending[key] = t
    if pending:
        writer.write(shard, pending)
    writer.finish()
    out_config.dtype = str(base.dtype).replace("torch.", "")
    out_config.save_pretrained(stage)
    try:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(stage)
    except (OSError, ValueError):
        raise PrunetuneError(f"cannot load the tokenizer of '{tokenizer_dir}'") from None
    return info
