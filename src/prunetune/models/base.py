"""Model adapters: where a family keeps its decoder layers, linears, norms and embeddings.

All architecture knowledge lives here, one small class per family (see SliceGPT's ModelAdapter), so the
pruning driver, SPP and PAT never branch on model names. Running a layer on cached inputs is done the
same way for every family: the model's own forward is run up to the first decoder layer, which records
the exact keyword arguments it receives (causal mask, rotary ``position_embeddings``, position ids...),
and those are replayed for every layer. That follows current transformers without re-implementing masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunetuneError

_REGISTRY: dict[str, type["ModelAdapter"]] = {}


def register_adapter(*model_types: str):
    """Class decorator: make an adapter responsible for these ``config.model_type`` values."""

    def deco(cls):
        for t in model_types:
            _REGISTRY[t] = cls
        cls.model_types = model_types
        return cls

    return deco


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module) -> "ModelAdapter":
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise PrunetuneError(
            f"unsupported architecture '{model_type}' (supported: {', '.join(supported_model_types())})"
        )
    return cls(model)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0 and records what the model passes to it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.hidden = None
        self.kwargs = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layer called with unexpected positional arguments")
        self.hidden = hidden_states
        self.kwargs = kwargs
        raise _Stop


@dataclass
class LayerInputs:
    """First-layer hidden states for every calibration batch, and the kwargs every layer receives."""

    hidden: list[torch.Tensor]  # one (batch, seq, d) tensor per batch, on CPU
    kwargs: dict


class ModelAdapter:
    """Base adapter. Subclasses fill in the attribute paths; the logic here is shared."""

    model_types: tuple[str, ...] = ()
    #: dotted path (from the CausalLM) of the ModuleList of decoder layers
    layers_path: str = ""
    #: linears of one layer, as pruning sub-groups in execution order (true-sequential order)
    linear_groups: list[list[str]] = []
    #: dotted paths of the token embedding, final norm and LM head
    embed_path: str = ""
    final_norm_path: str = ""
    lm_head_path: str = "lm_head"
    #: the writers of the residual stream in one layer (PAT) and the readers of it
    residual_writers: list[str] = []
    residual_readers: list[str] = []
    layer_norms: list[str] = []
    norm_kind: str = "rmsnorm"
    #: the linears that read each layer norm's output (a norm gain folds into them; rotation needs it)
    norm_readers: dict[str, list[str]] = {}
    #: linears whose forward the model bypasses (it reads ``.weight`` directly): name -> the module whose
    #: output determines their input; ``derive_input`` computes it (see the Mamba adapter)
    derived_inputs: dict[str, str] = {}

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- locating modules -------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_submodule(self.embed_path)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.final_norm_path)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.lm_head_path)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def linear_names(self) -> list[str]:
        return [n for g in self.linear_groups for n in g]

    def select_linears(self, names: list[str] | None = None, what: str = "target") -> list[str]:
        """``names`` (None: every linear of a layer) checked against the layer's linears, in one clear line."""
        known = self.linear_names()
        if names is None:
            return known
        unknown = [t for t in names if t not in known]
        if unknown:
            raise PrunetuneError(f"unknown {what}(s) {', '.join(unknown)} (this model has: {', '.join(known)})")
        return list(names)

    def linear_paths(self, names: list[str] | None = None) -> list[str]:
        """Full module paths of the named linears (default: all of them) in every decoder layer."""
        return [f"{self.layers_path}.{i}.{n}" for i in range(self.num_layers) for n in self.select_linears(names)]

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {n: layer.get_submodule(n) for n in self.linear_names()}

    def derive_input(self, layer: nn.Module, name: str, source_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(name)

    # --- running layers on cached inputs -----------------------------------------------------
    def first_layer_inputs(self, batches: list[torch.Tensor], device: torch.device | str) -> LayerInputs:
        """Run the model up to decoder layer 0 for each batch of token ids; keep the inputs on CPU."""
        layers = self.layers
        first = layers[0]
        catcher = _Catcher(first)
        layers[0] = catcher
        hidden, kwargs = [], None
        try:
            for ids in batches:
                try:
                    self.model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
                hidden.append(catcher.hidden.detach().to("cpu"))
                if kwargs is None:
                    kwargs = catcher.kwargs
        finally:
            layers[0] = first
        kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("past_key_values", "past_key_value", "cache_params")}
        kwargs["use_cache"] = False
        return LayerInputs(hidden=hidden, kwargs=kwargs)

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @staticmethod
    def kwargs_to(kwargs: dict, device, batch: int | None = None) -> dict:
        """Move recorded kwargs to a device; expand batch-1 masks when batch sizes differ."""

        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, tuple):
                return tuple(move(x) for x in v)
            return v

        return {k: move(v) for k, v in kwargs.items()}
