"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, offline.

``evaluate_zeroshot`` wraps an already-loaded model and tokenizer in lm-eval's ``HFLM`` and runs
lm-eval's own evaluator on task definitions kept in ``evaluation/tasks/*.yaml``. Each definition is an
ordinary lm-eval task config (``output_type: multiple_choice``, Jinja templates, no Python hooks) plus a
``prunetune`` block naming its local JSONL file and the fields every line must have; at run time the
config gets ``dataset_path: json`` and ``dataset_kwargs: {data_files: <file>}`` so nothing is fetched
from the Hub. Files are read from ``tasks_dir`` (default: ``data_dir()/tasks``) and validated before
lm-eval sees them.

Scoring is lm-eval's: for each choice, the summed log-probability of the continuation
``" " + choice`` (tokens after the prompt) under the model; ``acc`` picks the arg-max, ``acc_norm``
the arg-max of log-likelihood divided by the choice's length in characters. Zero-shot, no chat
template, lm-eval's default tokenisation (the tokenizer's own special tokens, e.g. a BOS for
Llama-style tokenizers; ``protocol["bos_prepended"]`` says whether one was added), prompts truncated
on the left to the model's context length. ``limit`` takes the first ``limit`` documents of each
file, in file order.

Prompts (``{choice}`` is scored after a single space), chosen to match lm-eval's tasks of the same name:

=============  =========================================================================  ===========
task           prompt                                                                     file
=============  =========================================================================  ===========
arc_easy       ``Question: {question}\\nAnswer: {choice}`` (the file's query already       arc_easy
               starts with "Question: ")
arc_challenge  same as arc_easy                                                           arc_challenge
boolq          ``{passage}\\nQuestion: {question}?\\nAnswer: {no|yes}`` (the file's          boolq
               "Passage: " prefix is dropped)
copa           ``{premise without period} because|therefore {choice}`` (lm-eval's          copa
               built-in copa puts two spaces before the choice; here one)
openbookqa     ``{question_stem} {choice}``                                               openbook_qa
piqa           ``Question: {goal}\\nAnswer: {solution}``                                   piqa
winogrande     partial scoring: ``{sentence up to the blank}{option}`` as the context,     winogrande
               the rest of the sentence as the scored continuation
rte            ``{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer: {True|False}``  rte
siqa           ``Q: {context} {question}\\nA: {answer}``                                   siqa
=============  =========================================================================  ===========

WinoGrande scores the same continuation after every option, so length normalisation cannot change
its ranking: its ``acc_norm`` is reported equal to ``acc``. The headline ``average`` is the unweighted
mean over the requested tasks; ``average_metric`` names the one to quote (``acc``).

A task name that is not one of ours is handed to lm-eval's own task registry (its datasets come from
the Hugging Face Hub, so this works only online).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from ..errors import PrunetuneError
from ..paths import data_dir

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
AVERAGE_METRIC = "acc"
NUM_FEWSHOT = 0
FEWSHOT_SEED = 1234
SCORING = ("lm-eval multiple_choice: log-likelihood of each choice (sum over its tokens) after the prompt; "
           "acc = arg-max, acc_norm = arg-max of log-likelihood / choice length in characters")

_TYPES = {"str": (str, "a string"), "int": (int, "an integer"), "list": (list, "a list")}
# lm-eval warns when handed a model object instead of a name; that is the intended use here
_HFLM_INSTANCE_WARNINGS = ("`pretrained` model kwarg is not of type `str`",
                          "Passed an already-initialized model through `pretrained`")


