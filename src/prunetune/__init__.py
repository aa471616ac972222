"""prunetune: make LLMs smaller and faster while keeping their accuracy, and prove it.

Python API (the CLI is a thin layer over it)::

    import prunetune as pt
    model, tok, info = pt.load_model("path/or/hub-id/or/file.gguf")
    result = pt.perplexity(model, tok, "wikitext2", seqlen=512)
    pt.prune("model_dir", method="apt", sparsity="2:4", out="pruned_dir")
    pt.tune("pruned_dir", method="spp", data="alpaca", out="tuned_dir", merge=True)
"""

__version__ = "0.1.0"

from .errors import PrunetuneError  # noqa: E402

# The subpackages ``prune``, ``tune`` and ``evaluate`` share their names with API functions. Importing a
# subpackage for the first time rebinds the package attribute of that name to the module, so they are imported
# here first (their ``__init__`` files are light) and the function names bound after them, to stay functions.
from . import evaluate as _evaluate_pkg, prune as _prune_pkg, tune as _tune_pkg  # noqa: E402,F401


def _lazy(name):
    def call(*args, **kwargs):
        from . import api

        return getattr(api, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"See :func:`prunetune.api.{name}` (imported on first use, to keep ``import prunetune`` fast)."
    return call


_API = ("load_model", "perplexity", "evaluate", "prune", "tune", "merge", "bench", "report")
for _name in _API:
    globals()[_name] = _lazy(_name)
del _name

__all__ = ["PrunetuneError", "__version__", *sorted(_API)]
