"""DoRA (weight-decomposed low-rank adaptation) through ``peft``: a tuning method in one file.

The LoRA method with peft's ``use_dora``: the update trains a low-rank direction and a magnitude per output
row; adapters are a standard PEFT folder, the merge is peft's (dense, like plain LoRA).
"""

from ..base import register
from .lora import LoRAMethod


@register
class DoRAMethod(LoRAMethod):
    """DoRA: LoRA on the direction plus a trained magnitude per output row; merged plainly (dense)."""

    name = "dora"
    merges_as = ("dora",)
    use_dora = True
