"""Remove hidden channels: a plain, smaller Hugging Face model (``hidden_size = k``) from a wider one.

Shared by everything that narrows the residual stream: PAT's shrink, the channel-pruning baselines and the
rotated shrink. Notation: ``d`` hidden size, ``keep`` the ``k`` kept channels (ascending), ``R_w`` a
``k × d`` matrix applied to the output of writer ``w`` (PAT: ``D[keep, :]`` of its HSM; otherwise the rows
``keep`` of the identity, i.e. plain slicing).

1. Writers of the residual stream emit ``R_w y``: token embedding ``E' = E R_embᵀ``; ``o_proj' = R_w W_o`` and
   ``b' = R_w b`` (same for ``down_proj``). The residual stream of the smaller model is then exactly the kept
   entries of the wider model's stream when every other entry is zero there (PAT's gate, or channels that
   carry nothing), and an approximation otherwise (the rotated shrink drops the low-variance directions).
2. Readers (q/k/v, gate/up, the LM head) see the stream through an RMSNorm, which maps a zero channel to
   zero, so their dropped input columns multiply zeros: ``W' = W[:, keep]``. The LM head reads the *final
   norm* output, not the embedding, so tied embeddings are untied (``E'`` is transformed, the head is not).
3. RMSNorm over ``x`` (d entries, zero outside ``keep``) versus over ``x' = x[keep]`` (k entries)::

       RMS_d(x)[keep] = g[keep] ⊙ x' / sqrt((1/d) Σ_keep x_j² + ε)
                      = (sqrt(d/k) · g[keep]) ⊙ x' / sqrt((1/k) Σ x'_j² + ε')      with ε' = ε·d/k

   so every gain becomes ``sqrt(d/k) · g[keep]`` and ``rms_norm_eps' = ε · d / k``: exact, not approximate.
4. The config gets ``hidden_size = k``, ``head_dim`` written explicitly, the new ``rms_norm_eps`` and
   ``tie_word_embeddings = False``. Everything else (attention internals, MLP inner weights, per-head q/k
   norms, rotary buffers) is copied.

Plain transformers must load the result: Llama configs need a hidden size that is a multiple of
``num_attention_heads`` even with an explicit ``head_dim``, so the kept count moves to the nearest loadable
size (:func:`keep_count`, with a warning).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import PrunetuneError
from ..models import get_adapter

log = logging.getLogger("prunetune")

INFO_FILE = "prunetune_shrink.json"


#: norms on the output of a residual writer (Gemma-2/3 "sandwich" norms): their rms runs over every channel
#: of the writer's output, so a smaller model cannot reproduce them
WRITER_NORMS = ("post_feedforward_layernorm", "post_attention_norm", "post_ffw_norm")


def sliceable_families() -> list[str]:
    from ..models.base import _REGISTRY

    return sorted(t for t, cls in _REGISTRY.items() if cls.norm_kind == "rmsnorm" and cls.norm_readers)


def check_sliceable(model: nn.Module, what: str = "removing hidden channels"):
    """The model's adapter, or one clear line saying why its hidden channels cannot be removed exactly."""
    adapter = get_adapter(model)
    mt = model.config.model_type
    if adapter.norm_kind == "unknown":
        layer0 = adapter.layers[0]
        sandwich = [n for n, _ in layer0.named_modules() if n.split(".")[-1] in WRITER_NORMS]
        why = (f"its layers normalise what their residual writers emit ({', '.join(sandwich)}): those norms see "
               "every channel, so removed channels cannot be sliced out exactly" if sandwich else
               "prunetune has no adapter saying which linears write and read its residual stream and how its "
               "norms scale")
        raise PrunetuneError(f"{what} is not supported for model type '{mt}': {why} (families that can: "
                             f"{', '.join(sliceable_families())})")
    if adapter.norm_kind != "rmsnorm" or getattr(model.config, "rms_norm_eps", None) is None:
        raise PrunetuneError(
            f"{what} needs RMSNorm with 'rms_norm_eps' in the config (model type '{model.config.model_type}' uses "
            f"{adapter.norm_kind}, which mixes channels, so removed channels would not stay zero)")
    return adapter


#: float64 elements of one block of rows in a product on a large tensor (128 MB), as SPP's merged_in_chunks
ROW_BLOCK = 1 << 24


