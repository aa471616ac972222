"""prunetune: make LLMs smaller and faster while keeping their accuracy, and prove it.

Python API (the CLI is a thin layer over it)::

    import prunetune as pt
    model, tok, info = pt.load_model("path/or/hub-id/or/file.gguf")
    result = pt.perplexity(model, tok, "wikitext2", seqlen=512)
    pt.prune("model_dir", method="apt", sparsity="2:4", out="pruned_dir")
    pt.shrink("model_dir", ratio=0.25, out="smaller_dir")                  # rotated, 25% fewer hidden channels
    pt.tune("pruned_dir", method="spp", data="alpaca", out="tuned_dir", merge=True, teacher="auto")
"""

from ._version import __version__  # noqa: E402

from .errors import PrunetuneError  # noqa: E402

# The API functions are bound lazily (importing torch and transformers takes seconds). The subpackages have
# other names (pruning, tuning, evaluation, structured), so ``prunetune.prune`` stays a function and
# ``import prunetune.pruning.methods.apt`` works.


def _lazy(name):
    def call(*args, **kwargs):
        from . import api

        return getattr(api, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"See :func:`prunetune.api.{name}` (imported on first use, to keep ``import prunetune`` fast)."
    return call


_API = ("load_model", "perplexity", "evaluate", "prune", "shrink", "tune", "merge", "convert", "bench", "report")
for _name in _API:
    globals()[_name] = _lazy(_name)
del _name

__all__ = ["PrunetuneError", "__version__", *sorted(_API)]
