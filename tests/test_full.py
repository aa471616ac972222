"""Full fine-tuning (``tune --method full``): every decoder weight trains, the embeddings stay unless asked,
the export is the plain model, and ``merge`` rebuilds it from the saved weights."""

import torch

from conftest import weights
from prunetune.paths import DEFAULT_MODEL


def test_full_tuning_trains_the_decoder_and_merge_rebuilds_it(tmp_path):
    import prunetune as pt

    data = tmp_path / "t.txt"
    data.write_text("Once upon a time there was a little dog who liked to run in the park. " * 150)
    rep = pt.tune(str(DEFAULT_MODEL), method="full", data=str(data), out=str(tmp_path / "f"), merge=True,
                  max_steps=3, seq_len=64, batch_size=4, eval_size=4, lr=1e-3, device="cpu", progress=False)
    assert rep["final_loss"] < rep["first_loss"]
    before, after = weights(DEFAULT_MODEL), weights(tmp_path / "f")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k in changed for k in before if ".layers." in k and k.endswith("proj.weight"))
    assert not any("embed" in k for k in changed)  # frozen by default
    pt.merge(str(tmp_path / "f"), out=str(tmp_path / "m"))
    again = weights(tmp_path / "m")
    assert all(torch.equal(again[k], after[k]) for k in after)
