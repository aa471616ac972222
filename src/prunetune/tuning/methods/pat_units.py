"""PAT over whole MLP neurons (``pat-units``): PAT's trainable mask, one per layer over that layer's neurons.

PAT (``methods/pat``) learns one mask over the hidden channels, shared by every writer of the residual stream.
Here the same gate (:class:`~.pat.mask.UnifiedMask`: soft ``sigmoid(τ W_M) + β`` that starts at exactly 1,
binary top-``N_keep`` from the milestone on, straight-through gradient, ``L_active`` before the milestone)
multiplies the input of every layer's MLP reader (``down_proj``), so each layer learns which of its neurons to
drop while LoRA on every linear trains with it. ``N_keep`` is the same in every layer (a plain config holds one
``intermediate_size``): ``ratio`` is the share of decoder-layer linear weights removed, as ``shrink --structure
mlp`` counts it (``structured.neurons.plan_for_ratio``).

Export: LoRA merged into every weight, then each layer keeps the rows ``keep`` of its MLP producers and the
columns ``keep`` of its reader, where ``keep`` is the finalised gate; a masked neuron contributes exactly zero to
the reader's input, so the smaller model computes what the masked model computes. The config gets the new
``intermediate_size``; the output is a plain checkpoint.

``mask_init="activation"`` (default) warm-starts ``W_M`` from each neuron's input-aware magnitude
``||W_down[:, j]||² E[a_j²]`` on the calibration windows (the ``magnitude`` selection of the one-shot shrink);
``"zero"`` starts every logit at 0, as PAT's paper.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import PrunetuneError
from ...models import get_adapter
from ..base import TuningMethod, register
from .pat.mask import TAU_HARD, UnifiedMask
from .pat.method import warm_start

ATTR = "prunetune_pat_units"
ADAPTER_FILE = "pat_units_adapters.safetensors"
CONFIG_FILE = "pat_units_config.json"
MASK_INITS = ("activation", "zero")


@dataclass
class PATUnitsConfig:
    ratio: float = 0.25                #: share of decoder-layer linear weights removed, as whole MLP neurons
    milestone_frac: float = 1 / 3      #: the mask is binary from round(milestone_frac · steps) on
    active_weight: float = 1.0         #: weight of L_active (mean over layers)
    mask_init: str = "activation"      #: "activation" (input-aware magnitude on calibration windows) | "zero"
    mask_init_scale: float = 0.1
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05

    def __post_init__(self):
        if not 0.0 < float(self.ratio) < 1.0:
            raise PrunetuneError(f"--ratio must lie strictly between 0 and 1 (got {self.ratio})")
        if self.mask_init not in MASK_INITS:
            raise PrunetuneError(f"unknown mask init '{self.mask_init}' (use {', '.join(MASK_INITS)})")
        if not 0.0 < float(self.milestone_frac) <= 1.0:
            raise PrunetuneError(f"--milestone must lie in (0, 1] (got {self.milestone_frac})")
        if int(self.lora_r) < 0:
            raise PrunetuneError(f"--lora-r must be non-negative (got {self.lora_r})")


class UnitMasks(nn.Module):
    """One :class:`UnifiedMask` per decoder layer, applied to that layer's MLP reader input by a pre-hook."""

    def __init__(self, n_layers: int, width: int, n_keep: int, milestone_frac: float, device=None):
        super().__init__()
        self.masks = nn.ModuleList(UnifiedMask(width, n_keep, milestone_frac=milestone_frac)
                                   for _ in range(n_layers))
        if device is not None:
            self.masks.to(device)
        self._hooks = []

    def attach(self, model: nn.Module, reader: str) -> None:
        adapter = get_adapter(model)
        for i, layer in enumerate(adapter.layers):
            mask = self.masks[i]

            def gate(mod, args, mask=mask):
                x = args[0]
                return (x * mask().to(x.dtype),) + tuple(args[1:])

            self._hooks.append(layer.get_submodule(reader).register_forward_pre_hook(gate))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def set_step(self, step: int, total_steps: int) -> None:
        for m in self.masks:
            m.set_schedule(total_steps)
            m.set_step(step)


def _find(model: nn.Module) -> UnitMasks:
    um = getattr(model, ATTR, None)
    if not isinstance(um, UnitMasks):
        raise PrunetuneError("this model was not prepared for pat-units (no neuron masks found)")
    return um


