"""Full fine-tuning: every weight of the decoder trains (the recovery the structured-pruning literature uses
when it has the memory: about 16 bytes per parameter with AdamW in float32, 2.2 GB for SmolLM2-135M).

``train_embeddings=False`` (default) keeps the token embeddings (and a tied LM head) frozen: they hold a fifth
of a small model's weights, are untouched by pruning and shrinking, and a few hundred steps on one corpus
mostly move the rows of the tokens that corpus uses. The "adapters" are the trained weights themselves
(``full_weights.safetensors``, shared tensors written once); the export is the plain model. The zeros of a
pruned input are not kept (use ``spp`` or ``lora-masked`` for that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...errors import PrunetuneError
from ...models import get_adapter
from ..base import TuningMethod, register, write_plain

WEIGHTS_FILE = "full_weights.safetensors"
CONFIG_FILE = "full_config.json"


@dataclass
class FullConfig:
    train_embeddings: bool = False   #: also train the token embeddings (and a tied LM head)


@register
class FullMethod(TuningMethod):
    """Full fine-tuning of every decoder weight (embeddings optional); the export is the plain model."""

    name = "full"
    Config = FullConfig
    default_lr = 5e-5
    zero_pattern = "recorded"
    cli_options = (
        ("--train-embeddings", "train_embeddings", {"action": "store_true",
                                                    "help": "also train the token embeddings (default: frozen)"}),
    )

    def prepare(self, model):
        emb = get_adapter(model).embedding.weight
        for p in model.parameters():
            p.requires_grad_(True)
        if not self.config.train_embeddings:
            emb.requires_grad_(False)
        return model

    def _trained(self, model) -> dict:
        return {k: v for k, v in model.state_dict(keep_vars=True).items()
                if getattr(v, "requires_grad", False)}

    def save_adapters(self, model, directory):
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        seen, state = set(), {}
        for k, v in self._trained(model).items():
            if id(v) in seen:  # a tied tensor: written once
                continue
            seen.add(id(v))
            state[k] = v.detach().cpu().contiguous()
        save_file(state, str(d / WEIGHTS_FILE))
        (d / CONFIG_FILE).write_text(json.dumps({"tensors": sorted(state)}, indent=1))

    def load_adapters(self, model, directory):
        from safetensors.torch import load_file

        f = Path(directory) / WEIGHTS_FILE
        if not f.is_file():
            raise PrunetuneError(f"no fully tuned weights in {directory} (missing {WEIGHTS_FILE})")
        state = load_file(str(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise PrunetuneError(f"fully tuned weights do not match the model (unexpected key {unexpected[0]})")
        absent = sorted(set(self._trained(model)) - set(state))
        tied = {k for k in absent if k.endswith("lm_head.weight")}
        if set(absent) - tied:
            raise PrunetuneError(f"fully tuned weights do not match the model (missing {sorted(set(absent) - tied)[0]})")

    def export(self, model, out_dir, tokenizer=None):
        return write_plain(model, out_dir, tokenizer)
