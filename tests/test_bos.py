"""Calibration and tuning windows follow the family's BOS convention (the rule ``eval --bos`` uses):
a BOS opens every window for Gemma, the tokenizer's own stream elsewhere; overridable and recorded."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from conftest import save_tiny
from prunetune.data.bos import family_bos
from prunetune.data.calibration import sample_calibration
from prunetune.data.sources import load_text, token_stream
from prunetune.errors import PrunetuneError
from prunetune.paths import DEFAULT_MODEL


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def test_stream_windows_are_the_stream_as_drawn_before(tok):
    """``stream`` (every non-Gemma family) draws exactly the windows it always drew."""
    ids, proto = sample_calibration(tok, "tinystories", 6, 32, seed=3)
    stream = token_stream(tok, load_text("tinystories"))
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, stream.numel() - 32, (6,), generator=g)
    assert torch.equal(ids, torch.stack([stream[s:s + 32] for s in starts.tolist()]))
    assert proto["bos"] == "stream"


def test_window_mode_opens_every_window_with_bos(tok):
    ids, proto = sample_calibration(tok, "tinystories", 8, 32, seed=0, bos="window")
    stream = token_stream(tok, load_text("tinystories"))
    body = stream[1:] if stream[0].item() == tok.bos_token_id else stream
    assert ids.shape == (8, 32) and proto["bos"] == "window"
    assert (ids[:, 0] == tok.bos_token_id).all()
    for w in ids:  # the rest is one contiguous piece of the stream (BOS of the stream itself left out)
        hits = [i for i in range(body.numel() - 31) if torch.equal(body[i:i + 31], w[1:])]
        assert hits
    none, _ = sample_calibration(tok, "tinystories", 8, 32, seed=0, bos="none")
    assert not (none == tok.bos_token_id).any()


def test_family_rule_and_bad_mode(tok):
    assert family_bos("gemma3_text") == "window" and family_bos("llama") == "stream" and family_bos(None) == "stream"
    with pytest.raises(PrunetuneError, match="unknown BOS mode"):
        sample_calibration(tok, "tinystories", 2, 16, bos="sometimes")


@pytest.mark.parametrize("family,expected", [("gemma3_text", "window"), ("llama", "stream")])
def test_prune_calibrates_the_family_way(family, expected, tmp_path):
    from prunetune.api import prune

    src = save_tiny(family, tmp_path / family)
    rep = prune(src, method="sparsegpt", sparsity=0.5, out=tmp_path / "p", calib="tinystories", nsamples=2,
                seqlen=16, device="cpu", progress=False)
    assert rep["manifest"]["calibration"]["bos"] == expected
    rep = prune(src, method="sparsegpt", sparsity=0.5, out=tmp_path / "q", calib="tinystories", nsamples=2,
                seqlen=16, device="cpu", progress=False, calib_bos="none")
    assert rep["manifest"]["calibration"]["bos"] == "none"
    assert json.loads((tmp_path / "q" / "prune_report.json").read_text())["manifest"]["calibration"]["bos"] == "none"


def test_tuning_text_windows_follow_the_family(tok, tmp_path):
    from prunetune.tuning.data import load_text_data

    f = tmp_path / "t.txt"
    f.write_text("Once upon a time there was a cat. " * 40)
    win = load_text_data(f, tok, seq_len=16, eval_size=0, bos="window")
    plain = load_text_data(f, tok, seq_len=16, eval_size=0)
    assert all(e["input_ids"][0] == tok.bos_token_id and len(e["input_ids"]) == 16 for e in win.train)
    assert all(len(e["input_ids"]) == 16 for e in plain.train) and win.info["bos"] == "window"
