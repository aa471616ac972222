"""Adapters: replaying decoder layers on cached inputs reproduces the model, for every family."""

import pytest
import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.io import load_model
from prunetune.models import get_adapter

from conftest import FAMILIES, float_tol, tiny_model


def _replay(model, ids):
    """Every layer replayed on cached inputs with its own recorded arguments: the input of each layer (and the
    last output) must equal the model's own hidden states."""
    a = get_adapter(model)
    with torch.no_grad():
        inp = a.first_layer_inputs([ids], "cpu")
        h = inp.hidden[0]
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        inputs, outputs = [], []
        for layer, kw in zip(a.layers, a.kwargs_to(inp.layer_kwargs, "cpu")):
            inputs.append(h)
            h = a.run_layer(layer, h, kw)
            outputs.append(h)
    return a, h, ref, (inputs, outputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_replay_matches_model(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 40))  # longer than the sliding window of the alternating families
    a, h, ref, (inputs, outputs) = _replay(model, ids)
    # transformers records each layer's input (Mamba: each layer's output), then the final norm's output
    seq = outputs if family == "mamba" else inputs
    for i, x in enumerate(seq):
        assert torch.allclose(x, ref[i], atol=float_tol(ref[i]), rtol=0), (family, i, (x - ref[i]).abs().max())
    # hidden_states[-1] is after the final norm for most families; compare through it
    out = a.final_norm(h) if a.final_norm_path else model.model.norm(h)  # discovered families: no adapter knows it
    assert torch.allclose(out, ref[-1], atol=float_tol(ref[-1]), rtol=0), (out - ref[-1]).abs().max()
    for name, lin in a.linears(a.layers[0]).items():
        assert isinstance(lin, nn.Linear), name
    assert a.embedding.weight.shape[0] == model.config.vocab_size


def test_stories260k_adapter(stories_dir):
    model, tok, info = load_model(stories_dir)
    assert info["model_type"] == "llama" and info["parameters"] == 260_032
    a, h, ref, _ = _replay(model, tok("Once upon a time", return_tensors="pt").input_ids)
    assert torch.allclose(a.final_norm(h), ref[-1], atol=float_tol(ref[-1]), rtol=0)
    assert a.num_layers == 5
    # GQA: k/v project to 4 heads x 8, q to 8 x 8
    lin = a.linears(a.layers[0])
    assert lin["self_attn.k_proj"].out_features == 32 and lin["self_attn.q_proj"].out_features == 64
    assert model.config.tie_word_embeddings and a.lm_head.weight.data_ptr() == a.embedding.weight.data_ptr()


def test_unknown_architecture():
    class Fake(nn.Module):
        class config:
            model_type = "mysterynet"

    with pytest.raises(PrunetuneError, match="cannot find the decoder layers of model type .mysterynet."):
        get_adapter(Fake())


def test_models_that_are_not_decoder_only_are_refused_from_the_config(tmp_path):
    """An encoder-decoder, an encoder and an unknown expert layout: one clear line, before any weight is read."""
    import transformers as T

    from conftest import assert_clean_error, run_cli

    T.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8).save_pretrained(tmp_path / "t5")
    T.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64).save_pretrained(tmp_path / "enc")
    for d in ("t5", "enc"):
        (tmp_path / d / "model.safetensors").write_bytes(b"not read")  # a weight file that must not be opened
    args = ["prune", "--method", "wanda", "--sparsity", "0.5", "--calib", "tinystories", "--nsamples", "2",
            "--seqlen", "32", "--device", "cpu"]
    assert_clean_error(run_cli(*args, "--model", tmp_path / "t5", "--out", tmp_path / "o"), "encoder-decoder")
    assert_clean_error(run_cli(*args, "--model", tmp_path / "enc", "--out", tmp_path / "o"),
                       "not a causal language model")
    assert not (tmp_path / "o").exists()


def test_pat_refuses_sandwich_norm_families_naming_them():
    from prunetune.tuning.methods.pat import PATMethod

    for family in ("gemma2", "gemma3_text"):
        with pytest.raises(PrunetuneError, match="post_feedforward_layernorm"):
            PATMethod(ratio=0.25).check_structure(tiny_model(family))
