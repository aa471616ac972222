"""Command line: ``prunetune prune | tune | merge | eval | bench | report``.

Thin by design: parse, call the Python API, print. User errors become one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import PrunetuneError


def _add_common_model(p, required=False):
    p.add_argument("--model", required=required, default=None,
                   help="local HF directory, Hub id, or .gguf file (default: the bundled stories260K)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default auto)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prunetune",
        description="Make LLMs smaller and faster while keeping their accuracy, with numbers anyone can reproduce.",
        epilog="Sparsity: 0.5 = half of every pruned matrix is zero; 2:4 = 2 of every 4 consecutive input weights are KEPT.",
    )
    ap.add_argument("--version", action="version", version=f"prunetune {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    # eval ------------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model",
                       description="Perplexity (non-overlapping windows, DESIGN §6) and zero-shot tasks; one JSON with its manifest.")
    _add_common_model(p)
    p.add_argument("--ppl", nargs="*", default=None, metavar="CORPUS",
                   help="wikitext2 | c4 | tinystories | FILE(.txt/.jsonl/.parquet); default: wikitext2 (tinystories for the bundled model)")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks, e.g. arc_easy,piqa,winogrande")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--tasks-dir", default=None, help="folder with the task .jsonl files")
    p.add_argument("--out", default=None, help="write the result JSON here")

    # prune -----------------------------------------------------------------------------------
    p = sub.add_parser("prune", help="one-shot pruning: magnitude, wanda, sparsegpt, apt",
                       description="Prune a model layer by layer with calibration data and write a plain HF checkpoint + report.")
    _add_common_model(p)
    p.add_argument("--method", required=True, help="magnitude | wanda | sparsegpt | apt")
    p.add_argument("--sparsity", required=True, help="0.5 (unstructured), 2:4 or 4:8 (N:M keeps N of every M)")
    p.add_argument("--calib", default="c4", help="calibration corpus: c4 | wikitext2 | tinystories | FILE (default c4)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window (clipped to the model's context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening λ (fraction of mean diag)")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--owl", action="store_true", help="non-uniform layer ratios from outlier ratios (OWL)")
    p.add_argument("--no-true-sequential", action="store_true", help="prune all linears of a layer from one pass")
    p.add_argument("--eval", nargs="*", default=None, metavar="CORPUS", help="perplexity before/after on these corpora")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last finished layer")

    # demo ------------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="prune the bundled stories260K with every method and print before/after",
                       description="The main job on the embedded default model; runs offline in about a minute.")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,apt")
    p.add_argument("--sparsity", nargs="*", default=["0.5", "2:4"])
    p.add_argument("--out", default=None, help="keep the pruned checkpoints here (default: a temp dir)")
    return ap


def _cmd_demo(a):
    from .api import demo

    res = demo([m.strip() for m in a.methods.split(",") if m.strip()], a.sparsity, out=a.out)
    print(res["table"])


def _cmd_eval(a):
    from .api import evaluate
    from .paths import DEFAULT_MODEL

    ppl = a.ppl
    if ppl is None:
        ppl = ["tinystories"] if a.model is None or str(a.model) == str(DEFAULT_MODEL) else ["wikitext2"]
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else None
    if a.limit is not None and a.limit <= 0:
        raise PrunetuneError(f"--limit must be positive (got {a.limit})")
    res = evaluate(a.model, ppl=ppl, seqlen=a.seqlen, batch_size=a.batch_size, max_windows=a.max_windows, tasks=tasks,
                   limit=a.limit, tasks_dir=a.tasks_dir, dtype=a.dtype, device=a.device, out=a.out)
    print(f"model: {res['manifest']['model']['spec']}")
    for corpus, r in res["perplexity"].items():
        print(f"  ppl {corpus:<12} {r['ppl']:10.3f}   ({r['windows']} windows x {r['seqlen']} tokens)")
    if "zeroshot" in res:
        for task, r in res["zeroshot"]["tasks"].items():
            print(f"  {task:<14} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  (n={r['n']})")
        avg = res["zeroshot"]["average"]
        print(f"  average        acc {avg['acc']:.4f}  acc_norm {avg['acc_norm']:.4f}")
    if a.out:
        print(f"wrote {a.out}")


def _cmd_prune(a):
    from .api import prune

    res = prune(a.model, method=a.method, sparsity=a.sparsity, out=a.out, calib=a.calib, nsamples=a.nsamples,
                seqlen=a.seqlen, seed=a.seed, damp=a.damp, blocksize=a.blocksize, owl=a.owl,
                true_sequential=not a.no_true_sequential, eval_corpora=a.eval, dtype=a.dtype, device=a.device,
                overwrite=a.overwrite, resume=a.resume)
    print(res["summary_table"])
    print(f"wrote {a.out}")


COMMANDS = {"eval": _cmd_eval, "prune": _cmd_prune, "demo": _cmd_demo}


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="prunetune: %(message)s")
    if not a.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if a.command is None:
        ap.print_help()
        return 0
    try:
        COMMANDS[a.command](a)
    except PrunetuneError as e:
        print(f"prunetune {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"prunetune {a.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
