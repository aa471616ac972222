"""Reproducible calibration samples: n random windows of seqlen tokens from one token stream."""

from __future__ import annotations

import torch

from ..errors import PrunetuneError
from .bos import check_bos, describe
from .sources import load_text, token_stream


def sample_calibration(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, bos: str = "stream"):
    """Return (ids of shape (nsamples, seqlen), protocol dict).

    The corpus is joined (see data.sources) and tokenised once; window starts are drawn uniformly with a
    seeded generator, so the same (source, n, seqlen, seed, bos) always gives the same samples. Drawing from
    the joined stream works for any seqlen, also longer than a typical document. ``bos`` (`data.bos`):
    ``stream`` draws windows of the stream as it is; ``window`` opens each with BOS followed by ``seqlen − 1``
    stream tokens (as the family was trained and is evaluated); ``none`` drops the stream's leading BOS.
    """
    if nsamples <= 0:
        raise PrunetuneError(f"--nsamples must be positive (got {nsamples})")
    if seqlen <= 0:
        raise PrunetuneError(f"--seqlen must be positive (got {seqlen})")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    check_bos(bos, bos_id)
    if bos == "window" and seqlen < 2:
        raise PrunetuneError(f"--seqlen must be at least 2 with a BOS per window (got {seqlen})")
    text = load_text(source)
    ids = token_stream(tokenizer, text)
    if bos != "stream" and bos_id is not None and ids.numel() and ids[0].item() == bos_id:
        ids = ids[1:]
    body = seqlen - 1 if bos == "window" else seqlen
    if ids.numel() <= body:
        raise PrunetuneError(f"calibration corpus '{source}' has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (nsamples,), generator=g)
    batch = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos == "window":
        batch = torch.cat([torch.full((nsamples, 1), bos_id, dtype=batch.dtype), batch], dim=1)
    protocol = {"source": text.describe(), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                "sampling": "uniform random windows of the tokenised joined corpus", "stream_tokens": int(ids.numel()),
                "bos": bos, "bos_placement": describe(bos)}
    return batch, protocol
