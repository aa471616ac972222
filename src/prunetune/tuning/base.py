"""What a tuning method is, and the registry that finds them.

A method is one module in ``prunetune/tuning/methods/`` (a file, or a package for a large one) defining a
:class:`TuningMethod` subclass decorated with :func:`register`; modules there are discovered on first use,
like the pruning methods. The class says everything ``tune()``, ``merge()``, the training loop and the
command line need, so none of them branches on method names:

- ``Config``: a dataclass of the method's options (validated in ``__post_init__``); ``tune(..., **options)``
  and ``--method-opt KEY=VALUE`` set its fields, unknown names are refused in one line;
- ``cli_options``: the command-line flags that set those fields (shared flags such as ``--lora-r`` may belong
  to several methods);
- class facts: ``default_lr``; ``zero_pattern`` — what the exported checkpoint promises about the input's
  zeros (``"identical"``: checked, a mismatch is an error; ``"recorded"``: checked and reported; None: the
  export changes the shapes); ``keeps_zeros`` (the export keeps every zero of the input, so it can be stored
  compressed); ``always_exports`` (the exported checkpoint is the result, e.g. PAT's smaller
  model); ``teacher_is_input`` (``--teacher auto`` distils from the input itself rather than from the model
  the input was pruned from); ``merges_as`` (other method names the adapters can be merged as);
- hooks, in the order they are called: ``check`` (warnings about the input), ``setup`` (before injection,
  with lazy calibration windows; returns what the report records), ``prepare`` (inject adapters, freeze the
  rest), ``trainable_parameters``, per step ``on_step_begin`` / ``extra_loss`` / ``on_step_end``,
  ``save_adapters`` / ``load_adapters``, ``restore`` (re-apply ``setup``'s state from saved adapters, before
  ``prepare``, for ``merge``), ``export`` (merge and save a plain checkpoint), ``export_info`` and
  ``result_warnings``.

Hooks receive the *unwrapped* model (never the DDP wrapper).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

from torch import nn

from ..errors import PrunetuneError

_REGISTRY: dict[str, type["TuningMethod"]] = {}
_DISCOVERED = False


class TuningMethod:
    """Base class of a tuning method; override what the method needs (see the module docstring)."""

    name = "method"
    Config: type | None = None
    default_lr: float = 1e-4
    zero_pattern: str | None = None
    keeps_zeros = False
    always_exports = False
    teacher_is_input = False
    merges_as: tuple[str, ...] = ()
    #: set True when some trainable parameters may get no gradient in a step (DDP needs to know)
    find_unused_parameters = False
    #: ``(flag, option, argparse keyword arguments)`` for the command line
    cli_options: tuple = ()

    def __init__(self, config=None, **options):
        if config is not None and options:
            raise TypeError("pass either a config or keyword options, not both")
        if self.Config is None:
            if options:
                raise PrunetuneError(f"tuning method '{self.name}' takes no options (got {', '.join(options)})")
            self.config = None
        else:
            self.config = config if config is not None else self.make_config(options)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Config)] if cls.Config is not None else []

    @classmethod
    def make_config(cls, options: dict):
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise PrunetuneError(f"tuning method '{cls.name}' does not take option(s) {', '.join(map(repr, unknown))} "
                                 f"(it takes: {', '.join(cls.option_names()) or 'none'})")
        return cls.Config(**options)

    def options(self) -> dict:
        """The method's configuration as plain data (recorded with the adapters; ``merge`` rebuilds from it)."""
        config = getattr(self, "config", None)
        return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}

    def fingerprint(self) -> dict:
        """What identifies this method's configuration (part of the run fingerprint)."""
        return {"method": self.name, **self.options()}

    # --- before training -----------------------------------------------------------------------
    def check_structure(self, model: nn.Module) -> None:
        """Refuse an architecture the method cannot work on; ``model`` may have no weights (meta device)."""

    def check(self, model: nn.Module) -> list[str]:
        """Validate the input model; return warnings for the report (raise for what cannot work)."""
        return []

    def uses_calibration(self) -> bool:
        """Whether ``setup`` reads calibration windows with these options (else ``--calib`` is refused)."""
        return False

    def setup(self, model: nn.Module, calibration) -> dict | None:
        """Work on the plain model before ``prepare`` (``calibration.windows()`` gives token-id windows)."""
        return None

    def restore(self, model: nn.Module, directory: Path) -> None:
        """Re-apply what ``setup`` did, from adapters saved in ``directory`` (before ``prepare``)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # --- per step ------------------------------------------------------------------------------
    def on_step_begin(self, model: nn.Module, step: int, total_steps: int) -> None:
        pass

    def extra_loss(self, model: nn.Module, step: int, total_steps: int):
        """Return ``(loss tensor or None, {name: float})``; the dict is logged and shown on the progress bar."""
        return None, {}

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        pass

    # --- persistence and the end -----------------------------------------------------------------
    def save_adapters(self, model: nn.Module, directory) -> None:
        raise NotImplementedError

    def load_adapters(self, model: nn.Module, directory) -> None:
        raise NotImplementedError

    def export(self, model: nn.Module, out_dir, tokenizer=None) -> nn.Module:
        """Merge and save a plain Hugging Face checkpoint into ``out_dir``; return the merged model."""
        raise NotImplementedError

    def export_info(self, merged: nn.Module) -> dict:
        """What the report records about the exported checkpoint (beyond the zero-pattern check)."""
        return {}

    def result_warnings(self, report: dict) -> list[str]:
        """Warning lines about a finished run's report (e.g. a mask that did not reach its target)."""
        return []


def register(cls: type[TuningMethod]) -> type[TuningMethod]:
    """Class decorator: make ``cls`` available as ``tune(method=cls.name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"tuning method '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    from . import methods

    for mod in pkgutil.iter_modules(methods.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{methods.__name__}.{mod.name}")
    _DISCOVERED = True


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[TuningMethod]:
    """The method class registered as ``name``; one clear line listing the choices otherwise."""
    _discover()
    cls = _REGISTRY.get(str(name))
    if cls is None:
        raise PrunetuneError(f"unknown tuning method '{name}' (use {', '.join(sorted(_REGISTRY))})")
    return cls


def write_plain(model: nn.Module, out_dir, tokenizer=None) -> nn.Module:
    """Save a merged, plain model (every parameter trainable again, as ``from_pretrained`` gives it)."""
    for p in model.parameters():
        p.requires_grad_(True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return model
