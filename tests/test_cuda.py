"""On a CUDA GPU: the guarantees the CPU tests check, where the kernels differ (``pytest -m cuda``).

Skipped without a CUDA GPU; ``benchmarks/gpu_check.py`` runs them on a lent one. ``PRUNETUNE_TEST_DEVICE=cpu``
runs the device-generic ones on the CPU instead, which checks the tests themselves (the semi-structured 2:4
kernels exist only on a GPU and stay skipped there).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunetune.api import bench, prune, tune
from prunetune.paths import DEFAULT_MODEL
from prunetune.pruning.masks import is_nm_valid

from conftest import weights

DEVICE = os.environ.get("PRUNETUNE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CAL = dict(calib="tinystories", nsamples=8, seqlen=64, progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "apt"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_prune_on_the_device_is_exact_and_as_good_as_on_the_cpu(tmp_path, method, sparsity):
    """The device's masks hold the exact sparsity / N:M pattern, and its layer errors are the CPU run's up to
    rounding: the mean relative error within 2% of the CPU's (different summation orders move near-ties)."""
    dev = prune(DEFAULT_MODEL, method=method, sparsity=sparsity, out=tmp_path / "dev", device=DEVICE, **CAL)
    cpu = prune(DEFAULT_MODEL, method=method, sparsity=sparsity, out=tmp_path / "cpu", device="cpu", **CAL)
    assert dev["manifest"]["device"].startswith(DEVICE.split(":")[0])
    sd = weights(tmp_path / "dev")
    for r in dev["layers"]:
        w = sd[r["name"] + ".weight"]
        assert torch.isfinite(w).all(), r["name"]
        if sparsity == "2:4":
            assert is_nm_valid(w, 2, 4), r["name"]
        elif method == "wanda":  # per output row
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), r["name"]
        else:  # SparseGPT's block-wide threshold (APT keeps its mask): the share of each block, plus its threshold
            extra = (w == 0).sum().item() - w.numel() // 2
            assert 0 <= extra <= 2 * -(-w.shape[1] // 128), (r["name"], extra)
    d, c = dev["total"]["mean_rel_error"], cpu["total"]["mean_rel_error"]
    assert d <= 1.02 * c + 1e-7, (d, c)
    assert len(dev["manifest"]["layer_wall_time_s"]) == len(dev["layers"]) // 7


def test_activations_on_disk_give_the_same_model_on_the_device(tmp_path):
    prune(DEFAULT_MODEL, method="sparsegpt", sparsity="0.5", out=tmp_path / "ram", device=DEVICE, **CAL)
    rep = prune(DEFAULT_MODEL, method="sparsegpt", sparsity="0.5", out=tmp_path / "disk", device=DEVICE,
                cache_budget=0, **CAL)
    assert rep["activation_cache"]["in_ram"] is False
    a, b = weights(tmp_path / "ram"), weights(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TUNE = dict(data="tinystories", seq_len=64, batch_size=4, max_steps=3, eval_size=4, max_records=64, progress=False)


def test_spp_on_the_device_keeps_every_zero(tmp_path):
    pruned = tmp_path / "pruned"
    prune(DEFAULT_MODEL, method="wanda", sparsity="2:4", out=pruned, device="cpu", **CAL)
    rep = tune(pruned, method="spp", out=tmp_path / "spp", merge=True, device=DEVICE, **TUNE)
    assert rep["zero_pattern_check"]["identical"] and rep["zero_pattern_check"]["tensors_checked"] > 0
    base, merged = weights(pruned), weights(tmp_path / "spp")
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # training moved the weights
    for k, w in base.items():
        assert torch.equal(merged[k] == 0, w == 0), k


def test_pat_on_the_device_writes_the_smaller_plain_checkpoint(tmp_path):
    rep = tune(DEFAULT_MODEL, method="pat", ratio=0.25, lr=1e-3, out=tmp_path / "pat", device=DEVICE, **TUNE)
    assert rep["pat"]["hidden_size_before"] == 64 and rep["pat"]["hidden_size"] == 48
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "pat").eval()
    assert m.config.hidden_size == 48
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_semi_structured_2to4_kernels_compute_the_same_linears(tmp_path):
    """``bench --sparse-2to4``: every 2:4 linear converts, and the sparse kernel's output is the dense one's up to
    bfloat16 rounding."""
    if not DEVICE.startswith("cuda"):
        pytest.skip("semi-structured kernels need a CUDA GPU")
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(dense)
    sparse = tmp_path / "2of4"
    prune(dense, method="magnitude", sparsity="2:4", out=sparse, device=DEVICE, **CAL)
    res = bench([str(sparse)], batch_sizes=(1, 8), seq_lens=(128,), decode_tokens=8, repeats=2, dtype="bfloat16",
                device=DEVICE, sparse_2to4=True, progress=False)
    (rec,) = res["sparse_2to4"]["models"].values()
    assert rec["converted"] == 14 and not rec["not_converted"] and "end_to_end_error" not in rec, rec
    rows = rec["per_linear"]
    assert rows and all("error" not in r for r in rows), rows
    assert all(r["max_rel_diff"] <= 2 ** -6 for r in rows), rows
