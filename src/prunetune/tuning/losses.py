"""Language-model losses computed from the final hidden states in chunks of positions.

A batch of 8 × 256 tokens over a 49k vocabulary is 400 MB of float32 logits, and autograd keeps them (and
their softmax) for the backward; a 262k vocabulary makes it 2.1 GB. Here the model returns its final hidden
states instead of logits (:func:`hidden_states_out` swaps the output head for an identity while the forward
runs) and :func:`lm_loss` turns them into logits a chunk of positions at a time, computing the loss *and its
gradient with respect to the hidden states* in the same pass. Only that gradient (positions × hidden) is
kept for the backward, never the logits, so memory no longer grows with the vocabulary and nothing is
computed twice. The head's own weights are frozen in every tuning method (they get no gradient).

Losses over the ``n`` positions whose label is not ``-100`` (the task loss's positions), summed:

    CE  = Σ −log softmax(z_s)[y]
    KD  = T² · Σ KL(softmax(z_t / T) ‖ softmax(z_s / T))                      (teacher logits z_t, no gradient)
    L   = α · KD + (1 − α) · CE                                                (α = 0 without a teacher)

Gradients (per position, before the head): ``∂CE/∂z_s = softmax(z_s) − onehot(y)``,
``∂KD/∂z_s = T · (softmax(z_s / T) − softmax(z_t / T))``; a final logit soft-cap ``c · tanh(z / c)`` (Gemma-2)
multiplies them by ``1 − tanh²``. Everything runs in float32 whatever the model's dtype (float64 for
float64 models).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: float32 logits per chunk (64 MB, and one more copy): 341 positions of a 49k vocabulary, 64 of a 262k one
CHUNK_LOGITS = 1 << 24


def chunk_positions(vocab: int) -> int:
    return max(16, CHUNK_LOGITS // max(1, int(vocab)))


@dataclass
class Head:
    """What turns final hidden states into logits: ``cap · tanh((h Wᵀ + b) / cap)`` (no cap: ``h Wᵀ + b``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(h)
        z = F.linear(h.to(dt), self.weight.to(dt), None if self.bias is None else self.bias.to(dt))
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (tests check the algebra there)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _owner(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if child is module:
                return m, child_name
    raise RuntimeError("the output head is not a submodule of the model")


def _softcap_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and getattr(c, "final_logit_softcapping", None):
            return c
    return None


@contextmanager
def hidden_states_out(model: nn.Module):
    """Within the block the model's forward returns its final hidden states as ``.logits``; yields the
    :class:`Head` that turns them into the logits it would have returned."""
    head_module = model.get_output_embeddings()
    if head_module is None or not isinstance(getattr(head_module, "weight", None), torch.Tensor):
        raise RuntimeError("the model has no output head with a weight")
    owner, name = _owner(model, head_module)
    cap_cfg = _softcap_config(model)
    cap = float(cap_cfg.final_logit_softcapping) if cap_cfg is not None else None
    head = Head(head_module.weight, getattr(head_module, "bias", None), cap)
    setattr(owner, name, nn.Identity())
    if cap_cfg is not None:
        cap_cfg.final_logit_softcapping = None
    try:
        yield head
    finally:
        setattr(owner, name, head_module)
        if cap_cfg is not None:
            cap_cfg.final_logit_softcapping = cap


def _chunk_terms(z: torch.Tensor, y: torch.Tensor, zt: torch.Tensor | None, alpha: float, T: float,
                 want_grad: bool):
    """Sums of CE and KD over a chunk of logits ``z`` (n, V), and ``∂L/∂z`` when asked."""
    logp = torch.log_softmax(z, dim=-1)
    ce = -logp.gather(1, y.unsqueeze(1)).sum()
    kd = z.new_zeros(())
    grad = None
    if want_grad:
        grad = logp.exp_()  # softmax(z), in place of logp (not needed any more)
        grad[torch.arange(y.numel(), device=z.device), y] -= 1.0
        grad.mul_(1.0 - alpha)
    del logp
    if zt is not None:
        logq_t = torch.log_softmax(zt / T, dim=-1)
        logq_s = torch.log_softmax(z / T, dim=-1)
        q_t = logq_t.exp()
        kd = (T * T) * (q_t * (logq_t - logq_s)).sum()
        if want_grad:
            grad.add_((logq_s.exp_() - q_t).mul_(alpha * T))
    return ce, kd, grad


class _FusedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, targets, teacher_h, head, teacher_head, alpha, T, chunk):
        want_grad = ctx.needs_input_grad[0]
        n = h.shape[0]
        ce_sum = torch.zeros((), dtype=torch.float64, device=h.device)
        kd_sum = torch.zeros((), dtype=torch.float64, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        dev = h.device.type
        with torch.autocast(dev, enabled=False):
            for c0 in range(0, n, chunk):
                sl = slice(c0, c0 + chunk)
                z = head(h[sl])
                zt = None
                if teacher_h is not None:
                    with torch.no_grad():
                        zt = teacher_head(teacher_h[sl])
                ce, kd, g = _chunk_terms(z, targets[sl], zt, alpha, T, want_grad)
                ce_sum += ce.double()
                kd_sum += kd.double()
                if want_grad:
                    if head.softcap:
                        g.mul_(1.0 - (z / head.softcap).pow_(2))
                    grad_h[sl] = (g @ head.weight.to(g.dtype)).to(h.dtype)
                del z, zt, g
        total = (1.0 - alpha) * ce_sum + alpha * kd_sum
        ctx.save_for_backward(grad_h if want_grad else None)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return total.to(_compute_dtype(h)), ce_sum, kd_sum

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kd):
        (grad_h,) = ctx.saved_tensors
        return (None if grad_h is None else grad_h * g_total.to(grad_h.dtype)), None, None, None, None, None, \
            None, None


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Head, *, teacher_hidden: torch.Tensor | None = None,
            teacher_head: Head | None = None, alpha: float = 0.0, temperature: float = 1.0,
            chunk: int | None = None):
    """``(L, CE, KD)`` summed over the positions that predict a label (next-token shift included).

    ``hidden`` (batch, seq, d) final hidden states of the student (``labels`` aligned with the inputs, ``-100``
    ignored); ``teacher_hidden`` (batch, seq, d_t) the teacher's, with its own ``teacher_head``. ``L`` carries
    the gradient; ``CE`` and ``KD`` (float64) are for logging. ``alpha`` is 0 without a teacher."""
    if teacher_hidden is None:
        alpha = 0.0
    if head.weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("lm_loss computes no gradient for the output head; freeze it")
    tgt = labels[:, 1:]
    keep = tgt != -100
    h = hidden[:, :-1][keep]
    th = teacher_hidden[:, :-1][keep] if teacher_hidden is not None else None
    chunk = chunk or chunk_positions(head.weight.shape[0])
    return _FusedLMLoss.apply(h, tgt[keep], th, head, teacher_head, float(alpha), float(temperature),
                              max(1, int(chunk)))
