"""Model adapters: where a family keeps its decoder layers, linears, norms and embeddings.

All architecture knowledge lives here (see SliceGPT's ModelAdapter), so the pruning driver, SPP and PAT never
branch on model names. A family needs a class of its own only for what the module tree does not tell: which
linears write and read the residual stream, the norm form (PAT, the shrink, rotation). Any other decoder-only
model whose decoder layers are one ``ModuleList`` is found by :mod:`prunetune.models.discover` (the stack, the
linears of a layer, and — from one traced forward of layer 0 — their execution order and which of them read
the same input, i.e. the true-sequential groups).

Running a layer on cached inputs is done the same way for every family: the model's own forward is run once
with every decoder layer replaced by a stand-in that records the exact keyword arguments that layer
receives (causal or sliding-window mask, rotary ``position_embeddings``, position ids...); each layer is then
replayed with its own. Models that alternate attention types (Gemma-2/3) give their layers different masks
and rotary tables, so one layer's arguments must not be reused for another.
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


#: transformers' expert-bank parameters (3-D): gate_up_proj [experts, 2 x inner, hidden], down_proj [experts,
#: hidden, inner]
BANK_PARAMS = ("gate_up_proj", "down_proj")


def expert_banks(layer: nn.Module) -> list[str]:
    """Paths (inside a layer) of transformers expert banks; one clear line for a 3-D layout not understood."""
    banks = []
    for name, mod in layer.named_modules():
        three_d = [pn for pn, p in mod.named_parameters(recurse=False) if p.dim() == 3]
        looks_like_experts = hasattr(mod, "num_experts") or "expert" in name.lower() or set(three_d) & set(BANK_PARAMS)
        if not three_d or not looks_like_experts:  # e.g. a depthwise convolution (Mamba): not an expert bank
            continue
        plain = (getattr(mod, "is_concatenated", True) and not getattr(mod, "is_transposed", False)
                 and not getattr(mod, "has_bias", False) and getattr(mod, "has_gate", True))
        if sorted(three_d) != sorted(BANK_PARAMS) or not hasattr(mod, "num_experts") or not plain:
            raise PrunetuneError(f"the mixture-of-experts layout of '{name}' is not understood (3-D weights "
                                 f"{', '.join(three_d)}; supported: an experts module with gate_up_proj "
                                 "[experts, 2 x inner, hidden] and down_proj [experts, hidden, inner])")
        banks.append(name)
    return banks


class _Stop(Exception):
    pass


#: keyword arguments of a decoder layer that hold a cache: never replayed (every layer runs without one)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache_params", "cache", "layer_past")


class _Book:
    """What the stand-ins record during one forward of the model."""

    def __init__(self, n_layers: int):
        self.hidden = None
        self.kwargs: list[dict | None] = [None] * n_layers
        self.full = True  # the first batch runs through every stand-in; later ones stop at layer 0
        self.out0 = None
        self.trace: list[tuple[str, int]] = []  # (linear name, id of its input) in layer 0, in call order
        self.last = n_layers - 1


class _StandIn(nn.Module):
    """Replaces decoder layer ``index`` while the model runs once: records the hidden states (layer 0) and the
    keyword arguments the model passes. Layer 0's stand-in runs the real layer once (the other stand-ins return
    its output, so the forward goes on with the right type and shape); the last one stops the forward.
    Attribute lookups the model makes on its layers (e.g. ``attention_type``) go to the real layer."""

    def __init__(self, layer: nn.Module, index: int, book: _Book):
        super().__init__()
        self.layer, self.index = layer, index
        object.__setattr__(self, "book", book)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layer called with unexpected positional arguments")
        b = self.book
        if self.index == 0:
            b.hidden = hidden_states
            if not b.full:
                raise _Stop
            b.kwargs[0] = kwargs
            b.out0 = _traced_call(self.layer, hidden_states, kwargs, b.trace)
        else:
            b.kwargs[self.index] = kwargs
        if self.index == b.last:
            raise _Stop
        return b.out0


def _traced_call(layer: nn.Module, hidden, kwargs: dict, trace: list):
    """Run ``layer`` once, recording which ``nn.Linear`` (or expert bank: its two virtual linears) is called in
    which order on which input tensor."""
    from ..pruning.experts import virtual_names

    hooks = []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: trace.append((name, id(a[0])))))
    for bank in expert_banks(layer):
        up, down = virtual_names(bank)
        hooks.append(layer.get_submodule(bank).register_forward_pre_hook(
            lambda m, a, up=up, down=down: trace.extend([(up, id(a[0])), (down, -1)])))
    try:
        with torch.no_grad():
            return layer(hidden, **kwargs)
    finally:
        for h in hooks:
            h.remove()


def groups_from_trace(trace: list[tuple[str, int]], names: list[str]) -> list[list[str]]:
    """True-sequential groups: ``names`` in the order layer 0 first called them, consecutive ones that read the
    same input tensor grouped (q/k/v, gate/up); names never called go last, each alone."""
    order, seen = [], set()
    for name, x in trace:
        if name in names and name not in seen:
            seen.add(name)
            order.append((name, x))
    groups: list[list[str]] = []
    last = None
    for name, x in order:
        if groups and x == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups + [[n] for n in names if n not in seen]


@dataclass
class LayerInputs:
    """First-layer hidden states for every calibration batch, and the kwargs each layer receives."""

    hidden: list[torch.Tensor]  # one (batch, seq, d) tensor per batch, on CPU
    layer_kwargs: list[dict]    # per layer (objects shared between layers of the same kind)

    @property
    def kwargs(self) -> dict:
        """Layer 0's arguments."""
        return self.layer_kwargs[0]


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
    #: mixture-of-experts banks (3-D expert weights) inside a layer, pruned per expert by the driver
    expert_bank_paths: list[str] = []
    #: linears whose forward the model bypasses (it reads ``.weight`` directly): name -> the module whose
    #: output determines their input; ``derive_input`` computes it (see the Mamba adapter)
    derived_inputs: dict[str, str] = {}
    #: whole-unit removal (``structured/neurons.py``). MLP neurons: (reader, producers, config field) — one
    #: neuron is one input column of the reader and one output row of every producer. Heads: (attention module,
    #: reader, query producer, key/value producers) — a query head is ``head_dim`` rows of the query producer and
    #: columns of the reader; a KV head is ``head_dim`` rows of each key/value producer. None: not supported.
    mlp_units: tuple[str, list[str], str] | None = None
    head_units: tuple[str, str, str, list[str]] | None = None

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

    def prune_groups(self) -> list[list[str]]:
        """The pruning driver's true-sequential groups: ``linear_groups`` plus, for mixture-of-experts layers,
        each expert bank's virtual ``<bank>[gate_up_proj]`` and ``<bank>[down_proj]`` where the bank runs."""
        return self.linear_groups

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {n: layer.get_submodule(n) for n in self.linear_names()}

    def derive_input(self, layer: nn.Module, name: str, source_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(name)

    # --- running layers on cached inputs -----------------------------------------------------
    def first_layer_inputs(self, batches: list[torch.Tensor], device: torch.device | str, sink=None) -> LayerInputs:
        """Run the model once per batch of token ids up to decoder layer 0 (the first batch through stand-ins of
        every layer, recording each layer's own arguments); keep the hidden states on CPU, or hand each batch's
        to ``sink.write(i, hidden)`` (then ``hidden`` is empty: nothing accumulates). Layer 0 must hold its
        weights (it runs once, for the arguments of the later layers and the trace of its linears)."""
        layers = self.layers
        originals = list(layers)
        book = _Book(len(originals))
        layer0_device = next((p.device for p in originals[0].parameters()), None)
        for i, layer in enumerate(originals):
            layers[i] = _StandIn(layer, i, book)
        hidden = []
        try:
            originals[0].to(device)
            for i, ids in enumerate(batches):
                try:
                    self.model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
                if book.hidden is None:
                    raise PrunetuneError("the model's forward never reached its first decoder layer")
                if sink is not None:
                    sink.write(i, book.hidden)
                else:
                    hidden.append(book.hidden.detach().to("cpu"))
                book.full, book.hidden = False, None
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            if layer0_device is not None and layer0_device.type != "meta":
                originals[0].to(layer0_device)
        missing = [i for i, k in enumerate(book.kwargs) if k is None]
        if missing:
            raise PrunetuneError(f"the model's forward did not call decoder layer(s) {missing[:5]}")
        layer_kwargs = []
        for kw in book.kwargs:
            kw = {k: v for k, v in kw.items() if k not in _CACHE_KWARGS}
            kw["use_cache"] = False
            layer_kwargs.append(kw)
        self.learn_groups(book.trace)
        book.out0 = None
        return LayerInputs(hidden=hidden, layer_kwargs=layer_kwargs)

    def learn_groups(self, trace: list[tuple[str, int]]) -> None:
        """Families with explicit groups keep them; discovered ones take them from layer 0's traced forward."""

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @staticmethod
    def kwargs_to(kwargs, device, dtype=None):
        """Move recorded kwargs (one dict, or a list of per-layer dicts) to a device, floating tensors to ``dtype``
        if given; a tensor shared by several layers is moved once and stays shared."""
        memo: dict[int, object] = {}

        def move(v):
            if isinstance(v, torch.Tensor):
                if id(v) not in memo:
                    memo[id(v)] = v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point()
                                       else v.dtype)
                return memo[id(v)]
            if isinstance(v, tuple):
                return tuple(move(x) for x in v)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v

        if isinstance(kwargs, list):
            return [{k: move(v) for k, v in kw.items()} for kw in kwargs]
        return {k: move(v) for k, v in kwargs.items()}
