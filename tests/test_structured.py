"""Structured shrink: rotation of the residual stream (same function), the rotated one-shot shrink, and the
plain smaller checkpoints it writes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from prunetune.errors import PrunetuneError
from prunetune.paths import DEFAULT_MODEL
from prunetune.structured.rotation import (fuse_norms, principal_basis, residual_covariance, rotatable_families,
                                           rotate, rotate_model)

from conftest import assert_clean_error, run_cli, save_tiny

#: float32 round-off: transformers' RMSNorm normalises in float32 even in a float64 model
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(family: str, tied: bool):
    kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=128, tie_word_embeddings=tied)
    if family == "qwen3":
        return T.Qwen3Config(head_dim=8, **kw)
    return {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family](**kw)


def _model(family: str, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(_config(family, tied)).double().eval()
    with torch.no_grad():  # gains far from 1, and biases where the family has them, so folding is exercised
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(std=0.1)
    return m


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_rotation_changes_nothing(family, tied):
    m = _model(family, tied)
    ids = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
        info = rotate_model(m, [ids[:2], ids[2:]])
        out = m(ids).logits
    Q = info["Q"]
    assert torch.allclose(Q.t() @ Q, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert bool((info["eigenvalues"][:-1] >= info["eigenvalues"][1:]).all())
    # every norm gain is 1 now and the weights did change
    assert all(bool((p == 1).all()) for n, p in m.named_parameters() if "norm" in n and "q_norm" not in n
               and "k_norm" not in n)
    assert not torch.allclose(m.model.embed_tokens.weight, _model(family, tied).model.embed_tokens.weight)
    tol = 64 * EPS32 * float(ref.abs().max())
    assert float((out - ref).abs().max()) <= tol


def test_fold_then_rotate_by_any_orthogonal_matrix_and_save(tmp_path):
    """The rotation need not be the principal one; the rotated model saves and loads as a plain checkpoint."""
    m = _model("llama", tied=True)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids).logits
        fuse_norms(m)
        assert not m.config.tie_word_embeddings  # the final gain is not 1: the head is untied
        Q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
        rotate(m, Q)
        m.save_pretrained(tmp_path)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
        out = back(ids).logits
    assert float((out - ref).abs().max()) <= 64 * EPS32 * float(ref.abs().max())


def test_principal_basis_is_the_covariance_eigenbasis_with_a_fixed_sign():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 6, dtype=torch.float64, generator=g) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])
    C = A.t() @ A
    Q, ev = principal_basis(C)
    assert torch.allclose(Q @ torch.diag(ev) @ Q.t(), C, atol=1e-9 * float(C.abs().max()))
    assert bool((ev[:-1] >= ev[1:]).all())
    Q2, _ = principal_basis(C.clone())
    assert torch.equal(Q, Q2)
    assert bool((Q[Q.abs().argmax(0), torch.arange(6)] > 0).all())


def test_covariance_weighting_rms_counts_each_token_once():
    m = _model("llama", tied=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    C, n = residual_covariance(m, [ids], "rms")
    # 2 layer norms per layer + the final norm, each token's input scaled to rms 1: trace = d per token per norm
    assert n == 20 and abs(float(C.trace()) - 32 * 20 * 5) < 1e-6 * 32 * 20 * 5


def test_rotation_refuses_layernorm_families_and_small_calibration():
    opt = AutoModelForCausalLM.from_config(T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32))
    with pytest.raises(PrunetuneError, match="families that can: .*llama"):
        rotate_model(opt, [torch.zeros(1, 8, dtype=torch.long)])
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(rotatable_families())
    with pytest.raises(PrunetuneError, match="needs at least 64"):
        rotate_model(_model("llama", False), [torch.zeros(1, 8, dtype=torch.long)])


def test_shrink_cli_writes_a_smaller_plain_model_and_pca_beats_the_channel_baseline(tmp_path):
    """The rotated shrink drops directions of least variance; on stories260K (in-domain text) it loses less
    than removing the raw channels of least energy, and the folder is a plain checkpoint with its protocol."""
    from prunetune.api import evaluate, shrink

    common = dict(ratio=0.25, calib="tinystories", nsamples=8, seqlen=128, device="cpu", progress=False)
    pca = shrink(DEFAULT_MODEL, out=tmp_path / "pca", method="pca", **common)
    act = shrink(DEFAULT_MODEL, out=tmp_path / "act", method="activation", **common)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "pca")
    assert m.config.hidden_size == 48 and not m.config.tie_word_embeddings
    rep = json.loads((tmp_path / "pca" / "shrink_report.json").read_text())
    assert rep["shrink"]["hidden_size"] == 48 and 0 < rep["shrink"]["energy_in_removed_directions"] < 0.25
    assert rep["calibration"]["nsamples"] == 8 and rep["manifest"]["peak_rss_mb"] > 0
    from prunetune.io import usual_file_mode

    assert (tmp_path / "pca" / "model.safetensors").stat().st_mode & 0o777 == usual_file_mode()
    man = json.loads((tmp_path / "pca" / "prunetune_manifest.json").read_text())
    assert man["source_model"] == str(DEFAULT_MODEL.resolve())
    ppl = {k: evaluate(str(tmp_path / k), ppl=["tinystories"], seqlen=256, progress=False)
           ["perplexity"]["tinystories"]["ppl"] for k in ("pca", "act")}
    assert ppl["pca"] < ppl["act"], ppl
    assert pca["shrink"]["hidden_size"] == act["shrink"]["hidden_size"] == 48
    # the rotation adds no operation: the same modules and tensors as the plain channel removal
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "act")
    assert [type(x).__name__ for x in m.modules()] == [type(x).__name__ for x in a.modules()]
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in a.state_dict().items()}


def test_shrink_bad_inputs_are_one_clear_line(tmp_path):
    opt = save_tiny("opt", tmp_path / "tiny-opt")
    base = ["shrink", "--calib", "tinystories", "--nsamples", "2", "--seqlen", "32", "--device", "cpu"]
    cases = [
        (["--ratio", "1.5"], ("ratio", "between 0 and 1")),
        (["--ratio", "0"], ("ratio", "between 0 and 1")),
        (["--ratio", "0.25", "--model", opt], ("rmsnorm",)),
        (["--ratio", "0.25", "--nsamples", "1", "--seqlen", "16"], ("16 tokens", "needs at least 128")),
    ]
    for extra, needles in cases:
        out = tmp_path / "o"
        p = run_cli(*base, *extra, "--out", out)
        assert p.returncode == 2, p.stderr
        assert_clean_error(p, *needles)
        assert not out.exists() and not list(tmp_path.glob(".o*"))
