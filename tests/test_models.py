"""Adapters: replaying decoder layers on cached inputs reproduces the model, for every family."""

import pytest
import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.io import load_model
from prunetune.models import get_adapter

from conftest import FAMILIES, tiny_model


def _replay(model, ids):
    a = get_adapter(model)
    with torch.no_grad():
        inp = a.first_layer_inputs([ids], "cpu")
        h = inp.hidden[0]
        for layer in a.layers:
            h = a.run_layer(layer, h, a.kwargs_to(inp.kwargs, "cpu"))
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    return a, h, ref


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_replay_matches_model(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 12))
    a, h, ref = _replay(model, ids)
    # hidden_states[-1] is after the final norm for most families; compare through it
    out = a.final_norm(h)
    assert torch.allclose(out, ref[-1], atol=1e-5), (out - ref[-1]).abs().max()
    for name, lin in a.linears(a.layers[0]).items():
        assert isinstance(lin, nn.Linear), name
    assert a.embedding.weight.shape[0] == model.config.vocab_size


def test_stories260k_adapter(stories_dir):
    model, tok, info = load_model(stories_dir)
    assert info["model_type"] == "llama" and info["parameters"] == 260_032
    a, h, ref = _replay(model, tok("Once upon a time", return_tensors="pt").input_ids)
    assert torch.allclose(a.final_norm(h), ref[-1], atol=1e-5)
    assert a.num_layers == 5
    # GQA: k/v project to 4 heads x 8, q to 8 x 8
    lin = a.linears(a.layers[0])
    assert lin["self_attn.k_proj"].out_features == 32 and lin["self_attn.q_proj"].out_features == 64
    assert model.config.tie_word_embeddings and a.lm_head.weight.data_ptr() == a.embedding.weight.data_ptr()


def test_unknown_architecture():
    class Fake(nn.Module):
        class config:
            model_type = "mysterynet"

    with pytest.raises(PrunetuneError, match="unsupported architecture 'mysterynet'"):
        get_adapter(Fake())
