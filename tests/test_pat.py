"""PAT: the mask schedule, HSMs, losses, validation and the exact shrink to a plain smaller checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from prunetune.errors import PrunetuneError
from prunetune.paths import DEFAULT_MODEL
from prunetune.tuning.methods.pat import PATConfig, PATMethod, UnifiedMask, find_pat, shrink_model
from prunetune.tuning.methods.pat.mask import beta, milestone, tau

from conftest import float_tol, tiny_model

#: PAT as published (no rotation, W_M = 0): these tests drive the method without tune()'s calibration setup
PUBLISHED = dict(rotate=False, mask_init="zero")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: one thread is faster than two, and far faster on a shared, loaded machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _llama(seed=0, **over):
    kw = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, tie_word_embeddings=True, max_position_embeddings=256)
    kw.update(over)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(T.LlamaConfig(**kw)).eval()


def _stories():
    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()


def _train(method, model, steps, vocab, seed=0, lr=2e-2):
    """A few real AdamW steps on random tokens, calling the hooks like the shared loop does."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=lr)
    model.train()
    history = []
    for s in range(steps):
        method.on_step_begin(model, s, steps)
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        out = model(input_ids=ids, labels=ids)
        extra, logs = method.extra_loss(model, s, steps)
        loss = out.loss + extra
        assert torch.isfinite(loss), (s, logs)
        loss.backward()
        for p in method.trainable_parameters(model):
            assert p.grad is None or torch.isfinite(p.grad).all()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(model, s + 1, steps)
        history.append(logs)
    model.eval()
    return history


# --- the mask schedule ----------------------------------------------------------------------------

def test_schedule_formulas_are_finite_at_the_edges():
    assert tau(0, 10) == 0.0 and beta(0, 10) == 0.5
    assert tau(1, 10) == pytest.approx(1.0) and beta(1, 10) == pytest.approx(0.4)
    assert tau(5, 10) == pytest.approx(1 / (1 - math.log(5) / math.log(10)))
    assert math.isinf(tau(10, 10)) and beta(10, 10) == 0.0
    # s0 = 1: only step 0 lies before the milestone, no division by ln 1
    assert milestone(2, 1 / 3) == 1 and tau(0, 1) == 0.0 and math.isinf(tau(1, 1))
    assert milestone(0, 1 / 3) == 1 and milestone(30, 1 / 3) == 10


def test_mask_is_one_at_step_zero_binary_after_milestone_and_exact_at_the_end():
    torch.manual_seed(0)
    m = UnifiedMask(20, 15)
    m.set_schedule(30)  # s0 = 10
    with torch.no_grad():
        m.W_M.copy_(torch.randn(20) * 3)
    m.set_step(0)
    assert torch.equal(m(), torch.ones(20))
    for s in (1, 5, 9):
        m.set_step(s)
        g = m()
        assert torch.isfinite(g).all() and (g >= 0).all() and (g <= 1.5).all()
    top15 = torch.zeros(20)
    top15[torch.topk(m.W_M.detach(), 15).indices] = 1.0
    for s in (10, 20, 29):  # from the milestone on: exactly the top N_keep, whatever the sign of W_M
        m.set_step(s)
        g = m()
        assert torch.equal(g.detach(), top15) and m.live_count() == 15 and m.active_loss().item() == 0.0
    keep = m.finalize()
    assert keep.numel() == 15 and m.live_count() == 15
    assert torch.equal(keep, torch.sort(torch.topk(m.W_M.detach(), 15).indices).values)
    assert m().sum().item() == 15 and m.active_loss().item() == 0.0


def test_ties_go_to_the_lower_channel_index():
    m = UnifiedMask(10, 4)
    with torch.no_grad():
        m.W_M.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert m.keep_indices().tolist() == [0, 1, 2, 4]
    assert UnifiedMask(8, 3).keep_indices().tolist() == [0, 1, 2]  # all zero: the first N_keep


