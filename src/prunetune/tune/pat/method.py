"""PAT as a tuning method of the shared training loop: config, validation, injection, losses, export.

Hook contract (what a training loop calls; ``step`` counts optimiser steps from 0)::

    model = method.prepare(model)                         # validate, inject LoRA + HSMs, freeze the rest
    params = method.trainable_parameters(model)           # LoRA A/B, every L0/L1/v, W_M (unless frozen)
    for step in range(total_steps):
        method.on_step_begin(model, step, total_steps)    # sets the mask schedule for this step's forward
        loss = task_loss(model(...))
        extra, logs = method.extra_loss(model, step, total_steps)   # also sets the step (idempotent)
        (loss + extra).backward(); optimiser step
        method.on_step_end(model, step + 1, total_steps)  # step + 1 = steps done; at total_steps the
                                                          # gate is finalised to exactly N_keep channels
    method.export(model, out_dir, tokenizer)              # shrink to a plain hidden-size-k checkpoint

A loop that skips ``on_step_begin`` still gets the right schedule: ``on_step_end(model, s + 1, ...)``
leaves the step at ``s + 1`` for the next forward, and ``extra_loss`` sets it again.

Validation rules (each a one-line ``PrunetuneError``): the ratio must lie strictly between 0 and 1; the model
must use RMSNorm (a LayerNorm subtracts the mean, which mixes every channel, so a zero channel does not
stay zero); ``N_keep = round((1 − ratio) · d)`` must remove at least one channel and keep at least
``num_attention_heads`` channels, and moves to the nearest hidden size plain transformers can load for the
family (``keep_count``). That head rule is a floor, not a tuning choice: q/k/v keep their
``heads · head_dim`` outputs but now read only ``k`` inputs, so ``rank(W_q') ≤ k``; below one input direction
per head the heads can no longer attend independently.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import PrunetuneError
from ...models import get_adapter
from ..trainer import TuningMethod
from .hsm import PATModules, default_rank
from .mask import TAU_HARD, n_keep_for
from .shrink import PAT_ATTR, choose_hidden_size, find_pat, loadable_hidden_size, save_shrunk, shrink_model

log = logging.getLogger("prunetune")

ADAPTER_FILE = "pat_adapters.safetensors"
MASK_INITS = ("zero", "activation")
CONFIG_FILE = "pat_config.json"


@dataclass
class PATConfig:
    ratio: float = 0.25                #: fraction of hidden channels removed
    hio_rank: int | None = None        #: r of D = I + L1 diag(v) L0; None: round(5% of d), at least 1
    milestone_frac: float = 1 / 3      #: s0 = round(milestone_frac · total_steps), at least 1
    active_weight: float = 1.0         #: weight of L_active
    identity_loss: bool = True
    identity_weight: float = 1.0
    frozen_mask: bool = False          #: ablation: a fixed block (the last d − N_keep channels) fades out
    mask_init: str = "zero"            #: "zero" (W_M = 0) or "activation" (warm start from channel energy)
    mask_init_scale: float = 0.1       #: spread of the warm-started W_M (per standardised log-energy unit):
                                       #: small, so the gate stays near-uniform (a no-op behind RMSNorm)
                                       #: early and the weak channels fade as τ(s) grows towards s0; 0.5
                                       #: distorted the model from step 1 (BENCHMARKS.md §5)
    lora_r: int = 8                    #: 0 disables LoRA (HSMs only)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio) or not 0 < self.ratio < 1:
            raise PrunetuneError(f"PAT ratio must be strictly between 0 and 1 (got {self.ratio})")
        if self.hio_rank is not None and int(self.hio_rank) < 1:
            raise PrunetuneError(f"PAT hio_rank must be at least 1 (got {self.hio_rank})")
        if not 0 < self.milestone_frac <= 1:
            raise PrunetuneError(f"PAT milestone_frac must be in (0, 1] (got {self.milestone_frac})")
        if self.mask_init not in MASK_INITS:
            raise PrunetuneError(f"PAT mask_init must be one of {', '.join(MASK_INITS)} (got {self.mask_init})")
        if not (isinstance(self.mask_init_scale, (int, float)) and math.isfinite(self.mask_init_scale)
                and self.mask_init_scale > 0):
            raise PrunetuneError(f"PAT mask_init_scale must be positive (got {self.mask_init_scale})")
        if self.mask_init != "zero" and self.frozen_mask:
            raise PrunetuneError("PAT: a frozen mask has no learned W_M to initialise (drop --mask-init)")
        if self.lora_r < 0:
            raise PrunetuneError(f"LoRA r must be 0 (off) or positive (got {self.lora_r})")
        if not 0 <= self.lora_dropout < 1:
            raise PrunetuneError(f"LoRA dropout must be in [0, 1) (got {self.lora_dropout})")


def check_model(model: nn.Module, config: PATConfig) -> tuple[int, int]:
    """Validate a model for PAT; returns ``(d, n_keep)``."""
    adapter = get_adapter(model)
    if adapter.norm_kind != "rmsnorm":
        raise PrunetuneError(
            f"PAT needs RMSNorm (model type '{model.config.model_type}' uses {adapter.norm_kind}, which mixes "
            "channels, so pruned channels would not stay zero)"
        )
    if getattr(model.config, "rms_norm_eps", None) is None:
        raise PrunetuneError(f"PAT needs RMSNorm with 'rms_norm_eps' in the config ({model.config.model_type})")
    d = adapter.hidden_size
    n_keep = keep_count(model.config, d, config.ratio, what="PAT ratio")
    r = config.hio_rank if config.hio_rank is not None else default_rank(d)
    if r > d:
        raise PrunetuneError(f"PAT hio_rank {r} exceeds the hidden size {d}")
    return d, n_keep


def warm_start(scores: torch.Tensor | None, n_keep: int, scale: float) -> torch.Tensor:
    """``W_M`` from channel importance: ``scale · (z − θ)`` with ``z`` the standardised log-energy and ``θ``
    halfway between the ``n_keep``-th and the next score, so exactly the ``n_keep`` most important channels
    start live (``L_active = 0``). As ``τ(s)`` grows the gate ``sigmoid(τ W_M)`` closes on the weakest
    channels first, so the model adapts while they fade; near-ties stay close to 0 and training decides them.
    (With ``W_M`` near 0, as from a zero init, the gate is uniform until ``s0`` and the whole cut happens at
    once: a uniform gate is a no-op behind RMSNorm.)"""
    if scores is None:
        raise PrunetuneError("PAT mask_init='activation' needs channel scores (computed by tune() from the data)")
    z = torch.log(scores.double().clamp_min(1e-30))
    z = (z - z.mean()) / z.std().clamp_min(1e-12)
    top = torch.sort(z, descending=True).values
    theta = (top[n_keep - 1] + top[n_keep]) / 2 if n_keep < z.numel() else top[-1] - 1
    return (scale * (z - theta)).float()


def keep_count(model_config, d: int, ratio: float, what: str = "ratio") -> int:
    """Channels kept at ``ratio``: ``round((1 − ratio) · d)``, moved to the nearest hidden size that plain
    transformers can load for this family (Llama: a multiple of ``num_attention_heads``; a warning says so).
    At least ``num_attention_heads`` channels: q/k/v keep their ``heads · head_dim`` outputs but read only
    ``k`` inputs, so below one input direction per head the heads cannot attend independently."""
    target = n_keep_for(d, ratio)
    if target >= d:
        raise PrunetuneError(f"{what} {ratio} removes no channel of hidden size {d}")
    heads = int(getattr(model_config, "num_attention_heads", 1) or 1)
    if target < heads:
        raise PrunetuneError(
            f"{what} {ratio} keeps {target} of {d} hidden channels; at least {heads} "
            f"(num_attention_heads) are needed (ratio ≤ {1 - heads / d:.4f})"
        )
    if loadable_hidden_size(model_config, target):
        return target
    k = choose_hidden_size(model_config, target, heads)
    if k is None:
        raise PrunetuneError(f"{what} {ratio}: no hidden size below {d} that this model family can load")
    log.warning("%s %s: keeping %d of %d channels instead of %d (removed share %.4f): %s configs need a hidden "
                "size that is a multiple of %s", what, ratio, k, d, target, 1 - k / d, model_config.model_type,
                "num_attention_heads" if k % heads == 0 else "a family-specific step")
    return k


def hsm_paths(model: nn.Module) -> list[str]:
    """Module paths whose outputs get an HSM: the token embedding, then each layer's residual writers."""
    a = get_adapter(model)
    return [a.embed_path] + [f"{a.layers_path}.{i}.{w}" for i in range(a.num_layers) for w in a.residual_writers]


