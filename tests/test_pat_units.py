"""PAT's mask over whole MLP neurons (``pat-units``): the exported smaller model computes what the masked,
LoRA-adapted model computes, loads in plain transformers, and ``merge`` rebuilds it from the adapters."""

import json

import pytest
import torch

from conftest import float_tol, save_tiny, weights
from prunetune.tuning.base import get_method


def test_export_equals_the_masked_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_model

    model = tiny_model("llama")
    tm = get_method("pat-units")(ratio=0.25, lora_r=4, mask_init="zero")
    model = tm.prepare(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "W_M" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tm.on_step_end(model, 10, 10)  # the last step: every gate is final (binary top-N_keep)
    model.eval()
    ids = torch.randint(0, 128, (2, 20), generator=g)
    with torch.no_grad():
        masked = model(ids).logits
    tm.export(model, tmp_path / "out")
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert small.config.intermediate_size == 40  # a quarter of the layer's weights: 24 of 64 neurons leave
    with torch.no_grad():
        out = small(ids).logits
    assert torch.allclose(masked, out, rtol=0, atol=float_tol(masked, 4096)), float((masked - out).abs().max())


def test_tune_exports_a_plain_smaller_model_and_merge_rebuilds_it(tmp_path):
    from transformers import AutoModelForCausalLM

    import prunetune as pt

    src = save_tiny("gemma3_text", tmp_path / "src")
    data = tmp_path / "t.txt"
    data.write_text("Once upon a time there was a cat who liked fish and milk. " * 120)
    rep = pt.tune(str(src), method="pat-units", data=str(data), out=str(tmp_path / "pu"), max_steps=4, seq_len=32,
                  batch_size=4, eval_size=4, ratio=0.25, lr=1e-3, device="cpu", progress=False,
                  calib="tinystories", calib_samples=4, calib_seqlen=32)
    assert rep["intermediate_size"] == 40 and rep["shrink"]["neurons_per_layer"] == {"before": 64, "after": 40}
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "pu")
    assert small.config.intermediate_size == 40
    assert sum(p.numel() for p in small.parameters()) == rep["parameters_after"]
    pt.merge(str(tmp_path / "pu"), out=str(tmp_path / "m"))
    a, b = weights(tmp_path / "pu"), weights(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "pu" / "tune_report.json").read_text())["method"] == "pat-units"


def test_bad_ratio_and_family_fail_cleanly(tmp_path):
    from prunetune.errors import PrunetuneError

    with pytest.raises(PrunetuneError, match="strictly between 0 and 1"):
        get_method("pat-units")(ratio=1.5)
    from conftest import tiny_model

    with pytest.raises(PrunetuneError, match="not supported for model type 'opt'"):
        get_method("pat-units")(ratio=0.25).check(tiny_model("opt"))
