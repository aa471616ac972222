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

from ....errors import PrunetuneError
from ....models import get_adapter
from ....structured.slicing import by_rows, check_sliceable, keep_count
from ...base import TuningMethod, register
from .hsm import PATModules, default_rank
from .mask import TAU_HARD
from .shrink import PAT_ATTR, find_pat, save_shrunk, shrink_model

log = logging.getLogger("prunetune")

ADAPTER_FILE = "pat_adapters.safetensors"
ROTATION_FILE = "rotation.safetensors"
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
    mask_init: str | None = None       #: "zero" (W_M = 0, as published) or "activation" (warm start from
                                       #: channel energy); None: "activation", or "zero" with ``frozen_mask``
    mask_init_scale: float = 0.1       #: spread of the warm-started W_M (per standardised log-energy unit):
                                       #: small, so the gate stays near-uniform (a no-op behind RMSNorm)
                                       #: early and the weak channels fade as τ(s) grows towards s0; 0.5
                                       #: distorted the model from step 1 (BENCHMARKS.md §5)
    lora_r: int = 8                    #: 0 disables LoRA (HSMs only)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    rotate: bool = True                #: start from the model with its residual stream rotated to principal
                                       #: directions (same function; structured.rotation), so the mask ranks
                                       #: directions of decreasing variance instead of raw channels (default:
                                       #: 4.3x dense instead of 7.3x at 25%, BENCHMARKS.md §7); False: as published

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio) or not 0 < self.ratio < 1:
            raise PrunetuneError(f"PAT ratio must be strictly between 0 and 1 (got {self.ratio})")
        if self.hio_rank is not None and int(self.hio_rank) < 1:
            raise PrunetuneError(f"PAT hio_rank must be at least 1 (got {self.hio_rank})")
        if not 0 < self.milestone_frac <= 1:
            raise PrunetuneError(f"PAT milestone_frac must be in (0, 1] (got {self.milestone_frac})")
        if self.mask_init is None:
            self.mask_init = "zero" if self.frozen_mask else "activation"
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
    adapter = check_sliceable(model, "PAT")
    if config.rotate:
        from ....structured.rotation import check_rotatable

        check_rotatable(model)
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


def hsm_paths(model: nn.Module) -> list[str]:
    """Module paths whose outputs get an HSM: the token embedding, then each layer's residual writers."""
    a = get_adapter(model)
    return [a.embed_path] + [f"{a.layers_path}.{i}.{w}" for i in range(a.num_layers) for w in a.residual_writers]


