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
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last finished layer (kept in the hidden .<out>.partial folder)")

    # tune ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "tune", help="fine-tune: spp (keeps the sparsity pattern), lora, lora-masked, pat (shrinks the model)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a (pruned) model and write adapters, a plain HF checkpoint and tune_report.json.\n\n"
                    "  spp          sparsity-preserving: trainable factors multiply the frozen sparse weights; with\n"
                    "               --merge the checkpoint has exactly the input's zero pattern (checked and recorded).\n"
                    "               A dense input model only gets a warning (nothing to preserve; see --on-dense).\n"
                    "  lora         LoRA baseline; --merge gives W + BA (dense: the sparsity is lost)\n"
                    "  lora-masked  LoRA baseline; --merge adds BA only where W is non-zero\n"
                    "  pat          pruning-aware tuning: learns which hidden channels to drop and always writes the\n"
                    "               smaller plain checkpoint (hidden size round((1 - ratio) * d)); RMSNorm models only\n\n"
                    "Interrupted runs keep their checkpoints in the hidden .<out>.partial folder next to --out;\n"
                    "rerun the same command with --resume to continue (bit-identical on CPU).",
    )
    _add_common_model(p)
    p.add_argument("--method", required=True, help="spp | lora | lora-masked | pat")
    p.add_argument("--data", required=True,
                   help="Alpaca .jsonl (instruction/input/output; loss on the response only), .jsonl with 'text' "
                        "or .txt (packed windows), or 'alpaca' (local data folder) / 'tinystories' (bundled)")
    p.add_argument("--out", required=True, help="output folder (written in one rename at the end)")
    p.add_argument("--seq-len", "--seqlen", dest="seq_len", type=int, default=256,
                   help="tokens per example: cut-off (instruction data) or window (text) (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step; global batch = batch-size x grad-accum (default 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: spp 4e-3, lora 2e-4, pat 5e-5)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--schedule", default="cosine", help="cosine | linear | constant (default cosine)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, split and adapter init (default 0)")
    p.add_argument("--eval-size", type=float, default=0.05,
                   help="held-out split: a fraction (< 1) or a number of examples (default 0.05)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (default 0: at the end only)")
    p.add_argument("--max-records", type=int, default=None, help="read only the first N records of the data file")
    p.add_argument("--data-mode", default="auto", help="auto | instruction | text (default auto)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps, for --resume (default 100; 0 = never)")
    p.add_argument("--merge", action="store_true", help="spp/lora: also write the merged plain checkpoint (pat always does)")
    p.add_argument("--ratio", type=float, default=0.25, help="pat: fraction of hidden channels removed, in (0, 1) (default 0.25)")
    p.add_argument("--spp-groups", type=int, default=16, help="spp: row blocks sharing one factor row (default 16)")
    p.add_argument("--spp-r", type=int, default=16, help="spp: r (scaling = alpha / r) (default 16)")
    p.add_argument("--spp-alpha", type=float, default=32.0, help="spp: alpha (default 32)")
    p.add_argument("--spp-dropout", type=float, default=0.05,
                   help="spp: dropout on the adapter input (default 0.05); 0 fuses adapter and weight into one "
                        "matmul (faster steps)")
    p.add_argument("--lora-r", type=int, default=8, help="lora/pat: LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="lora/pat: LoRA alpha (default 16)")
    p.add_argument("--hio-rank", type=int, default=None, help="pat: rank of the identity operators (default 5%% of hidden size)")
    p.add_argument("--no-identity-loss", action="store_true", help="pat: drop the identity regulariser")
    p.add_argument("--frozen-mask", action="store_true", help="pat ablation: a fixed channel block instead of a learned mask")
    p.add_argument("--mask-init", default="zero", choices=["zero", "activation"],
                   help="pat: W_M starts at 0 (as published) or warm-started from each channel's activation energy "
                        "on the first training examples or --mask-init-data (default zero)")
    p.add_argument("--mask-init-scale", type=float, default=0.1,
                   help="pat, --mask-init activation: spread of the initial mask logits (default 0.1)")
    p.add_argument("--mask-init-data", default=None,
                   help="pat, --mask-init activation: score channels on this corpus (c4, wikitext2, tinystories or "
                        "a text file) instead of the first training examples")
    p.add_argument("--mask-init-examples", type=int, default=64,
                   help="pat, --mask-init activation: examples (or corpus windows) scored (default 64)")
    p.add_argument("--mask-init-seqlen", type=int, default=512,
                   help="pat, --mask-init-data: tokens per corpus window (default 512)")
    p.add_argument("--milestone", type=float, default=1 / 3,
                   help="pat: fraction of the steps after which the mask is binary (default 1/3)")
    p.add_argument("--on-dense", default="warn", help="spp on a dense model: warn (default) | error | ignore")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run of the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    # merge -----------------------------------------------------------------------------------
    p = sub.add_parser("merge", help="turn tune adapters into a plain HF checkpoint",
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
    p.add_argument("--overwrite", action="store_true")

    # bench ------------------------------------------------------------------------------------
    p = sub.add_parser("bench", help="prefill/decode speed, memory, size: models side by side, interleaved",
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

    # report -----------------------------------------------------------------------------------
    p = sub.add_parser("report", help="Markdown tables and PNG plots from result JSONs",
                       description="Turn prunetune eval / prune / bench results (and benchmark result files) into "
                                   "report.md with tables and PNG plots: perplexity vs sparsity per method, accuracy "
                                   "per task, speed vs batch size.")
    p.add_argument("results", nargs="+", help="result JSON files or prune output folders")
    p.add_argument("--out", required=True, help="folder for report.md and the plots")

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


def _cmd_tune(a):
    from .api import tune
    from .tune.api import summary

    eval_size = int(a.eval_size) if a.eval_size >= 1 and float(a.eval_size).is_integer() else a.eval_size
    res = tune(a.model, method=a.method, data=a.data, out=a.out, seq_len=a.seq_len, batch_size=a.batch_size,
               grad_accum=a.grad_accum, lr=a.lr, epochs=a.epochs, max_steps=a.max_steps, warmup=a.warmup,
               schedule=a.schedule, weight_decay=a.weight_decay, seed=a.seed, eval_every=a.eval_every,
               eval_size=eval_size, max_records=a.max_records, data_mode=a.data_mode,
               checkpoint_every=a.checkpoint_every, merge=a.merge, ratio=a.ratio, spp_groups=a.spp_groups,
               spp_r=a.spp_r, spp_alpha=a.spp_alpha, spp_dropout=a.spp_dropout, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
               hio_rank=a.hio_rank, no_identity_loss=a.no_identity_loss, frozen_mask=a.frozen_mask,
               mask_init=a.mask_init, mask_init_scale=a.mask_init_scale,
               mask_init_data=a.mask_init_data, mask_init_examples=a.mask_init_examples,
               mask_init_seqlen=a.mask_init_seqlen, milestone=a.milestone, on_dense=a.on_dense, dtype=a.dtype, device=a.device, overwrite=a.overwrite, resume=a.resume,
               progress=not a.no_progress)
    print(summary(res))
    print(f"wrote {a.out}")


def _cmd_merge(a):
    from .api import merge
    from .tune.api import summary

    res = merge(a.adapters, out=a.out, method=a.method, model=a.model, dtype=a.dtype, device=a.device,
                overwrite=a.overwrite)
    print(summary(res))
    print(f"wrote {a.out}")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise PrunetuneError(f"{what} must be comma-separated integers (got '{text}')") from None


def _cmd_bench(a):
    from .evaluate.speed import bench, summary_table
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
    from .evaluate.report import report

    res = report(a.results, out_dir=a.out)
    print(f"wrote {res['report']}" + (f" and {len(res['plots'])} plot(s)" if res["plots"] else ""))


COMMANDS = {"eval": _cmd_eval, "prune": _cmd_prune, "tune": _cmd_tune, "merge": _cmd_merge, "bench": _cmd_bench,
            "report": _cmd_report, "demo": _cmd_demo}


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