def lora_paths(model: nn.Module) -> list[str]:
    a = get_adapter(model)
    return [f"{a.layers_path}.{i}.{n}" for i in range(a.num_layers) for n in a.linear_names()]


class PATMethod(TuningMethod):
    """Pruning-aware tuning: LoRA on every decoder linear + HSMs with one shared channel mask."""

    name = "pat"
    find_unused_parameters = False

    def __init__(self, config: PATConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise TypeError("pass either a PATConfig or keyword arguments, not both")
        self.config = config if config is not None else PATConfig(**kwargs)
        #: channel importance (d,) for ``mask_init="activation"``; set by the caller before ``prepare``
        self.init_scores: torch.Tensor | None = None

    def fingerprint(self) -> dict:
        return {"method": self.name, **asdict(self.config)}

    # --- setup ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        if isinstance(getattr(model, PAT_ATTR, None), PATModules):
            raise PrunetuneError("this model is already prepared for PAT")
        d, n_keep = check_model(model, cfg)
        was_training = model.training
        r = cfg.hio_rank if cfg.hio_rank is not None else default_rank(d)
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.lora_r > 0:
            from peft import LoraConfig, inject_adapter_in_model

            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              bias="none", target_modules=lora_paths(model))
            model = inject_adapter_in_model(lcfg, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        emb = get_adapter(model).embedding.weight
        pat = PATModules(d, r, n_keep, hsm_paths(model), frozen=cfg.frozen_mask,
                         milestone_frac=cfg.milestone_frac, device=emb.device)
        if cfg.mask_init == "activation" and self.init_scores is not None:  # merge/resume load W_M instead
            with torch.no_grad():
                pat.mask.W_M.copy_(warm_start(self.init_scores, n_keep, cfg.mask_init_scale).to(pat.mask.W_M))
        model.add_module(PAT_ATTR, pat)
        pat.attach(model)  # after LoRA: the hooks sit on the LoRA-wrapped writers
        model.train(was_training)  # injected modules (LoRA dropout) follow the model's mode
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # --- per step ------------------------------------------------------------------------------
    def _set_step(self, model, step, total_steps) -> PATModules:
        pat = find_pat(model)
        pat.mask.set_schedule(total_steps)
        pat.mask.set_step(step)
        return pat

    def on_step_begin(self, model: nn.Module, step: int, total_steps: int) -> None:
        self._set_step(model, step, total_steps)

    def extra_loss(self, model: nn.Module, step: int, total_steps: int):
        """``(w_a · L_active + w_i · L_identity, logs)``; sets the mask schedule to ``step`` as well."""
        pat = self._set_step(model, step, total_steps)
        l_active = pat.mask.active_loss()
        loss = self.config.active_weight * l_active
        if self.config.identity_loss:
            l_id = pat.identity_loss()
            loss = loss + self.config.identity_weight * l_id
        else:
            l_id = torch.zeros((), device=l_active.device)
        t = pat.mask.tau
        logs = {"live": pat.mask.live_count(), "tau": TAU_HARD if math.isinf(t) else t, "beta": pat.mask.beta,
                "l_active": float(l_active.detach()), "l_identity": float(l_id.detach())}
        return loss, logs

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        pat = self._set_step(model, step, total_steps)
        if step >= total_steps:
            pat.mask.finalize()

    # --- persistence ---------------------------------------------------------------------------
    def _meta(self, model) -> dict:
        pat = find_pat(model)
        return {"config": asdict(self.config), "hidden_size": pat.mask.d, "n_keep": pat.mask.n_keep,
                "hio_rank": pat.hsms[0].r if len(pat.hsms) else None, "hsm_paths": pat.paths}

    @staticmethod
    def _adapter_state(model) -> dict:
        return {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith(PAT_ATTR + ".")}

    def save_adapters(self, model: nn.Module, directory) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self._adapter_state(model).items()}
        save_file(state, str(d / ADAPTER_FILE))
        (d / CONFIG_FILE).write_text(json.dumps(self._meta(model), indent=1))

    def load_adapters(self, model: nn.Module, directory) -> None:
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / ADAPTER_FILE).is_file() or not (d / CONFIG_FILE).is_file():
            raise PrunetuneError(f"no PAT adapters in {d} (need {ADAPTER_FILE} and {CONFIG_FILE})")
        saved = json.loads((d / CONFIG_FILE).read_text())
        mine = self._meta(model)
        for key in ("hidden_size", "n_keep", "hio_rank", "hsm_paths"):
            if saved.get(key) != mine[key]:
                raise PrunetuneError(f"PAT adapters in {d} do not match this model/config ({key} differs)")
        state = load_file(str(d / ADAPTER_FILE))
        expected = set(self._adapter_state(model))
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise PrunetuneError(f"PAT adapters in {d} do not match the model ({what})")
        model.load_state_dict(state, strict=False)

    # --- the end -------------------------------------------------------------------------------
    def export(self, model: nn.Module, out_dir, tokenizer=None) -> nn.Module:
        """Finalise the gate, shrink to hidden size ``N_keep`` and save a plain checkpoint atomically."""
        shrunk = shrink_model(model)
        save_shrunk(shrunk, tokenizer, out_dir)
        return shrunk
