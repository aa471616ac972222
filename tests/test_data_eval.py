"""Text sources, calibration sampling and perplexity protocol."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from prunetune.data import load_text, sample_calibration, token_stream
from prunetune.errors import PrunetuneError
from prunetune.evaluation.perplexity import perplexity, perplexity_of_ids
from prunetune.io import load_model


@pytest.fixture(scope="module")
def stories():
    model, tok, _ = load_model(None)
    return model, tok


def test_bundled_tinystories_perplexity(stories):
    model, tok = stories
    r = perplexity(model, tok, "tinystories", seqlen=512, progress=False)
    # real trained model on in-domain text: single-digit perplexity; a broken pipeline gives ~vocab size
    assert 4.0 < r["ppl"] < 9.0, r["ppl"]
    assert r["windows"] == r["protocol"]["tokens"] // 512
    assert r["tokens_scored"] == r["windows"] * 511
    assert r["protocol"]["corpus"]["sha256"] and r["protocol"]["bos"] == "one at stream start"


def test_perplexity_equals_direct_nll(stories):
    model, tok = stories
    ids = token_stream(tok, load_text("tinystories"))[: 3 * 100 + 7]
    r = perplexity_of_ids(model, ids, 100, batch_size=2, progress=False)
    with torch.no_grad():
        nlls = []
        for w in ids[:300].view(3, 100):
            logits = model(w[None]).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
    direct = math.exp(torch.stack(nlls).sum().item() / (3 * 99))
    assert r["windows"] == 3 and abs(r["ppl"] - direct) < 1e-6 * direct


def test_local_files(tmp_path, stories):
    _, tok = stories
    txt = tmp_path / "a.txt"
    txt.write_text("Once upon a time there was a cat. " * 50)
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i} about a dog."}) for i in range(5)))
    assert load_text(txt).text.startswith("Once upon")
    assert load_text(jl).text.count("\n\n") == 4
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "a.parquet")
    assert load_text(tmp_path / "a.parquet").text == "one\n\ntwo"


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"), (b"\x00\x01\x02garbage", "binary"), (b"\xff\xfe\xfa", "UTF-8"),
])
def test_bad_text_files(tmp_path, content, needle):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(PrunetuneError, match=needle):
        load_text(p)


def test_bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(PrunetuneError, match="line 2 has no string field 'text'"):
        load_text(p)


def test_unknown_dataset_and_missing_file():
    with pytest.raises(PrunetuneError, match="unknown dataset 'nosuchcorpus'"):
        load_text("nosuchcorpus")
    with pytest.raises(PrunetuneError, match="does not exist"):
        load_text("/nonexistent/file.txt")


def test_calibration_reproducible(stories):
    _, tok = stories
    a, pa = sample_calibration(tok, "tinystories", 4, 64, seed=3)
    b, _ = sample_calibration(tok, "tinystories", 4, 64, seed=3)
    c, _ = sample_calibration(tok, "tinystories", 4, 64, seed=4)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert pa["seed"] == 3 and pa["source"]["name"] == "tinystories"
    with pytest.raises(PrunetuneError, match="fewer than one window"):
        sample_calibration(tok, "tinystories", 1, 10**7)


def test_named_corpora_local(shared_data, stories):
    _, tok = stories
    from prunetune.data.sources import WIKITEXT_JOINING, wikitext_from_lines

    w = load_text("wikitext2")
    assert w.origin.endswith("wiki.test.raw") and w.joining == WIKITEXT_JOINING
    # the Hub's split (lines with blank separators) gives the same text as the local file: one name, one text
    lines = w.text.splitlines(keepends=True)
    hub_like = [x for line in lines for x in ("", line)] + [""]
    assert wikitext_from_lines(hub_like) == w.text
    c = load_text("c4")
    assert c.text.count("\n\n") >= 1999


def test_bos_modes_build_the_windows_they_say(stories_dir):
    from prunetune.evaluation.perplexity import default_bos, windows_of

    ids = torch.arange(1, 23)  # a stream that starts with BOS (id 1) and 21 text tokens
    w = windows_of(ids, 8, "stream", 1)
    assert w.shape == (2, 8) and w[0, 0] == 1 and torch.equal(w.flatten(), ids[:16])
    w = windows_of(ids, 8, "window", 1)
    assert w.shape == (3, 8) and bool((w[:, 0] == 1).all()) and torch.equal(w[:, 1:].flatten(), ids[1:22])
    w = windows_of(ids, 8, "none", 1)
    assert w.shape == (2, 8) and not bool((w == 1).any())
    with pytest.raises(PrunetuneError, match="no BOS token"):
        windows_of(ids, 8, "window", None)
    model, tok, _ = load_model(stories_dir)
    assert default_bos(model) == "stream"
    res = {b: perplexity(model, tok, "tinystories", seqlen=128, max_windows=4, progress=False, bos=b)
           for b in ("stream", "window")}
    assert res["window"]["protocol"]["bos_mode"] == "window" and res["window"]["tokens_scored"] == 4 * 127
    assert res["stream"]["ppl"] != res["window"]["ppl"]
