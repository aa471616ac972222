"""LoRA baselines through ``peft`` on the same targets as SPP (every linear of every decoder layer).

Two merges (DESIGN.md §4 baselines):

- plain (``masked=False``): ``W + s · B A`` via peft's ``merge_and_unload`` — the product is dense, so the
  merged weights lose the sparsity pattern;
- masked (``masked=True``): ``W + M ⊙ (s · B A)`` with ``M = (W != 0)`` — the pattern is kept, at the price
  of the merged model differing from the trained adapter model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunetuneError
from ..models import get_adapter
from .trainer import TuningMethod

ADAPTER_FILE = "lora_adapters.safetensors"


def lora_target_modules(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Full module paths of the targeted linears (``model.layers.3.self_attn.q_proj``, ...)."""
    adapter = get_adapter(model)
    names = adapter.linear_names()
    if targets is not None:
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise PrunetuneError(f"unknown LoRA target(s) {', '.join(unknown)} (this model has: {', '.join(names)})")
        names = list(targets)
    return [f"{adapter.layers_path}.{i}.{n}" for i in range(adapter.num_layers) for n in names]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               targets: list[str] | None = None):
    """Return a ``peft`` model with LoRA on the targeted linears (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise PrunetuneError(f"LoRA r must be positive (got {r})")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                     target_modules=lora_target_modules(model, targets))
    return get_peft_model(model, cfg)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora(model: nn.Module, masked: bool = True) -> nn.Module:
    """Merge LoRA into the base weights and return the plain base model (see module docstring)."""
    if not masked:
        return model.merge_and_unload()
    for mod in _lora_layers(model):
        base = mod.get_base_layer()
        for name in mod.active_adapters:
            if name not in mod.lora_A:
                continue
            delta = mod.get_delta_weight(name).to(base.weight.dtype)
            base.weight.add_(delta * (base.weight != 0))
    return model.unload()


class LoRAMethod(TuningMethod):
    """LoRA in the shared training loop; ``export`` merges masked (default) or plain."""

    name = "lora"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                 targets: list[str] | None = None, masked_merge: bool = True):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.targets = list(targets) if targets is not None else None
        self.masked_merge = masked_merge

    def fingerprint(self) -> dict:
        return {"method": self.name, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "targets": self.targets}

    def prepare(self, model):
        return apply_lora(model, self.r, self.alpha, self.dropout, self.targets)

    def save_adapters(self, model, directory):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(sd, str(d / ADAPTER_FILE))
        (d / "lora_config.json").write_text(json.dumps(self.fingerprint(), indent=1))

    def load_adapters(self, model, directory):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        f = Path(directory) / ADAPTER_FILE
        if not f.is_file():
            raise PrunetuneError(f"no LoRA adapters in {directory} (missing {ADAPTER_FILE})")
        res = set_peft_model_state_dict(model, load_file(str(f)))
        unexpected = getattr(res, "unexpected_keys", None)
        if unexpected:
            raise PrunetuneError(f"LoRA adapters do not match the model (unexpected key {unexpected[0]})")

    def export(self, model, out_dir, tokenizer=None):
        base = merge_lora(model, masked=self.masked_merge)
        for p in base.parameters():
            p.requires_grad_(True)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        base.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        return base