def by_rows(t: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``f(t.double()).to(t.dtype)`` a block of rows at a time, for an ``f`` that maps each row on its own
    (``x @ M``, ``x * g``): a vocabulary x d tensor never has a full float64 copy (1 GB at 32000 x 4096)."""
    if t.dim() != 2 or t.numel() <= ROW_BLOCK:
        return f(t.double()).to(t.dtype)
    step = max(1, ROW_BLOCK // t.shape[1])
    out = None
    for r0 in range(0, t.shape[0], step):
        y = f(t[r0:r0 + step].double()).to(t.dtype)
        if out is None:
            out = torch.empty((t.shape[0],) + tuple(y.shape[1:]), dtype=t.dtype, device=t.device)
        out[r0:r0 + step] = y
    return out


def n_keep_for(d: int, ratio: float) -> int:
    """Channels kept when a fraction ``ratio`` of ``d`` hidden channels is removed: ``round((1 − ratio) · d)``."""
    return int(round((1.0 - ratio) * d))


def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` largest scores; ties go to the lower index."""
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def check_ratio(ratio, what: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0 < ratio < 1:
        raise PrunetuneError(f"{what} must be strictly between 0 and 1 (got {ratio})")
    return float(ratio)


def shrunk_config(config, k: int):
    """A copy of ``config`` for hidden size ``k`` (explicit head_dim, rescaled eps, untied embeddings)."""
    d = config.hidden_size
    cfg = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    cfg.hidden_size = k
    cfg.head_dim = head_dim
    if getattr(config, "rms_norm_eps", None) is None:
        raise PrunetuneError("removing hidden channels needs an RMSNorm model with 'rms_norm_eps' in its config")
    cfg.rms_norm_eps = float(config.rms_norm_eps) * d / k
    cfg.tie_word_embeddings = False
    return cfg


def loadable_hidden_size(config, k: int) -> bool:
    """Whether plain transformers accepts a config of this family with ``hidden_size = k`` (e.g. its Llama
    config requires a multiple of ``num_attention_heads`` even when ``head_dim`` is explicit)."""
    try:
        type(config).from_dict(shrunk_config(config, k).to_dict())
    except Exception:  # the config classes raise ValueError or huggingface_hub's strict-dataclass errors
        return False
    return True


def choose_hidden_size(config, target: int, low: int) -> int | None:
    """The loadable hidden size nearest to ``target`` in ``[low, d − 1]`` (ties: the larger); None if none."""
    d = int(config.hidden_size)
    for k in sorted(range(max(1, low), d), key=lambda k: (abs(k - target), -k)):
        if loadable_hidden_size(config, k):
            return k
    return None


def keep_count(model_config, d: int, ratio: float, what: str = "ratio") -> int:
    """Channels kept at ``ratio``: ``round((1 − ratio) · d)``, moved to the nearest hidden size that plain
    transformers can load for this family (Llama: a multiple of ``num_attention_heads``; a warning says so).
    At least ``num_attention_heads`` channels: q/k/v keep their ``heads · head_dim`` outputs but read only
    ``k`` inputs, so below one input direction per head the heads cannot attend independently."""
    check_ratio(ratio, what)
    target = n_keep_for(d, ratio)
    if target >= d:
        raise PrunetuneError(f"{what} {ratio} removes no channel of hidden size {d}")
    heads = int(getattr(model_config, "num_attention_heads", 1) or 1)
    if target < heads:
        raise PrunetuneError(
            f"{what} {ratio} keeps {target} of {d} hidden channels; at least {heads} "
            f"(num_attention_heads) are needed (ratio ≤ {1 - heads / d:.4f})"
        )
    if loadable_hidden_size(model_config, target):
        return target
    k = choose_hidden_size(model_config, target, heads)
    if k is None:
        raise PrunetuneError(f"{what} {ratio}: no hidden size below {d} that this model family can load")
    log.warning("%s %s: keeping %d of %d channels instead of %d (removed share %.4f): %s configs need a hidden "
                "size that is a multiple of %s", what, ratio, k, d, target, 1 - k / d, model_config.model_type,
                "num_attention_heads" if k % heads == 0 else "a family-specific step")
    return k


def _plain_param(model: nn.Module, key: str) -> torch.Tensor:
    mod_path, _, pname = key.rpartition(".")
    value = getattr(model.get_submodule(mod_path) if mod_path else model, pname, None)
    if not isinstance(value, torch.Tensor):
        raise PrunetuneError(f"cannot map parameter '{key}' of the smaller model onto the input model")
    return value.detach()


class SlicePlan:
    """How every tensor of the wider model becomes one of the smaller model (see the module docstring): the
    writers (``R_w`` on their output), the readers (input columns ``keep``), the norms (``sqrt(d/k) · g[keep]``).
    Used tensor by tensor, so the in-memory shrink and the streamed one share it."""

    def __init__(self, adapter, keep, writer_rows: Callable[[str], torch.Tensor | None] | None = None):
        d = adapter.hidden_size
        keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
        if keep.numel() == 0 or keep.unique().numel() != keep.numel() or int(keep.min()) < 0 or int(keep.max()) >= d:
            raise PrunetuneError(f"kept channels must be distinct indices in [0, {d})")
        self.keep = torch.sort(keep).values
        self.d, self.k = d, int(self.keep.numel())
        self.writer_rows = writer_rows
        self.embed_path = adapter.embed_path
        lp = adapter.layers_path
        self.writers = {adapter.embed_path} | {f"{lp}.{i}.{w}" for i in range(adapter.num_layers)
                                               for w in adapter.residual_writers}
        self.readers = {f"{lp}.{i}.{r}.weight" for i in range(adapter.num_layers) for r in adapter.residual_readers}
        self.readers.add(adapter.lm_head_path + ".weight")
        self.norms = {f"{lp}.{i}.{n}.weight" for i in range(adapter.num_layers) for n in adapter.layer_norms}
        self.norms.add(adapter.final_norm_path + ".weight")
        self.gain_scale = math.sqrt(d / self.k)

    def tensor(self, key: str, src: torch.Tensor) -> torch.Tensor:
        """The smaller model's ``key`` from the wider model's tensor of the same name."""
        mod_path, _, pname = key.rpartition(".")
        kd = self.keep.to(src.device)
        if mod_path in self.writers and pname in ("weight", "bias"):
            R = self.writer_rows(mod_path) if self.writer_rows is not None else None
            if mod_path == self.embed_path:  # rows are tokens: E' = E R^T
                if R is None:
                    return src[:, kd]
                Rt = R.to(src.device, torch.float64).t()
                return by_rows(src, lambda x: x @ Rt)
            return src[kd] if R is None else (R.to(src.device, torch.float64) @ src.double())
        if key in self.readers:
            return src[:, kd]
        if key in self.norms:
            return src.double()[kd] * self.gain_scale
        return src

    def info(self) -> dict:
        return {"hidden_size_before": self.d, "hidden_size": self.k, "ratio": 1 - self.k / self.d,
                "kept_channels": self.keep.tolist()}


@torch.no_grad()
def slice_hidden(model: nn.Module, keep, *, writer_rows: Callable[[str], torch.Tensor | None] | None = None,
                 param: Callable[[nn.Module, str], torch.Tensor] | None = None) -> nn.Module:
    """A new plain ``*ForCausalLM`` with hidden size ``len(keep)`` (see the module docstring).

    ``writer_rows(path)`` gives ``R_w`` (k × d) for the writer at module ``path`` (the embedding included), or
    None for plain slicing; it is called once per writer, so only one such matrix exists at a time.
    ``param(model, key)`` reads a plain-model state-dict entry from ``model`` (PAT: LoRA merged in)."""
    from transformers import AutoModelForCausalLM

    adapter = check_sliceable(model)
    plan = SlicePlan(adapter, keep, writer_rows)
    dtype = adapter.embedding.weight.dtype
    device = adapter.embedding.weight.device
    read = param or _plain_param
    new = AutoModelForCausalLM.from_config(shrunk_config(model.config, plan.k)).to(dtype=dtype)
    state = {}
    for key, ref in new.state_dict().items():
        x = plan.tensor(key, read(model, key))
        if x.shape != ref.shape:
            raise PrunetuneError(
                f"cannot shrink '{key}': got shape {tuple(x.shape)}, the k={plan.k} model needs {tuple(ref.shape)}")
        state[key] = x.to(dtype=ref.dtype)
    new.load_state_dict(state, strict=True)
    new.to(device)
    new.eval()
    new._prunetune_shrink_info = plan.info()
    return new


def save_shrunk(model: nn.Module, tokenizer, out_dir) -> Path:
    """Save a smaller model (and tokenizer) atomically: write a temporary folder next to ``out_dir``, then
    rename it into place (an existing ``out_dir`` is replaced only once the new one is complete)."""
    from ..io import publish_dir

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        info = getattr(model, "_prunetune_shrink_info", None)
        if info is not None:
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        publish_dir(tmp, out, overwrite=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
