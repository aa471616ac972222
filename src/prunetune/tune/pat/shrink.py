"""Turn a PAT-trained model into a plain, smaller Hugging Face model (``hidden_size = k``).

Notation: ``d`` hidden size, ``keep`` the ``k`` kept channels (ascending), ``m`` the binary gate
(1 on ``keep``), ``D = I + L1 diag(v) L0`` of one HSM, ``T = diag(m) · D``. Only the rows ``keep`` of ``T``
are non-zero and they equal ``D[keep, :]``, so ``T[keep, :] = D[keep, :]`` — the learned scale ``v`` is part
of ``D`` and is folded in with everything else.

1. LoRA is merged: ``W ← W + s · B A`` for every LoRA-wrapped linear.
2. Writers of the residual stream (the HSM sits on their output, ``z = T (W x + b)``):
   token embedding ``E' = (E Tᵀ)[:, keep] = E · D[keep, :]ᵀ``;
   ``o_proj' = (T W_o)[keep, :] = D[keep, :] · W_o`` and ``b' = D[keep, :] · b`` (same for ``down_proj``).
   Every writer therefore emits exactly the kept entries of ``z``; the dropped entries of ``z`` are 0.
3. The residual stream is a sum of writer outputs, so every dropped channel of it is 0 in the masked model.
   Readers (q/k/v, gate/up, the LM head) see it through an RMSNorm, which maps a zero channel to zero, so
   their dropped input columns multiply zeros: ``W' = W[:, keep]``. The LM head reads the *final norm*
   output, not the embedding, which is why tied embeddings are untied (``E'`` is transformed, the head is not).
4. RMSNorm on ``x`` (d entries, zero outside ``keep``) versus on ``x' = x[keep]`` (k entries)::

       RMS_d(x)[keep] = g[keep] ⊙ x' / sqrt((1/d) Σ_keep x_j² + ε)
                      = g[keep] ⊙ x' / sqrt((k/d) · ((1/k) Σ_keep x_j² + ε·d/k))
                      = (sqrt(d/k) · g[keep]) ⊙ x' / sqrt((1/k) Σ x'_j² + ε')      with ε' = ε·d/k

   so every gain (both layer norms and the final norm) becomes ``sqrt(d/k) · g[keep]`` and
   ``rms_norm_eps' = ε · d / k``: the shrunk model computes the same function, not an approximation.
5. The config gets ``hidden_size = k``, ``head_dim`` written explicitly (it no longer equals
   ``hidden_size / num_attention_heads``), the new ``rms_norm_eps`` and ``tie_word_embeddings = False``.

Everything else (attention internals, MLP inner weights, per-head q/k norms, rotary buffers) is copied.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ...errors import PrunetuneError
from ...models import get_adapter
from .hsm import PATModules

PAT_ATTR = "prunetune_pat"
PAT_INFO_FILE = "prunetune_pat.json"


def find_pat(model: nn.Module) -> PATModules:
    pat = getattr(model, PAT_ATTR, None)
    if not isinstance(pat, PATModules):
        raise PrunetuneError("this model was not prepared for PAT (no HSMs / channel mask found)")
    return pat


def _lora_types():
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # peft missing: nothing can be LoRA-wrapped
        return ()
    return (LoraLayer,)


@torch.no_grad()
def _plain_param(model: nn.Module, key: str) -> torch.Tensor:
    """The value of ``key`` (a plain-model state-dict key) in a possibly LoRA-wrapped model, LoRA merged."""
    mod_path, _, pname = key.rpartition(".")
    module = model.get_submodule(mod_path) if mod_path else model
    lora = _lora_types()
    if lora and isinstance(module, lora):
        base = module.get_base_layer()
        value = getattr(base, pname)
        if pname == "weight" and not module.merged:
            value = value.detach().clone()
            for name in module.active_adapters:
                if name in module.lora_A:
                    value += module.get_delta_weight(name).to(value.dtype)
        return value.detach()
    value = getattr(module, pname, None)
    if not isinstance(value, torch.Tensor):
        raise PrunetuneError(f"cannot map parameter '{key}' of the shrunk model onto the trained model")
    return value.detach()


def shrunk_config(config, k: int):
    """A copy of ``config`` for hidden size ``k`` (explicit head_dim, rescaled eps, untied embeddings)."""
    d = config.hidden_size
    cfg = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    cfg.hidden_size = k
    cfg.head_dim = head_dim
    if getattr(config, "rms_norm_eps", None) is None:
        raise PrunetuneError("PAT shrink needs an RMSNorm model with 'rms_norm_eps' in its config")
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


@torch.no_grad()
def shrink_model(model: nn.Module) -> nn.Module:
    """Return a new plain ``*ForCausalLM`` with hidden size ``k`` that computes what the masked model computes.

    The PAT gate is finalised first (exactly ``N_keep`` channels: the largest ``W_M``, ties to the lower
    index), so afterwards the trained model itself runs with that binary gate. The trained model is not
    otherwise modified. See the module docstring for the algebra.
    """
    from transformers import AutoModelForCausalLM

    pat = find_pat(model)
    adapter = get_adapter(model)
    if adapter.norm_kind != "rmsnorm":
        raise PrunetuneError(f"PAT needs RMSNorm (this model uses {adapter.norm_kind})")
    d = adapter.hidden_size
    keep = pat.mask.finalize().cpu()
    k = int(keep.numel())
    dtype = adapter.embedding.weight.dtype
    device = adapter.embedding.weight.device

    cfg = shrunk_config(model.config, k)
    new = AutoModelForCausalLM.from_config(cfg).to(dtype=dtype)
    target = new.state_dict()

    layers_path = adapter.layers_path
    writer_rows = {}  # state-dict key prefix (module path) -> D[keep, :] (float64)
    for path, hsm in zip(pat.paths, pat.hsms):
        writer_rows[path] = hsm.matrix(torch.float64)[keep.to(hsm.L0.device)]
    embed_key = adapter.embed_path + ".weight"
    readers = {f"{layers_path}.{i}.{r}.weight" for i in range(adapter.num_layers) for r in adapter.residual_readers}
    readers.add(adapter.lm_head_path + ".weight")
    norms = {f"{layers_path}.{i}.{n}.weight" for i in range(adapter.num_layers) for n in adapter.layer_norms}
    norms.add(adapter.final_norm_path + ".weight")
    gain_scale = math.sqrt(d / k)

    state = {}
    for key, ref in target.items():
        src = _plain_param(model, key)
        mod_path, _, pname = key.rpartition(".")
        x = src.double()
        kd = keep.to(src.device)
        if key == embed_key:
            x = x @ writer_rows[adapter.embed_path].to(x.device).t()
        elif mod_path in writer_rows and pname == "weight":
            x = writer_rows[mod_path].to(x.device) @ x
        elif mod_path in writer_rows and pname == "bias":
            x = writer_rows[mod_path].to(x.device) @ x
        elif key in readers:
            x = x[:, kd]
        elif key in norms:
            x = x[kd] * gain_scale
        if x.shape != ref.shape:
            raise PrunetuneError(
                f"cannot shrink '{key}': got shape {tuple(x.shape)}, the k={k} model needs {tuple(ref.shape)}"
            )
        state[key] = x.to(dtype=ref.dtype)
    new.load_state_dict(state, strict=True)
    new.to(device)
    new.eval()
    new._prunetune_pat_info = {  # written next to the weights by save_shrunk
        "method": "pat", "hidden_size_before": d, "hidden_size": k, "ratio": 1 - k / d,
        "kept_channels": keep.tolist(),
    }
    return new


def save_shrunk(model: nn.Module, tokenizer, out_dir) -> Path:
    """Save a shrunk model (and tokenizer) atomically: write a temporary folder next to ``out_dir``, then
    rename it into place (an existing ``out_dir`` is replaced only once the new one is complete)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        info = getattr(model, "_prunetune_pat_info", None)
        if info is not None:
            (tmp / PAT_INFO_FILE).write_text(json.dumps(info, indent=1))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
