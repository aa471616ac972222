"""SPP adapters and the LoRA merge baselines, on the bundled stories260K (CPU, fp32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunetune.errors import PrunetuneError
from prunetune.models import get_adapter
from prunetune.paths import DEFAULT_MODEL

from conftest import float_tol
from prunetune.tuning.methods.lora import apply_lora, merge_lora
from prunetune.tuning.methods.spp import (
    SPPConfig, SPPLinear, SPPMethod, apply_spp, block_sizes, count_trainable, load_spp_state_dict,
    merge_spp, spp_modules, spp_state_dict, weight_sparsity,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared; one thread is much faster there
    yield
    torch.set_num_threads(n)


def load():
    m = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    return m.eval()


def prune_(model, kind):
    """Magnitude pruning in plain torch: 50% unstructured per matrix, or 2:4 along the input dimension."""
    with torch.no_grad():
        ad = get_adapter(model)
        for layer in ad.layers:
            for lin in ad.linears(layer).values():
                w = lin.weight
                if kind == "unstructured":
                    k = w.numel() // 2
                    thr = w.abs().flatten().kthvalue(k).values
                    w.mul_(w.abs() > thr)
                else:
                    g = w.abs().view(w.shape[0], -1, 4)
                    idx = g.topk(2, dim=-1, largest=False).indices
                    mask = torch.ones_like(g).scatter_(-1, idx, 0.0)
                    w.mul_(mask.view_as(w))
    return model


def ids(batch=2, seq=24, seed=0):
    return torch.randint(3, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_block_sizes_rule():
    assert block_sizes(172, 16) == [11] * 12 + [10] * 4  # first 172 % 16 = 12 blocks get one extra row
    assert block_sizes(64, 16) == [4] * 16
    assert block_sizes(10, 16) == [1] * 10  # g > out: one row per block
    for out, g in [(172, 16), (33, 5), (7, 7)]:
        assert sum(block_sizes(out, g)) == out
    lin = SPPLinear(torch.nn.Linear(8, 172, bias=False), SPPConfig(groups=16))
    a = lin.expanded_alpha()
    assert torch.equal(a[:11], lin.w_alpha[0].expand(11, 8))
    assert torch.equal(a[11 * 12:11 * 12 + 10], lin.w_alpha[12].expand(10, 8))
    assert torch.equal(a[-10:], lin.w_alpha[15].expand(10, 8))


def test_init_leaves_logits_unchanged_and_counts():
    m = load()
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
    apply_spp(m, SPPConfig())
    with torch.no_grad():
        out = m(x).logits
    assert torch.equal(out, ref)
    expected = 0
    mods = spp_modules(m)
    assert len(mods) == 5 * 7
    for mod in mods.values():
        expected += 16 * mod.in_features + mod.out_features
    assert count_trainable(m) == expected
    assert all(not p.requires_grad for n, p in m.named_parameters() if "w_alpha" not in n and "w_beta" not in n)


@pytest.mark.parametrize("shape", [(64, 64), (64, 32), (64, 172), (172, 64), (5, 3)])
@pytest.mark.parametrize("training", [False, True])
def test_materialise_and_grouped_agree(shape, training):
    torch.manual_seed(0)  # float64: the two forwards are the same algebra in another order
    base = torch.nn.Linear(*shape, bias=True, dtype=torch.float64)
    lin = SPPLinear(base, SPPConfig(groups=16, dropout=0.0))
    with torch.no_grad():
        lin.w_beta.normal_()
    lin.train(training)
    x = torch.randn(2, 7, shape[0], dtype=torch.float64)
    res = {}
    for mode in ("materialise", "grouped"):
        lin.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = lin(xx, mode=mode)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        res[mode] = (y.detach(), xx.grad, lin.w_alpha.grad.clone(), lin.w_beta.grad.clone())
    for a, b in zip(res["materialise"], res["grouped"]):
        torch.testing.assert_close(a, b, atol=float_tol(b), rtol=0)


def test_auto_mode_rule():
    lin = SPPLinear(torch.nn.Linear(4096, 11008, bias=False, device="meta"), SPPConfig())
    assert lin.choose_mode(256) == "grouped"
    assert lin.choose_mode(4096) == "materialise"


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_training_then_merge_keeps_pattern_and_logits(kind):
    torch.manual_seed(0)
    m = prune_(load(), kind)
    ad = get_adapter(m)
    masks = {(i, n): (lin.weight == 0).clone() for i, layer in enumerate(ad.layers)
             for n, lin in ad.linears(layer).items()}
    sp = weight_sparsity(m)
    assert 0.49 < sp <= 0.51
    apply_spp(m, SPPConfig())
    m.train()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
    for s in range(4):
        x = ids(seed=s)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(mod.w_beta.abs().max() > 0.05 for mod in spp_modules(m).values())  # really trained
    m.double().eval()  # merged vs adapted is algebra: compare it in float64
    x = ids(seed=99)
    with torch.no_grad():
        adapted = m(x).logits
    merge_spp(m)
    assert not spp_modules(m)
    with torch.no_grad():
        merged = m(x).logits
    torch.testing.assert_close(merged, adapted, atol=float_tol(adapted), rtol=0)
    changed = 0
    for i, layer in enumerate(ad.layers):
        for n, lin in ad.linears(layer).items():
            assert type(lin) is torch.nn.Linear
            assert torch.equal(lin.weight == 0, masks[(i, n)]), (i, n)
            if kind == "2:4":
                zeros_per_group = (lin.weight == 0).view(lin.weight.shape[0], -1, 4).sum(-1)
                assert (zeros_per_group >= 2).all()
            changed += 1
    assert changed == 35


def test_state_dict_roundtrip_and_mismatch():
    torch.manual_seed(0)
    m1 = apply_spp(load(), SPPConfig())
    with torch.no_grad():
        for mod in spp_modules(m1).values():
            mod.w_beta.normal_()
    sd = spp_state_dict(m1)
    assert len(sd) == 70 and all(k.endswith(("w_alpha", "w_beta")) for k in sd)
    m2 = apply_spp(load(), SPPConfig())
    load_spp_state_dict(m2, sd)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(m1(x).logits, m2(x).logits, atol=0, rtol=0)
    sd.pop(next(iter(sd)))
    with pytest.raises(PrunetuneError):
        load_spp_state_dict(m2, sd)


def test_dense_model_warns_or_refuses():
    m = load()
    assert weight_sparsity(m) < 0.01
    warned = SPPMethod(SPPConfig()).check(m)
    assert len(warned) == 1 and "dense model" in warned[0]
    assert SPPMethod(on_dense="ignore").check(m) == []
    with pytest.raises(PrunetuneError, match="dense"):
        SPPMethod(SPPConfig(on_dense="error")).check(load())
    with pytest.raises(PrunetuneError):
        SPPConfig(forward="fast")
    with pytest.raises(PrunetuneError):
        apply_spp(load(), SPPConfig(), targets=["mlp.nope"])


@pytest.mark.parametrize("masked", [True, False])
def test_lora_masked_merge_keeps_pattern_plain_densifies(masked):
    torch.manual_seed(0)
    m = prune_(load(), "unstructured")
    ad = get_adapter(m)
    masks = [(lin.weight == 0).clone() for layer in ad.layers for lin in ad.linears(layer).values()]
    pm = apply_lora(m, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    base = merge_lora(pm, masked=masked)
    ad = get_adapter(base)
    lins = [lin for layer in ad.layers for lin in ad.linears(layer).values()]
    assert len(lins) == 35 and all(type(lin) is torch.nn.Linear for lin in lins)
    for lin, mask in zip(lins, masks):
        if masked:
            assert torch.equal(lin.weight == 0, mask)
        else:
            assert (lin.weight == 0).float().mean() < 0.01  # densified
