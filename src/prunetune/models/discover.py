"""Adapters for decoder-only families that have no class of their own, found from the module tree.

What pruning, SPP and LoRA need is read off the model:

- the decoder stack: the ``ModuleList`` of ``config.num_hidden_layers`` blocks of one type (the one with the
  most parameters if several qualify);
- the linears of a layer: its ``nn.Linear`` modules, except router-like ones (``router`` in the name, or one
  output feature: a gate that scales a whole expert);
- their true-sequential groups: in the order one traced forward of layer 0 calls them, consecutive linears
  that read the same tensor forming one group (q/k/v, gate/up); until that forward has run (the pruning
  driver runs it while recording each layer's arguments) every linear is its own group, in module order;
- the token embedding and the LM head: ``get_input_embeddings()`` / ``get_output_embeddings()``.

Mixture-of-experts banks stored as 3-D tensors (transformers' ``*Experts`` modules with ``gate_up_proj``
(E × 2I × H) and ``down_proj`` (E × H × I)) are found too and listed in ``expert_banks``; the pruning driver
prunes each expert's matrices with the Hessian of the tokens routed to it (``pruning/experts.py``). Any other
3-D weight layout is refused in one line, as is a model whose stack cannot be found. What the tree cannot
tell — which linears write the residual stream, the norm form — is left empty, so PAT, the shrink and
rotation refuse such models and name the families they support.
"""

from __future__ import annotations

from torch import nn

from ..errors import PrunetuneError
from .base import BANK_PARAMS, ModelAdapter, expert_banks, groups_from_trace  # noqa: F401

#: attribute on the decoder ``ModuleList`` holding the traced groups (shared by every adapter of that model)
GROUPS_ATTR = "_prunetune_linear_groups"
#: parameter names of a transformers expert bank (3-D: experts first)


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_stack(model: nn.Module) -> str:
    """Dotted path of the decoder layers; one clear line when there is no such list."""
    n = getattr(_text_config(model.config), "num_hidden_layers", None)
    best, best_params = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n) \
                and len({type(x) for x in mod}) == 1:
            params = sum(p.numel() for p in mod.parameters())
            if params > best_params:
                best, best_params = name, params
    if best is None:
        raise PrunetuneError(f"cannot find the decoder layers of model type '{model.config.model_type}' (no "
                             f"ModuleList of its num_hidden_layers={n} blocks of one type)")
    return best


def _linears(layer: nn.Module) -> list[str]:
    out = []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and "router" not in name.lower() and mod.out_features > 1:
            out.append(name)
    return out


#: the Llama-style names whole-unit removal needs (``structured/neurons.py``)
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def _unit_layout(layer: nn.Module, config) -> tuple:
    """``(mlp_units, head_units)`` for a layer laid out as Llama's (Gemma-2/3, Granite, ...), else Nones.

    Neurons: gate/up/down projections and nothing else in the MLP, with one ``intermediate_size`` in the
    config. Heads: q/k/v/o projections, the module's ``head_dim`` and ``num_key_value_groups``, and no other
    weight wider than one head (a per-head q/k norm, as Gemma-3's, is shared by all heads and stays; a norm
    over the whole projection, as OLMo-2's, would tie the heads together)."""
    text = _text_config(config)
    linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    mlp = heads = None
    if set(_MLP) <= linears and isinstance(getattr(text, "intermediate_size", None), int):
        extra = [n for n, _ in layer.get_submodule("mlp").named_parameters()
                 if n.split(".")[0] not in ("gate_proj", "up_proj", "down_proj")]
        if not extra:
            mlp = ("mlp.down_proj", ["mlp.gate_proj", "mlp.up_proj"], "intermediate_size")
    if set(_ATTN) <= linears:
        attn = layer.get_submodule("self_attn")
        hd = getattr(attn, "head_dim", None)
        wide = [n for n, p in attn.named_parameters()
                if n.split(".")[0] not in ("q_proj", "k_proj", "v_proj", "o_proj") and p.shape[-1] != hd]
        if isinstance(hd, int) and hasattr(attn, "num_key_value_groups") and not wide:
            heads = ("self_attn", "self_attn.o_proj", "self_attn.q_proj", ["self_attn.k_proj", "self_attn.v_proj"])
    return (mlp, heads) if mlp and heads else (None, None)


class DiscoveredAdapter(ModelAdapter):
    """An adapter built from the module tree (see the module docstring)."""

    norm_kind = "unknown"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layers_path = find_stack(model)
        layer0 = self.layers[0]
        self.expert_bank_paths = expert_banks(layer0)
        names = _linears(layer0)
        if not names and not self.expert_bank_paths:
            raise PrunetuneError(f"the decoder layers of model type '{model.config.model_type}' hold no linear "
                                 "layer to prune")
        self._names = names
        self.mlp_units, self.head_units = _unit_layout(layer0, model.config)
        self.embed_path = _path_of(model, model.get_input_embeddings()) or ""
        head = model.get_output_embeddings()
        self.lm_head_path = (_path_of(model, head) or "") if head is not None else ""
        self.final_norm_path = ""

    def _virtual(self) -> list[str]:
        from ..pruning.experts import virtual_names

        return [v for bank in self.expert_bank_paths for v in virtual_names(bank)]

    def prune_groups(self) -> list[list[str]]:
        learned = getattr(self.layers, GROUPS_ATTR, None)
        return learned if learned is not None else [[n] for n in self._names + self._virtual()]

    @property
    def linear_groups(self) -> list[list[str]]:
        virtual = set(self._virtual())
        groups = [[n for n in g if n not in virtual] for g in self.prune_groups()]
        return [g for g in groups if g]

    def learn_groups(self, trace: list[tuple[str, int]]) -> None:
        if getattr(self.layers, GROUPS_ATTR, None) is None and trace:
            object.__setattr__(self.layers, GROUPS_ATTR, groups_from_trace(trace, self._names + self._virtual()))

    @property
    def hidden_size(self) -> int:
        return int(_text_config(self.config).hidden_size)


def check_causal_lm_config(config) -> None:
    """Refuse, from the config alone, what is not a decoder-only causal LM."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    mt = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise PrunetuneError(f"model type '{mt}' is an encoder-decoder model; prunetune works on decoder-only "
                             "causal language models")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise PrunetuneError(f"model type '{mt}' is not a causal language model (transformers has no "
                             "AutoModelForCausalLM for it)")
