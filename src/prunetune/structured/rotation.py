"""Rotation of the residual stream (computational invariance) for RMSNorm families — DESIGN.md §7.

Write RMSNorm as ``N(x) = g ⊙ x / rms(x)`` with ``rms(x) = sqrt(||x||² / d + ε)``. Two steps leave the function
of the model unchanged:

1. :func:`fuse_norms` folds every gain into the linears that read the norm's output (``W_r ← W_r diag(g)``:
   q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``, the LM head after the final
   norm) and sets the gains to 1. A tied LM head is untied when the final gain is not 1 (the head then
   differs from the embedding).
2. :func:`rotate` applies one orthogonal ``Q`` (d × d) to the whole residual stream, ``h' = h Q``. Since
   ``||h Q|| = ||h||``, a unit-gain RMSNorm commutes with ``Q``: ``N(h Q) = N(h) Q``. So: embedding ``E ← E Q``;
   every writer (``o_proj``, ``down_proj``) ``W_w ← Qᵀ W_w`` and ``b_w ← Qᵀ b_w`` (its output rows); every reader
   (q/k/v, gate/up) and the LM head ``W_r ← W_r Q`` (input columns; reader biases are unchanged).

``Q`` (:func:`principal_basis`) holds the eigenvectors of the residual-stream covariance
``C = Σ_norms Σ_tokens u uᵀ`` on calibration data, ordered by decreasing eigenvalue, where ``u`` is the input of
every RMSNorm (each layer's two norms and the final norm). Weighting ``"rms"`` (default) divides each ``u`` by
its own ``rms`` — exactly what the readers see — so the eigenvalue of a direction is the energy all readers
receive along it, and dropping the last ``k`` rotated channels loses ``Σ_{i>d−k} λ_i / Σ λ_i`` of that energy
(reported as ``energy_removed``). Weighting ``"raw"`` uses ``u`` as is (DESIGN.md §7's ``Σ h hᵀ``); then a few
tokens with very large residual norms (the first token of a window, late layers) dominate ``C``.

One global ``Q`` keeps the output a plain Hugging Face checkpoint of the same architecture. Per-layer
rotations (SliceGPT) fit each layer's inputs better but need ``Q_lᵀ Q_{l+1}`` on every residual connection,
an extra matrix that plain transformers cannot load; prunetune does not write such models.

Families: those whose adapter says which linears read each norm (``norm_readers``) and whose norms are
``g ⊙ x / rms(x)``: Llama, Mistral, Qwen2, Qwen3 (SmolLM2 included). Others are refused in one line.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PrunetuneError
from ..models import get_adapter
from ..models.base import _REGISTRY

WEIGHTINGS = ("rms", "raw")
#: calibration tokens needed per hidden channel for a stable covariance (below d the estimate is rank-deficient)
MIN_TOKENS_PER_CHANNEL = 2


def rotatable_families() -> list[str]:
    return sorted(t for t, cls in _REGISTRY.items() if cls.norm_kind == "rmsnorm" and cls.norm_readers)


def check_rotatable(model: nn.Module):
    """The model's adapter, or one clear line naming the families that can be rotated."""
    adapter = get_adapter(model)
    if adapter.norm_kind != "rmsnorm" or not adapter.norm_readers \
            or getattr(model.config, "rms_norm_eps", None) is None:
        raise PrunetuneError(
            f"rotating the residual stream needs an RMSNorm model whose norm outputs feed known linears; model "
            f"type '{model.config.model_type}' is not one (families that can: {', '.join(rotatable_families())})")
    return adapter


def _layer_norm_paths(adapter) -> list[str]:
    return [f"{adapter.layers_path}.{i}.{n}" for i in range(adapter.num_layers) for n in adapter.layer_norms] \
        + [adapter.final_norm_path]


def _untie_head(model: nn.Module, adapter) -> None:
    head = adapter.lm_head
    if head.weight is adapter.embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False


