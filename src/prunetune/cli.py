"""Command line: ``prunetune prune | shrink | tune | merge | convert | eval | bench | report | demo``.

Thin by design: parse, call the Python API, print. User errors become one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import PrunetuneError


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default where it has one and the help text does not say it already."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if not action.option_strings or "default" in h or d is None or d is False or d == [] or d is argparse.SUPPRESS:
            return h
        return f"{h} (default: %(default)s)"


def _add_common_model(p, required=False):
    p.add_argument("--model", required=required, default=None,
                   help="local HF directory, Hub id, or .gguf file (default: the bundled stories260K)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (a GPU when there is one)")


def _parser() -> argparse.ArgumentParser:
    from .pruning.methods import available as prune_methods

    ap = argparse.ArgumentParser(
        prog="prunetune", formatter_class=_Help,
        description="Make LLMs smaller and faster while keeping their accuracy, with numbers anyone can reproduce.",
        epilog="Sparsity: 0.5 = half of every pruned matrix is zero; 2:4 = 2 of every 4 consecutive input weights are KEPT.",
    )
    ap.add_argument("--version", action="version", version=f"prunetune {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(sub)
    _add_prune(sub, prune_methods)
    _add_shrink(sub)
    _add_tune(sub)
    _add_merge(sub)
    _add_convert(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_demo(sub)
    return ap


def _add_eval(sub) -> None:
    """``prunetune eval``."""
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model", formatter_class=_Help,
                       description="Perplexity over non-overlapping windows of a corpus (mean NLL of every predicted "
                                   "token, exponentiated) and zero-shot multiple-choice accuracy through "
                                   "lm-evaluation-harness; one JSON with its manifest.\n\nWhat is computed: --ppl "
                                   "and/or --tasks as given; with neither, WikiText-2 perplexity (TinyStories for "
                                   "the bundled model); --ppl without a corpus means that default corpus.")
    _add_common_model(p)
    p.add_argument("--ppl", nargs="*", default=None, metavar="CORPUS",
                   help="perplexity on: wikitext2 | c4 | tinystories | FILE (.txt/.jsonl/.parquet)")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows (or task requests) per forward")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default: all)")
    p.add_argument("--bos", default=None, choices=["stream", "window", "none"],
                   help="BOS handling: one at the start of the text (stream), one opening every window (window), "
                        "none (default: window for families that need a BOS per sequence (Gemma), else stream)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks, e.g. arc_easy,piqa,winogrande")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    p.add_argument("--tasks-dir", default=None, help="folder with the task .jsonl files (default: the data folder's tasks/)")
    p.add_argument("--out", default=None, help="write the result JSON here")


def _add_prune(sub, prune_methods) -> None:
    """``prunetune prune``."""
    p = sub.add_parser("prune", help="one-shot pruning: " + ", ".join(prune_methods()), formatter_class=_Help,
                       description="Prune every linear of every decoder layer, layer by layer with calibration data, "
                                   "and write a plain HF checkpoint + prune_report.json.")
    _add_common_model(p)
    p.add_argument("--method", required=True, help=" | ".join(prune_methods()))
    p.add_argument("--sparsity", required=True, help="0.5 (unstructured), 2:4 or 4:8 (N:M keeps N of every M)")
    p.add_argument("--calib", default="c4", help="calibration corpus: c4 | wikitext2 | tinystories | FILE")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (clipped to the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--calib-bos", default=None, choices=("stream", "window", "none"),
                   help="BOS in the calibration windows (default: the family's convention, as eval --bos: one per "
                        "window for Gemma, the tokenizer's own elsewhere)")
    p.add_argument("--damp", type=float, default=None,
                   help="Hessian dampening λ, a fraction of the mean diagonal (default: the method's, 0.01; apt 0.03)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (also APT's start)")
    p.add_argument("--owl", action="store_true", help="non-uniform layer ratios from outlier ratios (OWL)")
    p.add_argument("--no-true-sequential", action="store_true", help="prune all linears of a layer from one pass")
    p.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. select=obs or solver=direct for apt (repeatable; checked per method)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--cache-budget", default="auto", metavar="MB|auto",
                   help="RAM for the activations between layers; beyond it they live on disk in the working folder "
                        "(auto: a quarter of the memory available; 0: always on disk)")
    p.add_argument("--compute-dtype", default="auto", metavar="auto|DTYPE",
                   help="dtype each layer runs in while it is pruned; the output keeps --dtype (auto: float32 on a "
                        "CPU when --dtype is bfloat16/float16, whose CPU matmuls are often several times slower; "
                        "else --dtype)")
    p.add_argument("--eval", nargs="*", default=None, metavar="CORPUS", help="perplexity before/after on these corpora")
    p.add_argument("--save-format", default="dense", choices=("dense", "compressed"),
                   help="compressed: sparse matrices stored in compressed-tensors' sparse-bitmask layout (about "
                        "0.53x their bytes at 50%% in float32; prunetune reads it, 'prunetune convert' makes the "
                        "dense checkpoint serving engines load)")
    p.add_argument("--out", required=True, help="output folder (written in one rename at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last finished layer (kept in the hidden .<out>.partial folder)")


def _add_shrink(sub) -> None:
    """``prunetune shrink``."""
    from .structured.api import SHRINK_METHODS

    p = sub.add_parser("shrink", help="one-shot structured shrink: a plain model with a smaller hidden size",
                       formatter_class=_Help,
                       description="Remove a fraction of the hidden channels (the residual stream) — or, with --structure, "
                                   "whole MLP neurons and attention heads — and write a plain, smaller HF checkpoint.\n\n"
                                   "--structure hidden (RMSNorm families), --method:\n"
                                   "  pca         rotate the residual stream to its principal directions (same "
                                   "function),\n              then drop the directions of least variance\n"
                                   "  activation  drop the channels of least energy at the RMSNorm outputs\n"
                                   "  magnitude   drop the channels of smallest norm gains and reader weights (no data)\n"
                                   "--structure mlp | heads | mlp+heads (Llama family): --ratio is the share of decoder-layer\n"
                                   "weights removed as MLP neurons and/or heads (a KV head with its queries, or query heads\n"
                                   "taken equally from every KV group); down_proj / o_proj are refit exactly on the kept\n"
                                   "columns, layer by layer (streamed, --resume), --select:\n"
                                   "  obs         greedy group OBS: remove the unit of least refit error, downdate, repeat\n"
                                   "  swap        obs, then exchanges of a removed and a kept unit while the exact error drops\n"
                                   "  magnitude   input-aware magnitude ||W[:, j]||² H_jj (no refit in the choice)")
    _add_common_model(p)
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction removed, in (0, 1): of hidden channels, or of decoder-layer weights with --structure")
    p.add_argument("--target", default="params", choices=["params", "prefill"],
                   help="what --ratio is a share of in a unit shrink: decoder-layer linear weights (params), or this "
                        "machine's prefill time at batch 8 x 128 (prefill: a one-layer copy timed for a few plans, "
                        "the fewest weights whose fitted share of time reaches the ratio)")
    p.add_argument("--structure", default="hidden", choices=["hidden", "mlp", "heads", "mlp+heads", "auto"],
                   help="what is removed: hidden channels, MLP neurons, heads, both, or (auto) the mix of MLP neurons "
                        "and heads with the lowest held-out calibration loss")
    p.add_argument("--method", default="pca", choices=list(SHRINK_METHODS), help=" | ".join(SHRINK_METHODS))
    p.add_argument("--select", default="obs", choices=["obs", "swap", "magnitude"],
                   help="how units are chosen (--structure mlp/heads)")
    p.add_argument("--head-share", type=float, default=None,
                   help="mlp+heads: share of the removed weights taken from heads (default 0.5, nearest feasible)")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening of the unit refit")
    p.add_argument("--resume", action="store_true", help="continue a killed unit shrink from its last finished layer")
    p.add_argument("--cache-budget", default="auto", help="MB of activations kept in RAM (unit shrink)")
    p.add_argument("--calib", default="c4", help="calibration corpus: c4 | wikitext2 | tinystories | FILE")
    p.add_argument("--nsamples", type=int, default=None,
                   help="calibration windows (default: 128 for --structure hidden, 256 for neurons and heads)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per calibration window, clipped to the model's context (default: 2048 for "
                        "--structure hidden, 512 for neurons and heads: measured better, BENCHMARKS §9)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--calib-bos", default=None, choices=("stream", "window", "none"),
                   help="BOS in the calibration windows (default: the family's convention, as eval --bos: one per "
                        "window for Gemma, the tokenizer's own elsewhere)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--eval", nargs="*", default=None, metavar="CORPUS", help="perplexity before/after on these corpora")
    p.add_argument("--out", required=True, help="output folder (written in one rename at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _add_tune(sub) -> None:
    """``prunetune tune``."""
    from .tuning.base import available, get_method

    methods = available()
    lines = [f"  {m:<12} {(get_method(m).__doc__ or '').strip().splitlines()[0]}" for m in methods]
    p = sub.add_parser(
        "tune", help=f"fine-tune: {', '.join(methods)}", formatter_class=_Help,
        description="Fine-tune a (pruned) model and write adapters, a plain HF checkpoint and tune_report.json.\n\n"
                    + "\n".join(lines) + "\n\n"
                    "spp and lora-masked keep the input's zeros (--merge writes and checks them); pat always writes\n"
                    "the smaller plain checkpoint (RMSNorm models). --teacher distils from another model (auto: the\n"
                    "model the input was pruned or shrunk from; for pat the input itself).\n"
                    "Interrupted runs keep their checkpoints in the hidden .<out>.partial folder next to --out;\n"
                    "rerun the same command with --resume to continue (bit-identical on CPU).",
    )
    _add_common_model(p)
    p.add_argument("--method", required=True, metavar="METHOD", help=" | ".join(methods))
    p.add_argument("--data", required=True,
                   help="Alpaca .jsonl (instruction/input/output; loss on the response only), .jsonl with 'text' "
                        "or .txt (packed windows), or 'alpaca' (local data folder) / 'tinystories' (bundled)")
    p.add_argument("--out", required=True, help="output folder (written in one rename at the end)")
    p.add_argument("--seq-len", "--seqlen", dest="seq_len", type=int, default=256,
                   help="tokens per example: cut-off (instruction data) or window (text)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step; global batch = batch-size x grad-accum")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: " + ", ".join(f"{m} {get_method(m).default_lr:g}" for m in methods) + ")")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training split")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="training budget in tokens, instead of --max-steps: the fewest steps of batch-size x "
                        "grad-accum x seq-len positions that read that many")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--schedule", default="cosine", help="cosine | linear | constant")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, split and adapter init")
    p.add_argument("--eval-size", type=float, default=0.05,
                   help="held-out split: a fraction (< 1) or a number of examples")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: at the end only)")
    p.add_argument("--max-records", type=int, default=None, help="read only the first N records of the data file")
    p.add_argument("--data-mode", default="auto", help="auto | instruction | text")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps, for --resume (0 = never)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layer activations in the backward: far less memory, one more forward per step")
    p.add_argument("--merge", action="store_true", help="also write the merged plain checkpoint (pat always does)")
    p.add_argument("--save-format", default="dense", choices=("dense", "compressed"),
                   help="compressed: the merged checkpoint of spp / lora-masked with its sparse matrices in the "
                        "sparse-bitmask layout (see prune --save-format)")
    p.add_argument("--teacher", default=None, metavar="MODEL|auto",
                   help="distil from this model (same vocabulary); auto: the model the input was pruned or shrunk "
                        "from (pat: the input itself)")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature T")
    p.add_argument("--kd-weight", type=float, default=1.0,
                   help="loss = w * T^2 * KL(teacher || student) + (1 - w) * cross-entropy")
    p.add_argument("--calib", "--mask-init-data", dest="calib", default=None,
                   help="corpus of the windows a method looks at before training (pat: --rotate, --mask-init "
                        "activation): c4, wikitext2, tinystories or a text file (default: the first training examples)")
    p.add_argument("--calib-samples", "--mask-init-examples", dest="calib_samples", type=int, default=64,
                   help="number of those windows (or training examples)")
    p.add_argument("--calib-seqlen", "--mask-init-seqlen", dest="calib_seqlen", type=int, default=512,
                   help="tokens per --calib window")
    flags: dict[str, list[str]] = {}  # flag -> methods that take it (the first one's help is shown)
    for m in methods:
        for flag, _field, kw in get_method(m).cli_options:
            if flag not in flags:
                kw = dict(kw)
                if kw.get("action") in ("store_true", "store_false"):  # None unless given, so it is only sent
                    kw["const"] = kw.pop("action") == "store_true"     # to the method that takes it
                    kw["action"] = "store_const"
                if kw.get("action") != "store_const" and "choices" not in kw:
                    kw.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
                p.add_argument(flag, dest=_flag_dest(flag), default=None, **kw)
            flags.setdefault(flag, []).append(m)
    for action in p._actions:
        flag = next((o for o in action.option_strings if o in flags), None)
        if flag is not None:
            action.help = f"{action.help} [{', '.join(flags[flag])}]"
    p.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="set any option of the method by its name (repeatable; see the method's Config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run of the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_merge(sub) -> None:
    """``prunetune merge``."""
    p = sub.add_parser("merge", help="turn tune adapters into a plain HF checkpoint", formatter_class=_Help,
                       description="Merge the adapters of a 'prunetune tune' output into a plain Hugging Face "
                                   "checkpoint: spp -> merged sparse (same zero pattern, checked), lora -> W + BA, "
                                   "lora-masked -> W + mask * BA, pat -> the shrunk model.")
    p.add_argument("adapters", help="a 'prunetune tune' output folder (or its adapters/ subfolder)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default=None,
                   help="spp | lora | lora-masked | pat (default: the training method; lora adapters merge as either lora kind)")
    p.add_argument("--model", default=None, help="base model (default: the one recorded with the adapters)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the training dtype)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default auto)")
    p.add_argument("--save-format", default="dense", choices=("dense", "compressed"),
                   help="compressed: sparse matrices stored in compressed-tensors' sparse-bitmask layout (about "
                        "0.53x their bytes at 50%% in float32; prunetune reads it, 'prunetune convert' makes the "
                        "dense checkpoint serving engines load)")
    p.add_argument("--overwrite", action="store_true")


def _add_convert(sub) -> None:
    """``prunetune convert``."""
    p = sub.add_parser("convert", help="rewrite a checkpoint dense or with its sparse matrices compressed",
                       formatter_class=_Help,
                       description="Rewrite a local safetensors checkpoint: --save-format dense (what transformers "
                                   "and vLLM load; also turns a compressed checkpoint back) or compressed "
                                   "(sparse-bitmask). The weights are equal.")
    p.add_argument("model", help="a local checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--save-format", required=True, choices=("dense", "compressed"))
    p.add_argument("--overwrite", action="store_true")


def _add_bench(sub) -> None:
    """``prunetune bench``."""
    p = sub.add_parser("bench", help="prefill/decode speed, memory, size: models side by side, interleaved",
                       formatter_class=_Help,
                       description="Speed and memory of one or more models, measured interleaved with repetitions; "
                                   "medians, min/max and ratios to the first model; one JSON with its manifest.")
    p.add_argument("--model", default=None, help="the reference model (default: the bundled stories260K)")
    p.add_argument("--compare", nargs="*", default=[], metavar="MODEL", help="models compared with --model")
    p.add_argument("--batch-sizes", default="1,8,32", help="prefill batch sizes (default 1,8,32)")
    p.add_argument("--seq-lens", default="128", help="prefill sequence lengths (default 128)")
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decode run (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per cell (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="discarded warm-up repetitions (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as is)")
    p.add_argument("--sparse-2to4", action="store_true",
                   help="CUDA fp16/bf16: also run 2:4-sparse models with semi-structured sparse kernels")
    p.add_argument("--no-memory-probe", action="store_true", help="CPU: skip the per-model peak-memory subprocess")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default auto)")
    p.add_argument("--out", default=None, help="write the result JSON here")


def _add_report(sub) -> None:
    """``prunetune report``."""
    p = sub.add_parser("report", help="Markdown tables and PNG plots from result JSONs", formatter_class=_Help,
                       description="Turn prunetune eval / prune / bench results (and benchmark result files) into "
                                   "report.md with tables and PNG plots: perplexity vs sparsity per method, accuracy "
                                   "per task, speed vs batch size.")
    p.add_argument("results", nargs="+", help="result JSON files or prune output folders")
    p.add_argument("--out", required=True, help="folder for report.md and the plots")


def _add_demo(sub) -> None:
    """``prunetune demo``."""
    p = sub.add_parser("demo", help="prune the bundled stories260K with every method and print before/after",
                       formatter_class=_Help,
                       description="The main job on the embedded default model; runs offline in about a minute.")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,apt")
    p.add_argument("--sparsity", nargs="*", default=["0.5", "2:4"])
    p.add_argument("--out", default=None, help="keep the pruned checkpoints here (default: a temp dir)")


def _cmd_demo(a):
    from .api import demo

    res = demo([m.strip() for m in a.methods.split(",") if m.strip()], a.sparsity, out=a.out)
    print(res["table"])


def _cmd_eval(a):
    from .api import evaluate
    from .paths import DEFAULT_MODEL

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else None
    default = ["tinystories"] if a.model is None or str(a.model) == str(DEFAULT_MODEL) else ["wikitext2"]
    if a.ppl is None:  # neither: the default corpus; --tasks alone: only the tasks
        ppl = [] if tasks else default
    else:
        ppl = a.ppl or default
    if a.limit is not None and a.limit <= 0:
        raise PrunetuneError(f"--limit must be positive (got {a.limit})")
    res = evaluate(a.model, ppl=ppl, seqlen=a.seqlen, batch_size=a.batch_size, max_windows=a.max_windows, tasks=tasks,
                   limit=a.limit, tasks_dir=a.tasks_dir, dtype=a.dtype, device=a.device, out=a.out, bos=a.bos)
    print(f"model: {res['manifest']['model']['spec']}")
    for corpus, r in res["perplexity"].items():
        print(f"  ppl {corpus:<12} {r['ppl']:10.3f}   ({r['windows']} windows x {r['seqlen']} tokens, "
              f"BOS: {r['protocol']['bos']})")
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
                overwrite=a.overwrite, resume=a.resume, batch_size=a.batch_size, cache_budget=a.cache_budget,
                compute_dtype=a.compute_dtype, method_opts=parse_method_opts(a.method_opt), save_format=a.save_format,
                calib_bos=a.calib_bos)
    print(res["summary_table"])
    if res.get("storage", {}).get("format") != "dense":
        print(_storage_line(res["storage"]))
    print(f"wrote {a.out}")


def _cmd_shrink(a):
    from .api import shrink

    res = shrink(a.model, ratio=a.ratio, out=a.out, method=a.method, calib=a.calib, nsamples=a.nsamples,
                 seqlen=a.seqlen, seed=a.seed, batch_size=a.batch_size, eval_corpora=a.eval, dtype=a.dtype,
                 device=a.device, overwrite=a.overwrite, structure=a.structure, select=a.select,
                 head_share=a.head_share, damp=a.damp, resume=a.resume, cache_budget=a.cache_budget,
                 calib_bos=a.calib_bos, target=a.target)
    print(res["summary_table"])
    print(f"wrote {a.out}")


def _flag_dest(flag: str) -> str:
    return "opt_" + flag.lstrip("-").replace("-", "_")


def _method_options(a) -> dict:
    """The chosen method's options from its flags and --method-opt; a flag of another method is refused."""
    from .tuning.base import available, get_method

    cls = get_method(a.method)
    mine = {flag: field for flag, field, _ in cls.cli_options}
    opts = {}
    for m in available():
        for flag, _field, _ in get_method(m).cli_options:
            v = getattr(a, _flag_dest(flag), None)
            if v is None:
                continue
            if flag not in mine:
                raise PrunetuneError(f"{flag} does not apply to method {a.method}")
            opts[mine[flag]] = v
    opts.update(parse_method_opts(a.method_opt))
    return opts