def test_active_loss_straight_through_gradient():
    m = UnifiedMask(16, 12)
    loss = m.active_loss()  # W_M = 0: no channel live, |12 - 0| / 12
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    # d/dW |N - Σ 1[W>0]| / N with the sigmoid surrogate: -sign(N - live) σ'(W) / N = -0.25 / 12
    assert torch.allclose(m.W_M.grad, torch.full((16,), -0.25 / 12))
    m.W_M.grad = None
    with torch.no_grad():
        m.W_M.fill_(1.0)  # all 16 live: too many, push down
    m.active_loss().backward()
    s = torch.sigmoid(torch.tensor(1.0))
    assert torch.allclose(m.W_M.grad, torch.full((16,), float(s * (1 - s)) / 12))


# --- HSMs, losses and validation ---------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_step_zero_model_is_unchanged_and_losses_are_finite(which):
    make = (lambda: _llama()) if which == "tiny" else _stories
    base = make()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    method = PATMethod(**PUBLISHED, ratio=0.25, lora_r=4)
    model = method.prepare(make())
    pat = find_pat(model)
    n_layers = base.config.num_hidden_layers
    assert len(pat.hsms) == 2 * n_layers + 1
    method.on_step_begin(model, 0, 12)
    for mode in ("eval", "train"):  # LoRA dropout is harmless at init (B = 0)
        getattr(model, mode)()
        torch.manual_seed(0)
        out = model(input_ids=ids, labels=ids)
        assert torch.allclose(out.logits, ref, atol=float_tol(ref), rtol=0), (out.logits - ref).abs().max()
    extra, logs = method.extra_loss(model, 0, 12)
    assert torch.isfinite(extra) and math.isfinite(logs["l_identity"]) and logs["tau"] == 0.0
    (out.loss + extra).backward()
    params = method.trainable_parameters(model)
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert pat.mask.W_M.grad is not None  # the task loss and L_active reach the mask
    # only LoRA, HSM and mask parameters train
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("prunetune_pat.") for n in names)
    assert any(".embed_tokens" in n for n, _ in model.named_parameters()) and not any(
        "embed_tokens" in n for n in names)


def test_identity_loss_sums_over_every_hsm():
    method = PATMethod(**PUBLISHED, ratio=0.25, lora_r=0)
    model = method.prepare(_llama())
    pat = find_pat(model)
    total = pat.identity_loss()
    parts = [h.identity_loss() for h in pat.hsms]
    assert len(parts) == 5 and torch.allclose(total, torch.stack(parts).sum())
    for i in (0, 1, len(parts) - 1):  # the embedding HSM, the first layer's o_proj, the last writer
        with torch.no_grad():
            pat.hsms[i].L0.mul_(2.0)
        after = pat.identity_loss()
        assert after.item() != pytest.approx(total.item())
        assert after.item() == pytest.approx(total.item() - parts[i].item() + pat.hsms[i].identity_loss().item())
        with torch.no_grad():
            pat.hsms[i].L0.mul_(0.5)
    # exactly orthonormal factors: the loss is 0 and its gradient finite
    h = pat.hsms[0]
    with torch.no_grad():
        h.L0.copy_(torch.eye(h.d)[: h.r])
        h.L1.copy_(torch.eye(h.d)[:, : h.r])
    li = h.identity_loss()
    li.backward()
    assert li.item() < 1e-5 and torch.isfinite(h.L0.grad).all() and torch.isfinite(h.L1.grad).all()


