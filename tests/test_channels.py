"""Structured channel pruning (the PAT baselines): the shrunk model equals the masked model, the kept
channels are exactly the highest-scoring round((1 - ratio) d), bad input is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunetune.errors import PrunetuneError
from prunetune.models import get_adapter
from prunetune.paths import DEFAULT_MODEL
from prunetune.structured.channels import channel_scores, keep_channels, prune_channels, remove_channels

from conftest import tiny_model


def _masked_logits(model, keep, ids):
    """Reference: the original model with every non-kept channel zeroed at each residual-stream writer."""
    a = get_adapter(model)
    gate = torch.zeros(a.hidden_size)
    gate[keep] = 1.0
    paths = [a.embed_path] + [f"{a.layers_path}.{i}.{w}" for i in range(a.num_layers) for w in a.residual_writers]
    hs = [model.get_submodule(p).register_forward_hook(lambda m, i, o: o * gate) for p in paths]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("source", ["tiny", "stories"])
@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_shrunk_equals_masked_and_keeps_the_top_channels(source, importance):
    torch.manual_seed(0)
    model = tiny_model("llama") if source == "tiny" else AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
    vocab, d = model.config.vocab_size, model.config.hidden_size
    calib = torch.randint(0, vocab, (3, 16))
    ratio = 0.25
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrunk, info = prune_channels(model, ratio, importance=importance, calib=calib)
    k = round((1 - ratio) * d)
    assert shrunk.config.hidden_size == k == info["hidden_size"] == len(info["kept_channels"])
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in before.items())  # input model untouched
    scores = channel_scores(model, importance, calib)
    keep = torch.tensor(info["kept_channels"])
    dropped = torch.tensor(sorted(set(range(d)) - set(keep.tolist())))
    assert scores[keep].min() >= scores[dropped].max()
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        got = shrunk(input_ids=ids).logits
    ref = _masked_logits(model, keep, ids)
    assert (got - ref).abs().max() < 1e-4
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())


def test_activation_scores_are_the_rmsnorm_output_energy():
    """Independent reference: RMSNorm recomputed by hand from each norm's input."""
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (2, 10))
    a = get_adapter(model)
    ref = torch.zeros(a.hidden_size, dtype=torch.float64)
    norms = [n for layer in a.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(a.final_norm)

    def hook(m, inputs, _out):
        x = inputs[0].double()
        y = m.weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
        ref.add_(y.pow(2).sum((0, 1)))

    hs = [n.register_forward_hook(hook) for n in norms]
    with torch.no_grad():
        model(input_ids=calib)
    for h in hs:
        h.remove()
    ref /= calib.numel()
    scores = channel_scores(model, "activation", calib)
    assert torch.allclose(scores, ref, rtol=1e-5, atol=1e-8)


def test_bad_input_is_refused():
    model = tiny_model("llama")
    with pytest.raises(PrunetuneError, match="strictly between 0 and 1"):
        keep_channels(torch.ones(32), 1.0)
    with pytest.raises(PrunetuneError, match="calibration"):
        channel_scores(model, "activation", None)
    with pytest.raises(PrunetuneError, match="unknown channel importance"):
        channel_scores(model, "random", torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(PrunetuneError, match="distinct indices"):
        remove_channels(model, torch.tensor([0, 0, 1]))
    with pytest.raises(PrunetuneError, match="RMSNorm"):
        channel_scores(tiny_model("opt"), "magnitude")
