"""Perplexity with a stated protocol (DESIGN.md §6).

The corpus is tokenised once, cut into non-overlapping windows of ``seqlen`` tokens (the remainder is
dropped), and the mean NLL over all predicted tokens (seqlen - 1 per window) is exponentiated. The NLL is
computed from the final hidden states a chunk of positions at a time (``tuning.losses``), so a batch's full
float32 logits never exist at once: memory does not grow with the vocabulary.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..data.bos import BOS_MODES, BOS_PER_WINDOW, family_bos  # noqa: F401  (BOS_*: re-exported)
from ..data.sources import load_text, token_stream
from ..errors import PrunetuneError
from ..tuning.losses import hidden_states_out, lm_loss


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seqlen(model, seqlen: int) -> None:
    if seqlen <= 1:
        raise PrunetuneError(f"--seqlen must be at least 2 (got {seqlen})")
    limit = max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise PrunetuneError(f"--seqlen {seqlen} is larger than the model allows ({limit} positions)")


def default_bos(model) -> str:
    return family_bos(getattr(model.config, "model_type", None))


def windows_of(ids: torch.Tensor, seqlen: int, bos: str, bos_id: int | None) -> torch.Tensor:
    """The (n, seqlen) windows of a token stream under a BOS mode (remainder dropped)."""
    if bos not in BOS_MODES:
        raise PrunetuneError(f"unknown BOS mode '{bos}' (use {', '.join(BOS_MODES)})")
    if bos in ("window", "none") and bos_id is not None and ids.numel() and ids[0].item() == bos_id:
        ids = ids[1:]
    if bos != "window":
        n = ids.numel() // seqlen
        return ids[: n * seqlen].view(n, seqlen)
    if bos_id is None:
        raise PrunetuneError("--bos window: the tokenizer has no BOS token")
    n = ids.numel() // (seqlen - 1)
    body = ids[: n * (seqlen - 1)].view(n, seqlen - 1)
    return torch.cat([torch.full((n, 1), bos_id, dtype=ids.dtype), body], dim=1)


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, *, batch_size: int = 8, max_windows: int | None = None,
                      desc: str = "perplexity", progress: bool = True, bos: str = "stream",
                      bos_id: int | None = None) -> dict:
    check_seqlen(model, seqlen)
    windows = windows_of(ids, seqlen, bos, bos_id)
    nwin = windows.shape[0] if max_windows is None else min(windows.shape[0], max_windows)
    if nwin == 0:
        raise PrunetuneError(f"the corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = windows[:nwin]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(range(0, nwin, batch_size), desc=desc, unit="batch", disable=not progress, leave=False)
    for start in bar:
        batch = windows[start : start + batch_size].to(device)
        with hidden_states_out(model) as head:
            hidden = model(input_ids=batch, use_cache=False).logits
        _, nll, _ = lm_loss(hidden, batch, head)
        if not torch.isfinite(nll):
            raise PrunetuneError("the model produced NaN/Inf logits (damaged weights?)")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "windows": nwin, "tokens_scored": total_tokens, "seqlen": seqlen}


def perplexity(model, tokenizer, corpus: str, *, seqlen: int = 512, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True, bos: str | None = None) -> dict:
    """Perplexity of ``model`` on a named corpus or text file, with its protocol. ``bos``: ``stream`` |
    ``window`` | ``none`` (see ``BOS_MODES``); None: ``window`` for families that need a BOS per sequence
    (Gemma), ``stream`` for every other."""
    check_seqlen(model, seqlen)
    bos = bos or default_bos(model)
    source = load_text(corpus)
    ids = token_stream(tokenizer, source)
    bos_id = tokenizer.bos_token_id
    res = perplexity_of_ids(model, ids, seqlen, batch_size=batch_size, max_windows=max_windows,
                            desc=f"ppl {source.name}", progress=progress, bos=bos, bos_id=bos_id)
    at_start = bos_id is not None and ids[0].item() == bos_id
    res["protocol"] = {
        "corpus": source.describe(),
        "tokens": int(ids.numel()),
        "windows": "non-overlapping, remainder dropped" + (f", first {max_windows}" if max_windows else ""),
        "bos_mode": bos,
        "bos": {"stream": "one at stream start" if at_start else "none added",
                "window": f"one opening every window ({seqlen - 1} text tokens after it)",
                "none": "none"}[bos],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": batch_size,
    }
    return res


def before_after_lines(ev: dict | None) -> list[str]:
    """The printed perplexity table of a command's ``--eval`` (``{"before": {corpus: ...}, "after": ...}``)."""
    if not ev:
        return []
    lines = [f"{'corpus':<14}{'before':>12}{'after':>12}{'ratio':>9}"]
    for c, b in ev["before"].items():
        a = ev["after"][c]
        lines.append(f"{c:<14}{b['ppl']:>12.3f}{a['ppl']:>12.3f}{a['ppl'] / b['ppl']:>9.3f}")
    return lines
