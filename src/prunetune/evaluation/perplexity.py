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


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, *, batch_size: int = 8, max_windows: int | None = None,
                      desc: str = "perplexity", progress: bool = True) -> dict:
    check_seqlen(model, seqlen)
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    if nwin == 0:
        raise PrunetuneError(f"the corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
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
               max_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on a named corpus or text file, with its protocol."""
    check_seqlen(model, seqlen)
    source = load_text(corpus)
    ids = token_stream(tokenizer, source)
    res = perplexity_of_ids(model, ids, seqlen, batch_size=batch_size, max_windows=max_windows,
                            desc=f"ppl {source.name}", progress=progress)
    bos = tokenizer.bos_token_id
    res["protocol"] = {
        "corpus": source.describe(),
        "tokens": int(ids.numel()),
        "windows": "non-overlapping, remainder dropped" + (f", first {max_windows}" if max_windows else ""),
        "bos": "one at stream start" if bos is not None and ids[0].item() == bos else "none added",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": batch_size,
    }
    return res