def local_tasks() -> list[str]:
    """Names of the tasks defined in ``evaluation/tasks`` (runnable offline)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _definition(name: str) -> dict:
    with open(TASKS_DIR / f"{name}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def task_definition(name: str) -> dict:
    """The lm-eval config of local task ``name`` with its ``prunetune`` block (a fresh copy)."""
    if name not in local_tasks():
        raise PrunetuneError(f"unknown task '{name}' (local tasks: {', '.join(local_tasks())})")
    return json.loads(json.dumps(_definition(name)))


@functools.lru_cache(maxsize=1)
def _builtin_task_manager():
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager()


def _check_names(tasks) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)):
        raise PrunetuneError(f"tasks must be a list of task names (got {type(tasks).__name__})")
    if not tasks:
        raise PrunetuneError(f"no tasks given (local tasks: {', '.join(local_tasks())})")
    names: list[str] = []
    for t in tasks:
        if not isinstance(t, str) or not t.strip():
            raise PrunetuneError(f"task names must be non-empty strings (got {t!r})")
        if t.strip() not in names:
            names.append(t.strip())
    return names


def _check_int(value, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrunetuneError(f"{name} must be a positive integer{what} (got {value!r})")
    if value < 1:
        raise PrunetuneError(f"{name} must be a positive integer{what} (got {value})")


def _resolve_tasks_dir(tasks_dir) -> Path:
    if tasks_dir is None:
        d = data_dir()
        if d is None:
            raise PrunetuneError("no local data folder for the task files: pass tasks_dir or set PRUNETUNE_DATA")
        tasks_dir = d / "tasks"
    p = Path(tasks_dir).expanduser()
    if not p.is_dir():
        raise PrunetuneError(f"tasks_dir {p} does not exist or is not a folder")
    return p


def check_task_file(path: Path, spec: dict) -> tuple[str, int]:
    """Validate every line of a local task file against its definition; returns (sha256, rows)."""
    if not path.is_file():
        raise PrunetuneError(f"task file {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrunetuneError(f"task file {path} is not UTF-8 text (byte {e.start})") from None
    rows = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"task file {path}, line {lineno}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrunetuneError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(doc, dict):
            raise PrunetuneError(f"{where}: not a JSON object")
        for field, tname in spec["fields"].items():
            if field not in doc:
                raise PrunetuneError(f"{where}: missing field '{field}'")
            typ, desc = _TYPES[tname]
            v = doc[field]
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise PrunetuneError(f"{where}: field '{field}' should be {desc} (got {type(v).__name__})")
        if "choices" in spec:
            choices = doc[spec["choices"]]
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise PrunetuneError(f"{where}: field '{spec['choices']}' should be a list of at least two strings")
            n_choices = len(choices)
        else:
            n_choices = spec["num_choices"]
        gold = doc[spec["gold"]]
        if not 0 <= gold < n_choices:
            raise PrunetuneError(f"{where}: field '{spec['gold']}' is {gold}, out of range for {n_choices} choices")
        rows += 1
    if rows == 0:
        raise PrunetuneError(f"task file {path} has no rows")
    return hashlib.sha256(data).hexdigest(), rows


def _local_config(name: str, tasks_dir: Path) -> tuple[dict, dict]:
    cfg = task_definition(name)
    spec = cfg.pop("prunetune")
    path = (tasks_dir / spec["file"]).resolve()
    sha, rows = check_task_file(path, spec)
    cfg.update(dataset_path="json", dataset_kwargs={"data_files": str(path)}, test_split="train",
               num_fewshot=NUM_FEWSHOT)
    info = {
        "source": "local",
        "file": str(path),
        "sha256": sha,
        "rows": rows,
        "prompt": spec["prompt"],
        "doc_to_text": cfg["doc_to_text"],
        "doc_to_choice": cfg["doc_to_choice"],
        "doc_to_target": cfg["doc_to_target"],
        "target_delimiter": cfg.get("target_delimiter", " "),
        "metrics": [m["metric"] for m in cfg["metric_list"]],
    }
    if "acc_norm" not in info["metrics"]:
        info["acc_norm"] = "equal to acc (the scored continuation is the same for every choice)"
    return cfg, info


class _DropMessages(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs at WARNING and datasets shows no progress bars inside; both restored afterwards."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None


def _check_device(device):
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PrunetuneError(f"invalid device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunetuneError(f"device {device!r} requested but CUDA is not available")
    return dev


def _metric(metrics: dict, key: str):
    """lm-eval reports 'acc,none'; take the unfiltered value, else the first filter's."""
    v = metrics.get(f"{key},none")
    if v is None:
        for k, val in metrics.items():
            if k.split(",")[0] == key:
                v = val
                break
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def evaluate_zeroshot(model, tokenizer, tasks: list[str], *, limit: int | None = None,
                      tasks_dir: str | Path | None = None, batch_size: int = 8, device: str | None = None) -> dict:
    """Zero-shot log-likelihood multiple-choice accuracy of ``model`` on ``tasks`` through lm-eval.

    Args:
        model: a loaded ``transformers`` causal LM (left in the mode and on the device it came in).
        tokenizer: its tokenizer.
        tasks: task names; ours (see ``local_tasks()``) run offline from ``tasks_dir``, any other name is
            looked up in lm-eval's built-in registry (datasets from the Hub).
        limit: evaluate the first ``limit`` documents of each task (all when None).
        tasks_dir: folder with the task JSONL files (default ``data_dir()/tasks``).
        batch_size: lm-eval's batch size for log-likelihood requests.
        device: run on this device (the model is moved there and back); default: where the model is.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "correct",
        "correct_norm"}}, "average": {"acc", "acc_norm"}, "average_metric": "acc", "protocol": {...}}``;
        ``correct`` is each document's 0/1 in document order (for `paired_difference`).
    """
    names = _check_names(tasks)
    if limit is not None:
        _check_int(limit, "limit", " (documents per task) or None")
    _check_int(batch_size, "batch_size", "")
    dev = _check_device(device)

    ours = set(local_tasks())
    local = [n for n in names if n in ours]
    builtin = [n for n in names if n not in ours]
    tdir = _resolve_tasks_dir(tasks_dir) if (local or tasks_dir is not None) else None

    task_info: dict[str, dict] = {}
    local_specs = []
    for name in local:
        cfg, info = _local_config(name, tdir)
        local_specs.append(cfg)
        task_info[name] = info

    from lm_eval.tasks import TaskManager

    if builtin:
        manager = _builtin_task_manager()
        for name in builtin:
            if name not in manager.all_tasks:
                raise PrunetuneError(f"unknown task '{name}' (local tasks: {', '.join(sorted(ours))})")
            task_info[name] = {"source": "lm-eval built-in task (dataset from the Hugging Face Hub)"}
    else:
        manager = TaskManager(include_defaults=False)

    with _quiet_lm_eval():
        loaded: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
        if local_specs:
            part = manager.load(local_specs)
            for k in loaded:
                loaded[k].update(part.get(k, {}))
        if builtin:
            try:
                part = manager.load(builtin)
            except Exception as e:  # network, missing dataset, ... : the user asked for a Hub task
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PrunetuneError(f"could not load lm-eval task(s) {', '.join(builtin)} "
                                     f"(built-in tasks need the Hugging Face Hub): {msg}") from e
            for k in loaded:
                loaded[k].update(part.get(k, {}))
        for task_obj in loaded["tasks"].values():
            task_obj.set_config(key="num_fewshot", value=NUM_FEWSHOT)
            task_obj.set_fewshot_seed(seed=FEWSHOT_SEED)

        results, lm_facts = _run(model, tokenizer, loaded, limit=limit, batch_size=batch_size, device=dev)

    return _summarise(results, names, task_info, lm_facts, limit=limit, batch_size=batch_size)


