"""Reproducible calibration samples: n random windows of seqlen tokens from one token stream."""

from __future__ import annotations

import torch

from ..errors import PrunetuneError
from .sources import load_text, token_stream


def sample_calibration(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0):
    """Return (ids of shape (nsamples, seqlen), protocol dict).

    The corpus is joined (see data.sources) and tokenised once; window starts are drawn uniformly with a
    seeded generator, so the same (source, n, seqlen, seed) always gives the same samples. Drawing from
    the joined stream works for any seqlen, also longer than a typical document.
    """
    if nsamples <= 0:
        raise PrunetuneError(f"--nsamples must be positive (got {nsamples})")
    if seqlen <= 0:
        raise PrunetuneError(f"--seqlen must be positive (got {seqlen})")
    text = load_text(source)
    ids = token_stream(tokenizer, text)
    if ids.numel() <= seqlen:
        raise PrunetuneError(f"calibration corpus '{source}' has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    batch = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    protocol = {"source": text.describe(), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                "sampling": "uniform random windows of the tokenised joined corpus", "stream_tokens": int(ids.numel())}
    return batch, protocol