def parse_method_opts(items) -> dict:
    """``KEY=VALUE`` strings to a dict; values are read as JSON where they parse (numbers, true/false, lists)."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise PrunetuneError(f"--method-opt takes KEY=VALUE (got '{item}')")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _cmd_tune(a):
    from .api import tune
    from .tuning.api import summary

    eval_size = int(a.eval_size) if a.eval_size >= 1 and float(a.eval_size).is_integer() else a.eval_size
    res = tune(a.model, method=a.method, data=a.data, out=a.out, merge=a.merge, teacher=a.teacher,
               kd_temperature=a.kd_temperature, kd_weight=a.kd_weight, calib=a.calib, calib_samples=a.calib_samples,
               calib_seqlen=a.calib_seqlen, seq_len=a.seq_len, eval_size=eval_size, max_records=a.max_records,
               data_mode=a.data_mode, dtype=a.dtype, device=a.device, overwrite=a.overwrite, resume=a.resume,
               progress=not a.no_progress, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
               epochs=a.epochs, max_steps=a.max_steps, max_tokens=a.max_tokens, warmup=a.warmup, schedule=a.schedule,
               weight_decay=a.weight_decay, seed=a.seed, eval_every=a.eval_every,
               checkpoint_every=a.checkpoint_every, gradient_checkpointing=a.gradient_checkpointing or None,
               save_format=a.save_format, **_method_options(a))
    print(summary(res))
    if res.get("storage"):
        print(_storage_line(res["storage"]))
    print(f"wrote {a.out}")


def _cmd_merge(a):
    from .api import merge
    from .tuning.api import summary

    res = merge(a.adapters, out=a.out, method=a.method, model=a.model, dtype=a.dtype, device=a.device,
                overwrite=a.overwrite, save_format=a.save_format)
    print(summary(res))
    if res.get("storage"):
        print(_storage_line(res["storage"]))
    print(f"wrote {a.out}")


def _storage_line(st: dict) -> str:
    if st.get("format") == "dense":
        return f"stored dense: {st['weight_file_bytes_stored'] / 2**20:.1f} MiB of weight files"
    return (f"stored {st['matrices']} sparse matrices as {st['format']} ({st['sparsity']:.1%} zeros): "
            f"{st['matrix_ratio']:.3f}x their dense bytes; weight files {st['weight_file_bytes_stored'] / 2**20:.1f} "
            f"MiB = {st['checkpoint_ratio']:.3f}x dense")


def _cmd_convert(a):
    from .api import convert

    res = convert(a.model, out=a.out, save_format=a.save_format, overwrite=a.overwrite)
    print(_storage_line(res))
    print(f"wrote {a.out}")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise PrunetuneError(f"{what} must be comma-separated integers (got '{text}')") from None


def _cmd_bench(a):
    from .evaluation.speed import bench, summary_table
    from .paths import DEFAULT_MODEL

    models = [a.model or str(DEFAULT_MODEL), *a.compare]
    res = bench(models, batch_sizes=_ints(a.batch_sizes, "--batch-sizes"), seq_lens=_ints(a.seq_lens, "--seq-lens"),
                decode_tokens=a.decode_tokens, repeats=a.repeats, warmup=a.warmup, dtype=a.dtype,
                device=None if a.device == "auto" else a.device, sparse_2to4=a.sparse_2to4, out=a.out,
                threads=a.threads, memory_probe=not a.no_memory_probe)
    print(summary_table(res))
    if a.out:
        print(f"wrote {a.out}")


def _cmd_report(a):
    from .evaluation.report import report

    res = report(a.results, out_dir=a.out)
    print(f"wrote {res['report']}" + (f" and {len(res['plots'])} plot(s)" if res["plots"] else ""))


COMMANDS = {"eval": _cmd_eval, "prune": _cmd_prune, "shrink": _cmd_shrink, "tune": _cmd_tune, "merge": _cmd_merge,
            "convert": _cmd_convert, "bench": _cmd_bench, "report": _cmd_report, "demo": _cmd_demo}


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