def test_hsm_applies_after_lora_on_the_writers():
    method = PATMethod(**PUBLISHED, ratio=0.5, lora_r=4, lora_dropout=0.0)
    model = method.prepare(_llama())
    pat = find_pat(model)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert hasattr(o_proj, "lora_A")  # peft wrapped the writer; the hook sits on the wrapper
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        pat.mask.W_M.copy_(torch.arange(32.0) - 20)  # keeps the 16 largest: channels 16..31
    pat.mask.finalize()
    x = torch.randn(3, o_proj.in_features)
    with torch.no_grad():
        z = o_proj(x)
        base = o_proj.get_base_layer()(x)
    assert torch.count_nonzero(z[:, :16]) == 0
    with torch.no_grad():
        h = pat.hsms[1]
        assert pat.paths[1].endswith("layers.0.self_attn.o_proj")
        delta = o_proj.lora_B["default"](o_proj.lora_A["default"](x)) * o_proj.scaling["default"]
        expect = h.apply_d(base + delta) * pat.mask()
    assert torch.allclose(z, expect, atol=float_tol(expect), rtol=0)


def test_layernorm_model_is_refused():
    with pytest.raises(PrunetuneError, match="PAT needs RMSNorm"):
        PATMethod(**PUBLISHED, ratio=0.25).prepare(tiny_model("opt"))


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, float("nan")])
def test_bad_ratios_are_refused(ratio):
    with pytest.raises(PrunetuneError, match="ratio"):
        PATMethod(**PUBLISHED, ratio=ratio)


def test_ratios_the_model_cannot_take_are_refused():
    # stories260K: d = 64, 8 heads. ratio 0.9 keeps round(6.4) = 6 < 8 channels
    with pytest.raises(PrunetuneError, match="num_attention_heads"):
        PATMethod(**PUBLISHED, ratio=0.9).prepare(_stories())
    PATMethod(**PUBLISHED, ratio=0.875, lora_r=0).prepare(_stories())  # keeps exactly 8: allowed
    with pytest.raises(PrunetuneError, match="removes no channel"):
        PATMethod(**PUBLISHED, ratio=0.005).prepare(_llama())  # round(0.995 * 32) = 32
    with pytest.raises(PrunetuneError, match="already prepared"):
        m = PATMethod(**PUBLISHED, ratio=0.25, lora_r=0)
        m.prepare(m.prepare(_llama()))


# --- training and the exact shrink ---------------------------------------------------------------------

def _check_shrink(method, model, base_params, tmp_path, vocab, generate=False):
    pat = find_pat(model)
    assert pat.mask.finalized and pat.mask.live_count() == pat.mask.n_keep
    k = pat.mask.n_keep
    ids = torch.randint(0, vocab, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    out = tmp_path / "shrunk"
    method.export(model, out)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__.endswith("ForCausalLM")
    assert plain.config.hidden_size == k and plain.config.tie_word_embeddings is False
    assert plain.lm_head.weight.data_ptr() != plain.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in plain.parameters()) < base_params
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    diff = (got - masked).abs().max().item()
    assert diff <= 1e-4, diff
    if generate:  # the shrunk model still runs generation with its KV cache
        gen = plain.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert gen.shape == (1, 7)
    return plain


@pytest.mark.parametrize("variant", ["gqa_tied", "biases"])
def test_train_then_shrink_tiny_llama_is_exact(tmp_path, variant):
    over = {} if variant == "gqa_tied" else dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    base_params = sum(p.numel() for p in _llama(**over).parameters())
    method = PATMethod(**PUBLISHED, ratio=0.25, lora_r=4, hio_rank=3, milestone_frac=0.3)
    model = method.prepare(_llama(**over))
    hist = _train(method, model, 7, 128)
    assert hist[0]["tau"] == 0.0 and hist[-1]["tau"] > 1e3
    pat = find_pat(model)
    # training moved the learned scale and the low-rank factors, so the fold has real work to do
    assert any(not torch.allclose(h.v, torch.ones_like(h.v)) for h in pat.hsms)
    assert any(h.L1.abs().max() > 0 for h in pat.hsms)
    plain = _check_shrink(method, model, base_params, tmp_path, 128, generate=variant == "gqa_tied")
    assert plain.config.head_dim == 8 and plain.config.rms_norm_eps == pytest.approx(1e-6 * 32 / 24)


