"""The chunked language-model loss: the same values and gradients as the full-logit computation (checked in
float64), with only a chunk of logits at a time."""

import pytest
import torch
import torch.nn.functional as F

from prunetune.tuning.losses import Head, hidden_states_out, lm_loss

from conftest import tiny_model


def _naive(h, labels, W, b, th, Wt, alpha, T, cap):
    def logits(x, w, bias):
        z = x @ w.t() + (0 if bias is None else bias)
        return cap * torch.tanh(z / cap) if cap else z

    z, zt = logits(h, W, b)[:, :-1], logits(th, Wt, None)[:, :-1]
    y = labels[:, 1:]
    m = y != -100
    ce = F.cross_entropy(z[m], y[m], reduction="sum")
    kd = T * T * F.kl_div(F.log_softmax(z[m] / T, -1), F.log_softmax(zt[m] / T, -1), log_target=True,
                          reduction="sum")
    return alpha * kd + (1 - alpha) * ce, ce, kd


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("alpha,T", [(0.0, 1.0), (1.0, 2.0), (0.3, 1.5)])
def test_loss_and_gradient_equal_the_full_logit_computation(cap, alpha, T):
    g = torch.Generator().manual_seed(0)
    B, S, d, dt, V = 2, 7, 5, 6, 11
    h = torch.randn(B, S, d, dtype=torch.float64, generator=g, requires_grad=True)
    th = torch.randn(B, S, dt, dtype=torch.float64, generator=g)
    W, Wt = torch.randn(V, d, dtype=torch.float64, generator=g), torch.randn(V, dt, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :3] = -100
    L, ce, kd = lm_loss(h, labels, Head(W, b, cap), teacher_hidden=th, teacher_head=Head(Wt, None, cap),
                        alpha=alpha, temperature=T, chunk=3)
    L.backward()
    grad = h.grad.clone()
    h.grad = None
    L2, ce2, kd2 = _naive(h, labels, W, b, th, Wt, alpha, T, cap)
    L2.backward()
    scale = float(L2.detach().abs()) + 1
    assert abs(float(L.detach() - L2.detach())) <= 1e-12 * scale
    assert abs(float(ce - ce2.detach())) <= 1e-12 * scale and abs(float(kd - kd2.detach())) <= 1e-12 * scale
    assert float((grad - h.grad).abs().max()) <= 1e-12 * float(h.grad.abs().max() + 1)


def test_model_returns_hidden_states_inside_the_block_and_the_head_is_restored():
    m = tiny_model("llama").double()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        with hidden_states_out(m) as head:
            hid = m(input_ids=ids).logits
        assert hid.shape == (2, 9, 32) and torch.allclose(head(hid), ref, atol=1e-12, rtol=0)
        assert torch.equal(m(input_ids=ids).logits, ref)


def test_only_a_chunk_of_logits_exists_at_a_time():
    """The head is applied to at most ``chunk`` positions per call."""
    rows = []

    class Spy(Head):
        def __call__(self, x):
            rows.append(x.shape[0])
            return super().__call__(x)

    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 33, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (4, 33), generator=g)
    L, _, _ = lm_loss(h, labels, Spy(torch.randn(50, 8, generator=g)), chunk=16)
    L.backward()
    assert max(rows) == 16 and sum(rows) == 4 * 32