def _scale_columns(lin: nn.Module, g: torch.Tensor) -> None:
    w = lin.weight
    w.data.copy_((w.data.double() * g.to(w.device)).to(w.dtype))


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Fold every RMSNorm gain into the linears that read its output; the gains become 1 (same function)."""
    a = check_rotatable(model)
    for layer in a.layers:
        for norm_name, readers in a.norm_readers.items():
            norm = layer.get_submodule(norm_name)
            g = norm.weight.data.double()
            for r in readers:
                _scale_columns(layer.get_submodule(r), g)
            norm.weight.data.fill_(1.0)
    final = a.final_norm
    g = final.weight.data.double()
    if bool((g != 1).any()) and a.lm_head.weight is a.embedding.weight:
        _untie_head(model, a)
    _scale_columns(a.lm_head, g)
    final.weight.data.fill_(1.0)


class _Stop(Exception):
    pass


@torch.no_grad()
def residual_covariance(model: nn.Module, batches, weighting: str = "rms") -> tuple[torch.Tensor, int]:
    """``(C, tokens)``: the float64 covariance ``Σ_norms Σ_tokens u uᵀ`` of the RMSNorm inputs over the
    calibration ``batches`` (token-id tensors), and the number of tokens per norm."""
    if weighting not in WEIGHTINGS:
        raise PrunetuneError(f"unknown covariance weighting '{weighting}' (use {', '.join(WEIGHTINGS)})")
    a = check_rotatable(model)
    d = a.hidden_size
    C = torch.zeros(d, d, dtype=torch.float64)
    final = a.final_norm

    def hook(module, args):
        u = args[0].detach().reshape(-1, d).double()
        if weighting == "rms":
            u = u / u.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30)
        C.addmm_(u.t().cpu(), u.cpu())
        if module is final:
            raise _Stop

    handles = [model.get_submodule(p).register_forward_pre_hook(hook) for p in _layer_norm_paths(a)]
    was_training = model.training
    model.eval()
    device = a.embedding.weight.device
    tokens = 0
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return C, tokens


def principal_basis(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, λ)``: eigenvectors of the symmetric ``C`` as columns, by decreasing eigenvalue, each signed so its
    largest-magnitude entry is positive (the same ``Q`` on every machine, not up to sign)."""
    evals, evecs = torch.linalg.eigh(C.double())
    evals, evecs = evals.flip(0), evecs.flip(1)
    idx = evecs.abs().argmax(0)
    sign = torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
    sign[sign == 0] = 1
    return evecs * sign, evals.clamp_min(0)


@torch.no_grad()
def rotate(model: nn.Module, Q: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal ``Q`` in place (call :func:`fuse_norms` first: the norms
    must have unit gain). Products in float64, stored in each weight's dtype."""
    a = check_rotatable(model)
    d = a.hidden_size
    Q = Q.double().cpu()
    if Q.shape != (d, d):
        raise PrunetuneError(f"rotation must be {d} x {d} for this model (got {tuple(Q.shape)})")
    for norm in _layer_norm_paths(a):
        if bool((model.get_submodule(norm).weight != 1).any()):
            raise PrunetuneError(f"rotation needs unit norm gains: fold them first ('{norm}' is not 1)")

    def right(t):  # t Q (columns of readers, the embedding's rows, the head)
        t.data.copy_((t.data.double() @ Q.to(t.device)).to(t.dtype))

    def left(t):  # Qᵀ t (writer rows; a bias is a column)
        x = t.data.double()
        x = Q.to(t.device).t() @ x if x.dim() == 2 else x @ Q.to(t.device)
        t.data.copy_(x.to(t.dtype))

    tied = a.lm_head.weight is a.embedding.weight
    right(a.embedding.weight)
    for layer in a.layers:
        for w in a.residual_writers:
            lin = layer.get_submodule(w)
            left(lin.weight)
            if getattr(lin, "bias", None) is not None:
                left(lin.bias)
        for r in a.residual_readers:
            right(layer.get_submodule(r).weight)
    if not tied:
        right(a.lm_head.weight)


def rotate_model(model: nn.Module, batches, weighting: str = "rms") -> dict:
    """Fold the norms, estimate the covariance on ``batches`` and rotate ``model`` in place by its principal
    basis. Returns ``{"Q", "eigenvalues", "tokens", "weighting"}`` (``Q`` float64, columns by variance)."""
    a = check_rotatable(model)
    d = a.hidden_size
    need = MIN_TOKENS_PER_CHANNEL * d
    tokens = sum(int(b.numel()) for b in batches)
    if tokens < need:
        raise PrunetuneError(
            f"calibration has {tokens} tokens; a stable covariance of the {d}-channel residual stream needs at "
            f"least {need} ({MIN_TOKENS_PER_CHANNEL} x hidden size): raise --nsamples or --seqlen")
    fuse_norms(model)
    C, tokens = residual_covariance(model, batches, weighting)
    Q, evals = principal_basis(C)
    rotate(model, Q)
    return {"Q": Q, "eigenvalues": evals, "tokens": tokens, "weighting": weighting}


def energy_removed(eigenvalues: torch.Tensor, k: int) -> float:
    """Share of the covariance's energy in the directions after the first ``k``."""
    ev = eigenvalues.double()
    total = float(ev.sum())
    return float(ev[k:].sum()) / total if total > 0 else 0.0
