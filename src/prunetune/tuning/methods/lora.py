"""LoRA baselines through ``peft`` on the same targets as SPP (every linear of every decoder layer).

Two merges (DESIGN.md §4 baselines):

- ``lora``: ``W + s · B A`` via peft's ``merge_and_unload`` — the product is dense, so the merged weights lose
  the sparsity pattern;
- ``lora-masked``: ``W + M ⊙ (s · B A)`` with ``M = (W != 0)`` — the pattern is kept, at the price of the
  merged model differing from the trained adapter model.

The adapters are a standard PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), so
``PeftModel.from_pretrained(base_model, "<out>/adapters")`` loads them in any PEFT tooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import PrunetuneError
from ...models import get_adapter
from ..base import TuningMethod, register, write_plain

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
LORA_FLAGS = (
    ("--lora-r", "r", {"type": int, "help": "LoRA rank (default 8)"}),
    ("--lora-alpha", "alpha", {"type": float, "help": "LoRA alpha (default 16)"}),
    ("--lora-dropout", "dropout", {"type": float, "help": "LoRA dropout (default 0.05)"}),
)


def lora_target_modules(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Full module paths of the targeted linears (``model.layers.3.self_attn.q_proj``, ...)."""
    adapter = get_adapter(model)
    return adapter.linear_paths(adapter.select_linears(targets, "LoRA target"))


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               targets: list[str] | None = None, use_dora: bool = False):
    """Return a ``peft`` model with LoRA (or DoRA) on the targeted linears (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise PrunetuneError(f"LoRA r must be positive (got {r})")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", use_dora=use_dora,
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


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    #: linear names relative to a decoder layer; None = every linear of the adapter
    targets: list[str] | None = None

    def __post_init__(self):
        if int(self.r) <= 0:
            raise PrunetuneError(f"LoRA r must be positive (got {self.r})")
        if not 0 <= self.dropout < 1:
            raise PrunetuneError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")
        if self.targets is not None:
            self.targets = list(self.targets)


@register
class LoRAMethod(TuningMethod):
    """LoRA with a plain merge (``W + s·BA``: dense)."""

    name = "lora"
    Config = LoRAConfig
    default_lr = 2e-4
    zero_pattern = "recorded"
    merges_as = ("lora", "lora-masked")
    cli_options = LORA_FLAGS
    masked_merge = False
    use_dora = False

    def prepare(self, model):
        c = self.config
        return apply_lora(model, int(c.r), c.alpha, c.dropout, c.targets, use_dora=self.use_dora)

    def save_adapters(self, model, directory):
        """A standard PEFT adapter folder."""
        model.save_pretrained(str(directory), safe_serialization=True)

    def load_adapters(self, model, directory):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        f = Path(directory) / PEFT_WEIGHTS
        if not f.is_file():
            raise PrunetuneError(f"no LoRA adapters in {directory} (missing {PEFT_WEIGHTS})")
        res = set_peft_model_state_dict(model, load_file(str(f)))
        unexpected = getattr(res, "unexpected_keys", None)
        if unexpected:
            raise PrunetuneError(f"LoRA adapters do not match the model (unexpected key {unexpected[0]})")

    def export(self, model, out_dir, tokenizer=None):
        return write_plain(merge_lora(model, masked=self.masked_merge), out_dir, tokenizer)


@register
class MaskedLoRAMethod(LoRAMethod):
    """LoRA whose merge adds ``s·BA`` only where the base weight is non-zero (the pattern is kept)."""

    name = "lora-masked"
    masked_merge = True
    keeps_zeros = True
