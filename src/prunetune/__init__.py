"""prunetune: make LLMs smaller and faster while keeping their accuracy, and prove it.

Python API (the CLI is a thin layer over it)::

    import prunetune as pt
    model, tok, info = pt.load_model("path/or/hub-id/or/file.gguf")
    result = pt.perplexity(model, tok, "wikitext2", seqlen=512)
    pt.prune("model_dir", method="apt", sparsity="2:4", out="pruned_dir")
"""

__version__ = "0.1.0"

from .errors import PrunetuneError  # noqa: E402

_API = {"load_model", "perplexity", "evaluate", "prune", "tune", "merge", "bench", "report"}


def __getattr__(name):  # lazy: keep `import prunetune` and `prunetune --help` fast
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["PrunetuneError", "__version__", *sorted(_API)]
