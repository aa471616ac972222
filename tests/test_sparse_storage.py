"""Sparse checkpoints stored compressed (sparse-bitmask): the layout, bit-exact round trips, every command
reading them, the conversion back to dense, and refusals that leave nothing behind."""

import json

import pytest
import torch

from conftest import assert_clean_error, weights
from prunetune import sparse_storage as ss
from prunetune.paths import DEFAULT_MODEL


def _canonical(t: torch.Tensor) -> torch.Tensor:
    return t + 0.0  # -0.0 -> +0.0, every other value unchanged


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --- one matrix ----------------------------------------------------------------------------------------------

def test_layout_is_compressed_tensors_sparse_bitmask():
    """Little-endian bits per row, values in row-major order, where each row's values start."""
    w = torch.zeros(3, 10)
    w[0, 0], w[0, 9], w[2, 3] = 1.5, -2.0, 3.0
    p = ss.compress(w)
    assert p["shape"].tolist() == [3, 10] and p["shape"].dtype == torch.int64
    assert p["bitmask"].dtype == torch.uint8 and p["bitmask"].tolist() == [[1, 2], [0, 0], [8, 0]]
    assert p["compressed"].tolist() == [1.5, -2.0, 3.0]
    assert p["row_offsets"].tolist() == [0, 2, 2]
    assert set(p) == set(ss.PARAMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [8, 13, 64])
def test_round_trip_is_bit_exact(dtype, cols):
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(17, cols, generator=g).to(dtype)
    w[torch.rand(17, cols, generator=g) < 0.6] = 0
    w[3] = 0  # an empty row
    w[5, 1] = -0.0
    back = ss.decompress(ss.compress(w))
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(_bits(back), _bits(_canonical(w)))
    assert ss.compressed_bytes(w) == sum(v.numel() * v.element_size() for v in ss.compress(w).values())


def test_damaged_bitmask_is_named():
    p = ss.compress(torch.eye(4))
    p["compressed"] = p["compressed"][:-1]
    with pytest.raises(ss.PrunetuneError, match="damaged sparse tensor"):
        ss.decompress(p)


# --- checkpoints --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same prune written dense and compressed."""
    from prunetune.api import prune

    root = tmp_path_factory.mktemp("storage")
    kw = dict(method="sparsegpt", sparsity=0.5, calib="tinystories", nsamples=4, seqlen=64, device="cpu",
              progress=False)
    dense = prune(DEFAULT_MODEL, out=root / "dense", **kw)
    comp = prune(DEFAULT_MODEL, out=root / "comp", save_format="compressed", **kw)
    return root, dense, comp


def test_compressed_prune_reads_back_bit_for_bit(pair):
    from prunetune.io import load_model

    root, dense, comp = pair
    st = comp["storage"]
    assert dense["storage"] == {"format": "dense"} and st["format"] == "sparse-bitmask"
    assert st["matrices"] == 35 and abs(st["sparsity"] - 0.5) < 0.01
    assert st["matrix_ratio"] < 0.6 and st["checkpoint_ratio"] < 1.0
    qc = json.loads((root / "comp" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["sparsity_config"]["format"] == "sparse-bitmask"
    assert len(qc["sparsity_config"]["targets"]) == 35
    stored = weights(root / "comp")
    assert not any(k.endswith("proj.weight") for k in stored)  # the decoder's matrices are stored compressed
    a, _, _ = load_model(root / "dense", tokenizer=False)
    b, _, info = load_model(root / "comp", tokenizer=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(_bits(_canonical(sa[k])), _bits(sb[k])), k
    assert info["path"] == str(root / "comp")


def test_every_command_reads_it_and_convert_gives_the_dense_checkpoint(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunetune.api import convert, evaluate, prune

    root, dense, comp = pair
    e1 = evaluate(root / "dense", ppl=["tinystories"], max_windows=2, device="cpu", progress=False)
    e2 = evaluate(root / "comp", ppl=["tinystories"], max_windows=2, device="cpu", progress=False)
    assert e1["perplexity"]["tinystories"]["ppl"] == e2["perplexity"]["tinystories"]["ppl"]
    # the streamed prune reads it too (a second, higher sparsity on top)
    rep = prune(root / "comp", method="magnitude", sparsity=0.7, out=tmp_path / "p70", device="cpu",
                calib="tinystories", nsamples=2, seqlen=32, progress=False)
    assert rep["manifest"]["model"]["path"] == str(root / "comp")
    back = convert(root / "comp", out=tmp_path / "back", save_format="dense")
    assert back["format"] == "dense"
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in cfg
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "back")  # plain transformers, no prunetune
    ref = weights(root / "dense")
    for k, v in plain.state_dict().items():
        if k in ref:
            assert torch.equal(_bits(_canonical(ref[k])), _bits(v)), k
    again = convert(tmp_path / "back", out=tmp_path / "again", save_format="compressed")
    assert again["matrices"] == 35
    assert weights(tmp_path / "again").keys() == weights(root / "comp").keys()


def test_spp_merge_stored_compressed_keeps_the_pattern(pair, tmp_path):
    from prunetune.api import tune
    from prunetune.io import load_model

    root, _, _ = pair
    data = tmp_path / "t.txt"
    data.write_text("Once upon a time there was a little dog. " * 200)
    rep = tune(root / "comp", method="spp", data=str(data), out=tmp_path / "spp", merge=True, max_steps=2,
               seq_len=64, batch_size=2, eval_size=2, device="cpu", progress=False, save_format="compressed")
    assert rep["storage"]["format"] == "sparse-bitmask" and rep["sparsity"]["after_merge"] == rep["sparsity"]["before"]
    base, _, _ = load_model(root / "comp", tokenizer=False)
    tuned, _, _ = load_model(tmp_path / "spp", tokenizer=False)
    tb = dict(tuned.named_parameters())
    for name, p in base.named_parameters():
        if name.endswith("proj.weight"):
            assert torch.equal(p == 0, tb[name] == 0), name


def test_refusals_leave_nothing(tmp_path):
    from test_tune_cli import in_process

    out = tmp_path / "x"
    p = in_process("convert", DEFAULT_MODEL, "--out", out, "--save-format", "compressed")
    assert_clean_error(p, "no matrix of this model is sparse enough")
    assert not any(tmp_path.iterdir())
    data = tmp_path / "t.txt"
    data.write_text("Once upon a time. " * 50)
    p = in_process("tune", "--model", DEFAULT_MODEL, "--method", "lora", "--data", data, "--merge",
                   "--save-format", "compressed", "--out", out)
    assert_clean_error(p, "lora does not keep the input's zeros")
    p = in_process("tune", "--model", DEFAULT_MODEL, "--method", "spp", "--data", data,
                   "--save-format", "compressed", "--out", out)
    assert_clean_error(p, "add --merge")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.txt"]