def test_train_then_shrink_stories260k_is_exact(tmp_path):
    base_params = sum(p.numel() for p in _stories().parameters())
    method = PATMethod(**PUBLISHED, ratio=0.25, lora_r=4)
    model = method.prepare(_stories())
    _train(method, model, 5, 512)
    plain = _check_shrink(method, model, base_params, tmp_path, 512)
    assert plain.config.hidden_size == 48 and plain.config.num_attention_heads == 8


def test_adapters_round_trip(tmp_path):
    method = PATMethod(**PUBLISHED, ratio=0.25, lora_r=4, hio_rank=2)
    model = method.prepare(_llama())
    _train(method, model, 3, 128)
    method.save_adapters(model, tmp_path / "ad")
    fresh = PATMethod(**PUBLISHED, ratio=0.25, lora_r=4, hio_rank=2)
    other = fresh.prepare(_llama())
    fresh.load_adapters(other, tmp_path / "ad")
    assert find_pat(other).mask.finalized
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, other(input_ids=ids).logits)
    wrong = PATMethod(**PUBLISHED, ratio=0.5, lora_r=4, hio_rank=2)
    with pytest.raises(PrunetuneError, match="do not match"):
        wrong.load_adapters(wrong.prepare(_llama()), tmp_path / "ad")


def test_frozen_mask_ablation_runs_and_shrinks(tmp_path):
    base_params = sum(p.numel() for p in _llama().parameters())
    method = PATMethod(**PUBLISHED, ratio=0.25, lora_r=4, frozen_mask=True, identity_loss=False)
    model = method.prepare(_llama())
    pat = find_pat(model)
    assert not any(p is pat.mask.W_M for p in method.trainable_parameters(model))
    hist = _train(method, model, 4, 128)
    assert all(h["l_active"] == 0.0 for h in hist)
    assert pat.mask.keep_indices().tolist() == list(range(24))  # the fixed block: the last 8 channels fade out
    _check_shrink(method, model, base_params, tmp_path, 128)


def test_warm_start_makes_exactly_the_top_channels_live_and_leaves_the_model_unchanged_at_step_0():
    from prunetune.tuning.methods.pat.method import warm_start

    model = _llama()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    scores = torch.rand(32) + 0.01
    m = PATMethod(PATConfig(ratio=0.25, rotate=False, mask_init="activation"))
    m.init_scores = scores
    model = m.prepare(model)
    pat = find_pat(model)
    live = torch.nonzero(pat.mask.W_M > 0).flatten()
    assert live.numel() == 24 and set(live.tolist()) == set(torch.topk(scores, 24).indices.tolist())
    assert float(pat.mask.active_loss().detach()) == 0.0
    m.on_step_begin(model, 0, 10)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - before).abs().max() < 1e-5
    with pytest.raises(PrunetuneError, match="needs channel scores"):
        warm_start(None, 24, 0.01)
    with pytest.raises(PrunetuneError, match="mask_init"):
        PATConfig(mask_init="random")


def test_kept_count_moves_to_a_hidden_size_transformers_can_load(tmp_path):
    """Llama configs need hidden_size % num_attention_heads == 0: ratio 0.2 of 32 (26 channels) becomes 28
    (nearest multiple of 4, ties to the larger); Qwen2 accepts 26 as is. Both shrink and load back."""
    from conftest import float_tol, tiny_model as tm

    for family, want in (("llama", 28), ("qwen2", 26)):
        model = tm(family)
        m = PATMethod(PATConfig(**PUBLISHED, ratio=0.2, lora_r=0))
        model = m.prepare(model)
        assert find_pat(model).mask.n_keep == want
        shrunk = shrink_model(model)
        shrunk.save_pretrained(tmp_path / family)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / family)
        assert back.config.hidden_size == want