@register
class PATMethod(TuningMethod):
    """PAT: LoRA + HSMs learn which hidden channels to drop; the result is a smaller plain model."""

    name = "pat"
    Config = PATConfig
    default_lr = 5e-5
    always_exports = True
    teacher_is_input = True
    cli_options = (
        ("--ratio", "ratio", {"type": float, "help": "pat: fraction of hidden channels removed, in (0, 1); pat-units: "
                                                    "share of decoder-layer weights removed as whole MLP neurons "
                                                    "(default 0.25)"}),
        ("--hio-rank", "hio_rank", {"type": int, "help": "rank of the identity operators (default 5%% of hidden size)"}),
        ("--milestone", "milestone_frac", {"type": float, "help": "fraction of the steps after which the mask is "
                                                                 "binary (default 1/3)"}),
        ("--no-identity-loss", "identity_loss", {"action": "store_false", "help": "drop the identity regulariser"}),
        ("--frozen-mask", "frozen_mask", {"action": "store_true", "help": "ablation: a fixed channel block instead "
                                                                         "of a learned mask"}),
        ("--mask-init", "mask_init", {"choices": list(MASK_INITS), "help": "W_M warm-started from each channel's "
                                      "activation energy on the calibration windows (--calib, or the first "
                                      "training examples; default) or 0 (as published; default with "
                                      "--frozen-mask)"}),
        ("--mask-init-scale", "mask_init_scale", {"type": float, "help": "spread of the warm-started mask logits "
                                                                         "(default 0.1)"}),
        ("--rotate", "rotate", {"action": "store_true", "help": "rotate the residual stream to its principal "
                                "directions (on the calibration windows) before training; same function "
                                "(default)"}),
        ("--no-rotate", "rotate", {"action": "store_false", "help": "train on the model as it is (as published)"}),
        ("--lora-r", "lora_r", {"type": int, "help": "LoRA rank (default 8)"}),
        ("--lora-alpha", "lora_alpha", {"type": float, "help": "LoRA alpha (default 16)"}),
        ("--lora-dropout", "lora_dropout", {"type": float, "help": "LoRA dropout (default 0.05)"}),
    )

    def __init__(self, config: PATConfig | None = None, **options):
        super().__init__(config, **options)
        #: channel importance (d,) for ``mask_init="activation"``; set by ``setup`` (or the caller) before ``prepare``
        self.init_scores: torch.Tensor | None = None
        #: the rotation applied by ``setup`` (float64 d × d), saved with the adapters
        self.rotation: torch.Tensor | None = None

    def check_structure(self, model):
        check_model(model, self.config)

    def check(self, model):
        check_model(model, self.config)
        return []

    def uses_calibration(self):
        return bool(self.config.rotate or self.config.mask_init == "activation")

    def setup(self, model, calibration):
        """Rotate the residual stream (``rotate``) and score the channels for the warm start, on the same
        calibration windows; returns what the report records."""
        info = {}
        if self.config.rotate:
            from ....structured.rotation import energy_removed, rotate_model

            r = rotate_model(model, calibration.windows())
            self.rotation = r["Q"]
            n_keep = check_model(model, self.config)[1]
            info["rotation"] = {"basis": "principal directions of the RMSNorm inputs (rms-weighted)",
                                "tokens": r["tokens"], "calibration": calibration.describe(),
                                "energy_in_removed_directions": energy_removed(r["eigenvalues"], n_keep)}
        if self.config.mask_init == "activation":
            from ....structured.channels import channel_scores

            self.init_scores = channel_scores(model, "activation", calibration.windows())
            info["mask_init"] = {"importance": "activation energy at every RMSNorm output",
                                 **calibration.describe()}
        return info or None

    def restore(self, model, directory):
        if not self.config.rotate:
            return
        from safetensors.torch import load_file

        from ....structured.rotation import fuse_norms, rotate

        f = Path(directory) / ROTATION_FILE
        if not f.is_file():
            raise PrunetuneError(f"PAT adapters in {directory} were trained on a rotated model but {ROTATION_FILE} "
                                 "is missing")
        self.rotation = load_file(str(f))["Q"]
        fuse_norms(model)
        rotate(model, self.rotation)

    # --- setup ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        if isinstance(getattr(model, PAT_ATTR, None), PATModules):
            raise PrunetuneError("this model is already prepared for PAT")
        d, n_keep = check_model(model, cfg)
        if cfg.rotate and self.rotation is None:
            raise PrunetuneError("PAT with rotate=True trains on the rotated model: call setup() with calibration "
                                 "windows first (tune() does), or use rotate=False")
        was_training = model.training
        r = cfg.hio_rank if cfg.hio_rank is not None else default_rank(d)
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.lora_r > 0:
            from peft import LoraConfig, inject_adapter_in_model

            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              bias="none", target_modules=get_adapter(model).linear_paths())
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
        if self.rotation is not None:
            save_file({"Q": self.rotation.contiguous()}, str(d / ROTATION_FILE))
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

    def stream_tensors(self, directory, base):
        """The smaller checkpoint tensor by tensor (``tuning/streamed.py``), the same arithmetic as ``export``:
        the base weight (folded and rotated when trained rotated), plus the LoRA update ``s · B A``, then the slice
        plan with each writer's ``D[keep, :]``."""
        from safetensors.torch import load_file

        from ....structured.slicing import SlicePlan, shrunk_config
        from ...streamed import AdapterTensors

        d = Path(directory)
        for f in (ADAPTER_FILE, CONFIG_FILE):
            if not (d / f).is_file():
                raise PrunetuneError(f"no PAT adapters in {d} (missing {f})")
        meta = json.loads((d / CONFIG_FILE).read_text())
        adapter = check_sliceable(base.model, "PAT")
        ad = AdapterTensors(d / ADAPTER_FILE)
        names = set(ad.keys())
        final = ad.get_tensor(f"{PAT_ATTR}.mask.final") if f"{PAT_ATTR}.mask.final" in names else None
        if final is not None and final.numel() == meta["hidden_size"]:
            keep = torch.nonzero(final > 0).flatten()
        else:
            from .mask import topk_keep

            keep = topk_keep(ad.get_tensor(f"{PAT_ATTR}.mask.W_M"), meta["n_keep"])
        hsm_of = {path: i for i, path in enumerate(meta["hsm_paths"])}

        def writer_rows(path):
            i = hsm_of[path]
            L0, L1, v = (ad.get_tensor(f"{PAT_ATTR}.hsms.{i}.{n}").double() for n in ("L0", "L1", "v"))
            rows = (L1[keep] * v) @ L0
            rows[torch.arange(keep.numel()), keep] += 1
            return rows

        plan = SlicePlan(adapter, keep, writer_rows)
        rotated = _RotatedBase(base, adapter, load_file(str(d / ROTATION_FILE))["Q"]) if self.config.rotate else None
        scaling = self.config.lora_alpha / self.config.lora_r if self.config.lora_r else 0.0

        def weight(key):
            t = rotated(key) if rotated is not None else base(key)
            mod = key[: -len(".weight")] if key.endswith(".weight") else None
            a_key = f"{mod}.lora_A.default.weight"
            if mod is not None and a_key in names:  # W + s · B A, as peft's get_delta_weight
                t = t + ((ad.get_tensor(f"{mod}.lora_B.default.weight") @ ad.get_tensor(a_key)) * scaling).to(t.dtype)
            return t

        def tensors():
            for key in base.keys():
                yield key, plan.tensor(key, weight(key))

        info = {"pat": {**plan.info(), "ratio_removed": 1 - plan.k / plan.d, "rotated": bool(self.config.rotate)}}
        return shrunk_config(base.config, plan.k), tensors(), info

    def result_warnings(self, report):
        hist = report.get("history") or []
        live = hist[-1].get("live") if hist else None
        target = (report.get("pat") or {}).get("hidden_size")
        if live is None or target is None or int(live) == int(target):
            return []
        return [f"the channel mask did not reach its target before the end: {int(live)} live channels for {target} "
                f"kept (the export keeps exactly {target}; train longer or move --milestone earlier)"]

    def export_info(self, merged):
        info = dict(getattr(merged, "_prunetune_shrink_info", {}) or {})
        return {"pat": {"hidden_size_before": info.get("hidden_size_before"), "hidden_size": info.get("hidden_size"),
                        "ratio_removed": info.get("ratio"), "kept_channels": info.get("kept_channels"),
                        "rotated": bool(self.config.rotate),
                        "parameters": sum(p.numel() for p in merged.parameters())}}


