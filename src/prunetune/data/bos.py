"""Where the BOS token goes in a window of tokens: one rule for evaluation, calibration and tuning windows.

``stream`` — the tokenizer's own: at most one BOS, at the start of the whole text (a window drawn from the
middle has none); ``window`` — a BOS opens every window (``seqlen − 1`` text tokens after it); ``none`` — no BOS
anywhere. A family trained to see BOS at the start of every sequence (Gemma) treats that first position as
its attention sink: its activations (which set every Hessian a pruner builds) and its scores differ without
it, so those families default to ``window``; every other family keeps ``stream``.
"""

from __future__ import annotations

from ..errors import PrunetuneError

BOS_MODES = ("stream", "window", "none")
#: families trained to see BOS at the start of every sequence (Gemma-3 on WikiText-2 scores 2.5x worse without)
BOS_PER_WINDOW = ("gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma")


def family_bos(model_type: str | None) -> str:
    """The BOS mode a family was trained with (the default everywhere windows are cut)."""
    return "window" if model_type in BOS_PER_WINDOW else "stream"


def check_bos(mode: str, bos_id: int | None = None) -> str:
    if mode not in BOS_MODES:
        raise PrunetuneError(f"unknown BOS mode '{mode}' (use {', '.join(BOS_MODES)})")
    if mode == "window" and bos_id is None:
        raise PrunetuneError("BOS per window: the tokenizer has no BOS token")
    return mode


def describe(mode: str) -> str:
    return {"stream": "the tokenizer's own (at most one, at the start of the text)",
            "window": "one opens every window", "none": "none"}[mode]