def _plan(model: nn.Module, ratio: float):
    from ...structured.neurons import geometry, plan_for_ratio

    adapter = get_adapter(model)
    geo = geometry(model.config, adapter)
    plan = plan_for_ratio(model.config, ratio, "mlp")
    if not 0 < plan.neurons < geo.intermediate:
        raise PrunetuneError(f"--ratio {ratio} removes {plan.neurons} of {geo.intermediate} neurons per layer")
    return adapter, geo, plan


@torch.no_grad()
def _merge_lora(model: nn.Module) -> None:
    """Fold every injected LoRA into its base linear and put the plain linear back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            for a in mod.active_adapters:
                if a in mod.lora_A:
                    base.weight += mod.get_delta_weight(a).to(base.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, base)


@register
class PATUnitsMethod(TuningMethod):
    """PAT's trainable mask over each layer's MLP neurons, with LoRA; the result is a plain, smaller model."""

    name = "pat-units"
    Config = PATUnitsConfig
    default_lr = 2e-4
    always_exports = True
    teacher_is_input = True
    cli_options = (
        ("--ratio", "ratio", {"type": float, "help": "share of decoder-layer weights removed as whole MLP neurons "
                                                    "(default 0.25)"}),
        ("--milestone", "milestone_frac", {"type": float, "help": "fraction of the steps after which the mask is "
                                                                 "binary (default 1/3)"}),
        ("--mask-init", "mask_init", {"choices": list(MASK_INITS),
                                      "help": "W_M warm-started from each neuron's input-aware magnitude on the "
                                              "calibration windows (default), or 0"}),
        ("--mask-init-scale", "mask_init_scale", {"type": float, "help": "spread of the warm-started mask logits "
                                                                         "(default 0.1)"}),
        ("--lora-r", "lora_r", {"type": int, "help": "LoRA rank (default 8)"}),
        ("--lora-alpha", "lora_alpha", {"type": float, "help": "LoRA alpha (default 16)"}),
        ("--lora-dropout", "lora_dropout", {"type": float, "help": "LoRA dropout (default 0.05)"}),
    )

    def __init__(self, config: PATUnitsConfig | None = None, **options):
        super().__init__(config, **options)
        self.init_scores: list[torch.Tensor] | None = None

    def check_structure(self, model):
        _plan(model, self.config.ratio)

    def check(self, model):
        _plan(model, self.config.ratio)
        return []

    def uses_calibration(self):
        return self.config.mask_init == "activation"

    @torch.no_grad()
    def setup(self, model, calibration):
        """Input-aware magnitude of every neuron of every layer on the calibration windows (the warm start)."""
        if self.config.mask_init != "activation":
            return None
        adapter = get_adapter(model)
        reader = adapter.mlp_units[0]
        sq = [None] * len(adapter.layers)
        count = [0]
        hooks = []
        for i, layer in enumerate(adapter.layers):
            def acc(mod, args, i=i):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                s = (x * x).sum(0)
                sq[i] = s if sq[i] is None else sq[i] + s
                if i == 0:
                    count[0] += x.shape[0]
            hooks.append(layer.get_submodule(reader).register_forward_pre_hook(acc))
        was = model.training
        model.eval()
        dev = adapter.embedding.weight.device
        try:
            for w in calibration.windows():
                model(w.to(dev))
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        self.init_scores = []
        for i, layer in enumerate(adapter.layers):
            W = layer.get_submodule(reader).weight.detach().double()
            self.init_scores.append(((W * W).sum(0) * sq[i] / max(1, count[0])).float().cpu())
        return {"mask_init": {"importance": "||W_down[:, j]||^2 E[a_j^2] per layer", **calibration.describe()}}

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        if isinstance(getattr(model, ATTR, None), UnitMasks):
            raise PrunetuneError("this model is already prepared for pat-units")
        adapter, geo, plan = _plan(model, cfg.ratio)
        n_keep = geo.intermediate - plan.neurons
        was_training = model.training
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.lora_r > 0:
            from peft import LoraConfig, inject_adapter_in_model

            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              bias="none", target_modules=adapter.linear_paths())
            model = inject_adapter_in_model(lcfg, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        um = UnitMasks(len(adapter.layers), geo.intermediate, n_keep, cfg.milestone_frac,
                       device=adapter.embedding.weight.device)
        if self.init_scores is not None:
            with torch.no_grad():
                for m, s in zip(um.masks, self.init_scores):
                    m.W_M.copy_(warm_start(s, n_keep, cfg.mask_init_scale).to(m.W_M))
        model.add_module(ATTR, um)
        um.attach(model, adapter.mlp_units[0])
        model.train(was_training)
        return model

    def _set_step(self, model, step, total_steps) -> UnitMasks:
        um = _find(model)
        um.set_step(step, total_steps)
        return um

    def on_step_begin(self, model, step, total_steps):
        self._set_step(model, step, total_steps)

    def extra_loss(self, model, step, total_steps):
        um = self._set_step(model, step, total_steps)
        l_active = torch.stack([m.active_loss() for m in um.masks]).mean()
        t = um.masks[0].tau
        logs = {"live": sum(m.live_count() for m in um.masks) / len(um.masks),
                "tau": TAU_HARD if math.isinf(t) else t, "beta": um.masks[0].beta, "l_active": float(l_active.detach())}
        return self.config.active_weight * l_active, logs

    def on_step_end(self, model, step, total_steps):
        um = self._set_step(model, step, total_steps)
        if step >= total_steps:
            for m in um.masks:
                m.finalize()

    # --- persistence -------------------------------------------------------------------------------
    def _meta(self, model) -> dict:
        um = _find(model)
        return {"config": asdict(self.config), "layers": len(um.masks), "width": um.masks[0].d,
                "n_keep": um.masks[0].n_keep}

    @staticmethod
    def _state(model) -> dict:
        return {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith(ATTR + ".")}

    def save_adapters(self, model, directory) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self._state(model).items()}, str(d / ADAPTER_FILE))
        (d / CONFIG_FILE).write_text(json.dumps(self._meta(model), indent=1))

    def load_adapters(self, model, directory) -> None:
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / ADAPTER_FILE).is_file() or not (d / CONFIG_FILE).is_file():
            raise PrunetuneError(f"no pat-units adapters in {d} (need {ADAPTER_FILE} and {CONFIG_FILE})")
        saved, mine = json.loads((d / CONFIG_FILE).read_text()), self._meta(model)
        for key in ("layers", "width", "n_keep"):
            if saved.get(key) != mine[key]:
                raise PrunetuneError(f"pat-units adapters in {d} do not match this model/config ({key} differs)")
        state = load_file(str(d / ADAPTER_FILE))
        expected = set(self._state(model))
        if set(state) != expected:
            bad = sorted(expected ^ set(state))[0]
            raise PrunetuneError(f"pat-units adapters in {d} do not match the model ({bad})")
        model.load_state_dict(state, strict=False)

    # --- the end -------------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, model, out_dir, tokenizer=None) -> nn.Module:
        """Finalise every layer's gate, merge LoRA, cut the masked neurons out and save a plain checkpoint."""
        from ...structured.neurons import UnitPlan, _keep_rows, _set_linear, new_config
        from ..base import write_plain

        um = _find(model)
        keeps = [m.finalize().cpu() for m in um.masks]
        um.detach()
        _merge_lora(model)
        delattr(model, ATTR)
        adapter = get_adapter(model)
        reader, producers, _ = adapter.mlp_units
        for layer, keep in zip(adapter.layers, keeps):
            down = layer.get_submodule(reader)
            _set_linear(down, down.weight.data[:, keep.to(down.weight.device)])
            for name in producers:
                _keep_rows(layer.get_submodule(name), keep)
        removed = um.masks[0].d - um.masks[0].n_keep
        model.config = new_config(model.config, UnitPlan(neurons=removed))
        self._export_info = {"neurons_per_layer": {"before": um.masks[0].d, "after": um.masks[0].n_keep},
                             "kept_units": [k.tolist() for k in keeps]}
        return write_plain(model, out_dir, tokenizer)

    def export_info(self, merged) -> dict:
        return {"shrink": getattr(self, "_export_info", {}), "intermediate_size": merged.config.intermediate_size,
                "parameters_after": sum(p.numel() for p in merged.parameters())}