class _RotatedBase:
    """The base weights as ``structured.rotation`` leaves them (gains folded, stream rotated by ``Q``), tensor by
    tensor with the same casts: fold (float64, back to the dtype), then rotate (float64, back to the dtype)."""

    def __init__(self, base, adapter, Q):
        self.base, self.a, self.Q = base, adapter, Q.double()
        lp = adapter.layers_path
        self.reader_norm = {}
        for i in range(adapter.num_layers):
            for norm, readers in adapter.norm_readers.items():
                for r in readers:
                    self.reader_norm[f"{lp}.{i}.{r}.weight"] = f"{lp}.{i}.{norm}.weight"
        self.reader_norm[adapter.lm_head_path + ".weight"] = adapter.final_norm_path + ".weight"
        self.writers = {f"{lp}.{i}.{w}" for i in range(adapter.num_layers) for w in adapter.residual_writers}
        self.norms = set(self.reader_norm.values())

    def __call__(self, key):
        t = self.base(key)
        dt = t.dtype
        mod, _, pname = key.rpartition(".")
        if key in self.norms:
            return torch.ones_like(t)
        if key in self.reader_norm:  # a block of rows at a time: the LM head is vocabulary x d
            g = self.base(self.reader_norm[key]).double()
            t = by_rows(t, lambda x: x * g)
            return by_rows(t, lambda x: x @ self.Q)
        if key == self.a.embed_path + ".weight":
            return by_rows(t, lambda x: x @ self.Q)
        if mod in self.writers:
            x = t.double()
            return (self.Q.t() @ x if x.dim() == 2 else x @ self.Q).to(dt)
        return t