def _run(model, tokenizer, loaded, *, limit, batch_size, device):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    home = _model_device(model)
    if device is not None:
        model.to(device)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    drop = _DropMessages(_HFLM_INSTANCE_WARNINGS)
    hf_logger.addFilter(drop)
    try:
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        finally:
            hf_logger.removeFilter(drop)
        bos = getattr(tokenizer, "bos_token_id", None)
        facts = {"bos_prepended": bos is not None and lm.tok_encode("a")[:1] == [bos],
                 "max_length": int(lm.max_length), "device": str(lm.device)}
        results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True)
    finally:
        model.train(was_training)
        if device is not None and home is not None:
            model.to(home)
    return results, facts


def _outcomes(samples: list[dict]) -> dict:
    """Each document's result in document order, as a string of 0/1 (``correct``, ``correct_norm``), so that
    two models scored on the same documents can be compared pair by pair (`paired_difference`)."""
    rows = sorted(samples, key=lambda x: x["doc_id"])
    out = {}
    for key, metric in (("correct", "acc"), ("correct_norm", "acc_norm")):
        vals = [r.get(metric) for r in rows]
        if vals and all(v in (0, 1, 0.0, 1.0, True, False) for v in vals):
            out[key] = "".join("1" if v else "0" for v in vals)
    return out


#: two models' accuracies differ beyond noise when the paired difference is at least this many standard errors
#: away from zero (two-sided 95%)
NOISE_Z = 1.96


def paired_difference(a: str, b: str) -> dict:
    """Accuracy of A minus accuracy of B on the same documents (strings of 0/1 from `_outcomes`), with the
    standard error of the mean of the per-document differences: pairing removes the variance the two models
    share (which documents are hard), so it resolves far smaller differences than two independent stderrs."""
    if len(a) != len(b) or not a:
        raise PrunetuneError(f"paired comparison needs the same documents (got {len(a)} and {len(b)} results)")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n)
    return {"diff": mean, "stderr": se, "n": n, "within_noise": abs(mean) < NOISE_Z * se or (mean == 0 and se == 0)}


def _summarise(results: dict, names: list[str], task_info: dict, lm_facts: dict, *, limit, batch_size) -> dict:
    per_task: dict[str, dict] = {}
    n_samples = results.get("n-samples", {})
    for name, metrics in results["results"].items():
        acc, acc_se = _metric(metrics, "acc"), _metric(metrics, "acc_stderr")
        norm, norm_se = _metric(metrics, "acc_norm"), _metric(metrics, "acc_norm_stderr")
        info = task_info.get(name, {})
        if norm is None and info.get("source") == "local" and "acc_norm" in info:
            norm, norm_se = acc, acc_se
        n = n_samples.get(name, {}).get("effective")
        per_task[name] = {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se,
                          "n": int(n) if n is not None else None}
        per_task[name].update(_outcomes(results.get("samples", {}).get(name) or []))
    # a built-in name may be a tag whose tasks are reported one by one: then average those
    headline = [per_task[n] for n in names if n in per_task] or list(per_task.values())
    average = {"acc": _mean(t["acc"] for t in headline), "acc_norm": _mean(t["acc_norm"] for t in headline)}
    try:
        version = importlib_metadata.version("lm_eval")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover
        import lm_eval

        version = getattr(lm_eval, "__version__", "unknown")
    protocol = {
        "harness": "lm-evaluation-harness",
        "lm_eval_version": version,
        "limit": limit,
        "num_fewshot": NUM_FEWSHOT,
        "batch_size": batch_size,
        "scoring": SCORING,
        "average": f"unweighted mean over the requested tasks; headline metric: {AVERAGE_METRIC}",
        **lm_facts,
        "tasks": {n: task_info.get(n, {}) for n in names},
    }
    return {"tasks": per_task, "average": average, "average_metric": AVERAGE_METRIC, "protocol": protocol}
