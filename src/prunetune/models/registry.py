"""Which adapter runs a model: a family's own class (registered with ``register_adapter``), else one discovered
from the module tree; and the check of a model folder before its weights load. Sits above ``base`` and
``discover`` so that neither needs the other's caller."""

from __future__ import annotations

from torch import nn

from ..errors import PrunetuneError
from .base import _REGISTRY, ModelAdapter
from .discover import DiscoveredAdapter, check_causal_lm_config


def get_adapter(model: nn.Module) -> "ModelAdapter":
    """The family's adapter class, or one discovered from the module tree (``discover.py``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is not None:
        return cls(model)
    if config is None or not isinstance(model, nn.Module):
        raise PrunetuneError(f"unsupported model '{model_type}': not a transformers model")
    return DiscoveredAdapter(model)


def preflight(directory):
    """Check a local model folder before its weights are loaded: a causal LM whose decoder stack, linears and
    any expert banks prunetune understands (built on the meta device from the config; nothing is read).
    Returns that weightless model (None when the config is one the loader will report on itself)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError):
        return None  # the loader reports a config it cannot read, with its own message
    check_causal_lm_config(config)
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except (ValueError, TypeError, RuntimeError):
            return None
    get_adapter(model)
    return model
