"""Architecture adapters. A new family is one new module here, imported below."""

from .base import LayerInputs, ModelAdapter, register_adapter, supported_model_types
from .registry import get_adapter, preflight
from . import gpt_neox, llama, mamba, opt  # noqa: F401  (registration)

__all__ = ["LayerInputs", "ModelAdapter", "get_adapter", "preflight", "register_adapter", "supported_model_types"]
