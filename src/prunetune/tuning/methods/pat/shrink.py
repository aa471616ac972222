"""Turn a PAT-trained model into a plain, smaller Hugging Face model (``hidden_size = k``).

``keep`` are the ``k`` channels of the finalised gate ``m`` (binary, 1 on ``keep``) and ``D = I + L1 diag(v) L0``
the operator of one HSM, so the HSM on writer ``w`` computes ``T y`` with ``T = diag(m) · D``. Only the rows
``keep`` of ``T`` are non-zero and they equal ``D[keep, :]``: the learned scale ``v`` is part of ``D`` and is folded
in with everything else. The shrink is then :func:`prunetune.structured.slicing.slice_hidden` with
``R_w = D_w[keep, :]`` on every writer and LoRA merged into every weight it reads (``W + s · B A``): the
residual stream of the masked model is zero outside ``keep``, so the smaller model computes exactly what the
masked model computes (the algebra, with the RMSNorm rescaling, is in that module's docstring).
"""

from __future__ import annotations

import torch
from torch import nn

from ....errors import PrunetuneError
from ....structured.slicing import check_sliceable, save_shrunk, slice_hidden  # noqa: F401  (save_shrunk: PAT's export)
from .hsm import PATModules

PAT_ATTR = "prunetune_pat"


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


@torch.no_grad()
def shrink_model(model: nn.Module) -> nn.Module:
    """Return a new plain ``*ForCausalLM`` with hidden size ``k`` that computes what the masked model computes.

    The PAT gate is finalised first (exactly ``N_keep`` channels: the largest ``W_M``, ties to the lower
    index), so afterwards the trained model itself runs with that binary gate. The trained model is not
    otherwise modified. Each writer's ``D[keep, :]`` is built when that writer is sliced, in float64."""
    pat = find_pat(model)
    check_sliceable(model, "PAT")
    keep = pat.mask.finalize().cpu()
    hsm_of = dict(zip(pat.paths, pat.hsms))

    def writer_rows(path):
        return hsm_of[path].rows(keep, torch.float64)

    new = slice_hidden(model, keep, writer_rows=writer_rows, param=_plain_param)
    new._prunetune_shrink_info["method"] = "pat"
    return new
