"""The one training loop shared by every tuning method (SPP, LoRA baselines, PAT).

A method plugs in by subclassing ``TuningMethod`` (``base.py``) and filling in its hooks; ``train()`` owns everything
else (data order, loss, optimiser, schedule, gradient accumulation, distributed data parallel through
``accelerate``, evaluation, checkpoints, resume, progress bar).

Per optimiser step (``step`` = 0, 1, ..., total_steps - 1)::

    method.on_step_begin(model, step, total_steps)           # e.g. PAT sets its mask temperature
    for each micro-batch of this process:                     # grad accumulation, DDP sync on the last
        loss = Σ [α·KD + (1 − α)·NLL](response tokens) / (tokens in the whole global batch) · world_size
        on the last micro-batch: loss += method.extra_loss(model, step, total_steps)[0]
        backward
    clip grads to max_grad_norm, AdamW step, scheduler step, zero grads
    method.on_step_end(model, step + 1, total_steps)          # number of steps done

The loss is computed from the final hidden states in chunks of positions (``losses.lm_loss``): the batch's
logits are never held at once. With a teacher (:class:`Distillation`: a frozen model in eval mode, same
tokenizer) ``KD = T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` over the same positions as the task loss, mixed
with weight ``α``; without one ``α = 0``. The history's ``loss`` is always the task NLL per label token (so runs
with and without distillation compare), ``kd`` the distillation term per label token.

The task loss is normalised by the label-token count of the *global* batch (all micro-batches of all
processes), so one process with batch B and N processes with batch B / N follow the same loss curve and
gradients (up to float summation order). ``extra_loss`` is added once per step on every process (DDP
averages identical gradients, so it counts once).

Data order: global batch ``k`` of epoch ``e`` is a slice of ``randperm(n_train, seed + e)``; its
``batch_size · grad_accum · world`` examples are cut into micro-batches and micro-batch ``j`` goes to process
``j % world``. The incomplete last global batch of an epoch is dropped. The order depends only on the
seed and the step, so resuming needs no data-loader state.

Checkpoints (every ``checkpoint_every`` steps, under ``out_dir/checkpoints/step-NNNNNN``, written to a
temporary folder then renamed): the method's adapters, AdamW and scheduler state, each process's RNG
state, the step, the history and a run fingerprint (train config, method config, base model, data).
``resume=True`` continues from the newest one and refuses one whose fingerprint differs. On CPU with the
same seed the resumed run ends with bit-identical adapter weights.

RNG: ``torch.manual_seed(seed)`` before ``method.prepare`` (identical adapter init on every process), then
``seed + process_index`` for training (dropout). bf16: ``"auto"`` uses bf16 autocast only on a CUDA GPU
that supports it (CPU stays fp32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunetuneError
from .base import TuningMethod  # noqa: F401  (the hooks train() calls)

log = logging.getLogger("prunetune")

SCHEDULES = ("cosine", "linear", "constant")
#: TrainConfig fields that do not change the trained weights (left out of the run fingerprint)
_NON_SEMANTIC = {"eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints", "stop_at_step",
                 "progress", "log_every", "gradient_checkpointing"}


@dataclass
class TrainConfig:
    lr: float = 4e-3
    epochs: float = 1.0
    #: when set, overrides epochs
    max_steps: int | None = None
    #: micro-batch size per process; global batch = batch_size · grad_accum · number of processes
    batch_size: int = 4
    grad_accum: int = 1
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    #: "auto" (bf16 on a CUDA GPU that supports it), True, False
    bf16: bool | str = "auto"
    max_grad_norm: float | None = 1.0
    #: evaluate on the held-out split every k steps and at the end (0 = only at the end; None = never)
    eval_every: int | None = 0
    eval_batch_size: int = 8
    #: checkpoint every k steps (0 = never)
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    #: stop after this many steps as if interrupted (no checkpoint written at the stop); not in the fingerprint
    stop_at_step: int | None = None
    progress: bool = True
    log_every: int = 1
    #: "auto", "cpu" or "cuda"
    device: str = "auto"
    #: recompute each decoder layer's activations in the backward instead of keeping them (less memory, one more
    #: forward of the layers per step); the same gradients
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise PrunetuneError(f"unknown schedule '{self.schedule}' (use {', '.join(SCHEDULES)})")
        for name in ("batch_size", "grad_accum"):
            if int(getattr(self, name)) <= 0:
                raise PrunetuneError(f"{name} must be positive (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps <= 0:
            raise PrunetuneError(f"max_steps must be positive (got {self.max_steps})")
        if self.max_steps is None and self.epochs <= 0:
            raise PrunetuneError(f"epochs must be positive (got {self.epochs})")
        if self.lr <= 0:
            raise PrunetuneError(f"learning rate must be positive (got {self.lr})")
        if self.warmup < 0:
            raise PrunetuneError(f"warmup must not be negative (got {self.warmup})")


# --- helpers -----------------------------------------------------------------------------------------

def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """Config plus, per tensor, name / shape / dtype / non-zero count / sum (cheap, catches other weights)."""
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    tensors = []
    for name, p in model.state_dict().items():
        if not torch.is_floating_point(p):
            continue
        tensors.append([name, list(p.shape), str(p.dtype), int(torch.count_nonzero(p)),
                        f"{float(p.double().sum()):.9e}"])
    return _hash([cfg, tensors])


def _lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclass
class Distillation:
    """A teacher for the loss: ``L = weight · KD + (1 − weight) · NLL`` at ``temperature``."""

    teacher: nn.Module
    temperature: float = 1.0
    weight: float = 1.0
    #: identifies the teacher in the run fingerprint (its model fingerprint)
    fingerprint: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise PrunetuneError(f"distillation temperature must be positive (got {self.temperature})")
        if not (math.isfinite(self.weight) and 0 <= self.weight <= 1):
            raise PrunetuneError(f"distillation weight must be in [0, 1] (got {self.weight})")
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def describe(self) -> dict:
        return {"temperature": self.temperature, "weight": self.weight, "teacher_fingerprint": self.fingerprint}


def _forward_loss(model, unwrapped, batch: dict, distill: Distillation | None, autocast):
    """``(L, NLL, KD)`` of one micro-batch (sums over its label tokens), without the batch's full logits."""
    from .losses import hidden_states_out, lm_loss

    t_hidden = t_head = None
    if distill is not None:
        with torch.no_grad(), autocast(), hidden_states_out(distill.teacher) as t_head:
            t_hidden = distill.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with autocast(), hidden_states_out(unwrapped) as head:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return lm_loss(hidden, batch["labels"], head, teacher_hidden=t_hidden, teacher_head=t_head,
                   alpha=distill.weight if distill is not None else 0.0,
                   temperature=distill.temperature if distill is not None else 1.0)


def _label_tokens(examples: list[dict]) -> int:
    return sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)


def _rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save(obj, path: Path) -> None:
    """torch.save through a file object: a full disk is then an OSError naming the problem, not a RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _checkpoints(out_dir: Path) -> list[Path]:
    d = out_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class _Runner:
    """State of one train() call (kept in one place so checkpoints can save all of it)."""

    def __init__(self, accelerator, model, method, data, config, out_dir, pad_id):
        self.acc, self.model, self.method, self.data, self.cfg = accelerator, model, method, data, config
        self.out_dir, self.pad_id = out_dir, pad_id
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.global_bs = config.batch_size * config.grad_accum * self.world
        self.steps_per_epoch = len(data.train) // self.global_bs

    def optimise(self, params, distill, fingerprint: str, parts: dict) -> None:
        """AdamW over ``params`` and the schedule over the run's total steps."""
        cfg = self.cfg
        self.params, self.distill, self.fingerprint, self.parts = params, distill, fingerprint, parts
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg.schedule, cfg.warmup, self.total))

    def restore(self, ckpt: Path, state: dict) -> tuple[int, list]:
        """Optimiser, schedule and this process's RNG from ``ckpt``; returns (steps done, history)."""
        self.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.acc.device, weights_only=False))
        self.sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        rng_file = ckpt / f"rng-{self.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("checkpoint has no RNG state for process %d; continuing with a fresh seed", self.rank)
        log.info("resuming from %s (step %d of %d)", ckpt, state["step"], self.total)
        return state["step"], state["history"]

    def step(self, step: int) -> dict:
        """One optimiser step (every micro-batch of this process, DDP-synced on the last); its history record."""
        from .data import collate

        acc, method, t0 = self.acc, self.method, time.perf_counter()
        unwrapped = acc.unwrap_model(self.model)
        method.on_step_begin(unwrapped, step, self.total)
        batch = self.global_batch(step)
        n_label = _label_tokens(batch)
        n_tokens = sum(len(e["input_ids"]) for e in batch)
        micro = self.my_micro_batches(batch)
        nll_local = torch.zeros((), dtype=torch.float64, device=acc.device)
        kd_local = torch.zeros((), dtype=torch.float64, device=acc.device)
        extra_logs: dict = {}
        for a, mb in enumerate(micro):
            b = {k: v.to(acc.device) for k, v in collate(mb, self.pad_id).items()}
            last = a == len(micro) - 1
            with acc.no_sync(self.model) if not last else _nullcontext():
                lsum, nll, kd = _forward_loss(self.model, unwrapped, b, self.distill, acc.autocast)
                loss = lsum * (self.world / max(1, n_label))
                if last:
                    extra, extra_logs = method.extra_loss(unwrapped, step, self.total)
                    if extra is not None:
                        loss = loss + extra
                acc.backward(loss)
            nll_local += nll
            kd_local += kd
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        method.on_step_end(unwrapped, step + 1, self.total)
        nll_all = acc.reduce(nll_local, "sum")
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": float(nll_all) / max(1, n_label), "lr": lr, "tokens_per_s": n_tokens / dt,
               "step_s": dt}
        if self.distill is not None:
            rec["kd"] = float(acc.reduce(kd_local, "sum")) / max(1, n_label)
        rec.update({k: float(v) for k, v in (extra_logs or {}).items()})
        return rec

    def run(self, start: int, history: list) -> tuple[list, float | None, bool]:
        """Steps ``start .. total`` with evaluation, progress and checkpoints: ``(history, eval loss, stopped)``."""
        from tqdm.auto import tqdm

        cfg, data = self.cfg, self.data
        bar = tqdm(total=self.total, initial=start, disable=not (self.acc.is_main_process and cfg.progress),
                   desc=f"tune {self.method.name}", dynamic_ncols=True)
        stopped = False
        eval_loss = None
        for step in range(start, self.total):
            rec = self.step(step)
            done = step + 1
            if cfg.eval_every is not None and data.eval and (
                (cfg.eval_every and done % cfg.eval_every == 0) or done == self.total
            ):
                eval_loss = self.evaluate()
                rec["eval_loss"] = eval_loss
            history.append(rec)
            if self.acc.is_main_process and cfg.progress:
                post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                post.update({k: f"{v:.4g}" for k, v in rec.items()
                             if k not in ("step", "loss", "tokens_per_s", "lr", "step_s")})
                bar.set_postfix(post, refresh=False)
            bar.update(1)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < self.total:
                self.save_checkpoint(done, history)
            if cfg.stop_at_step is not None and done >= cfg.stop_at_step and done < self.total:
                stopped = True
                break
        bar.close()
        return history, eval_loss, stopped

    def save_checkpoint(self, step: int, history: list) -> None:
        """Adapters, optimiser, schedule, every process's RNG, step and history: written to a temporary folder,
        then renamed, so a killed save leaves the previous checkpoint intact."""
        acc = self.acc
        ck = self.out_dir / "checkpoints"
        tmp = ck / f".tmp-step-{step:06d}"
        final = ck / f"step-{step:06d}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        _save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.method.save_adapters(acc.unwrap_model(self.model), tmp / "adapters")
            _save(self.opt.state_dict(), tmp / "optimizer.pt")
            _save(self.sched.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(
                {"step": step, "total_steps": self.total, "fingerprint": self.fingerprint,
                 "fingerprint_parts": self.parts, "history": history}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in _checkpoints(self.out_dir)[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def global_batch(self, step: int) -> list[dict]:
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(len(self.data.train), generator=g)
        idx = perm[k * self.global_bs:(k + 1) * self.global_bs].tolist()
        return [self.data.train[i] for i in idx]

    def my_micro_batches(self, batch: list[dict]) -> list[list[dict]]:
        bs = self.cfg.batch_size
        micro = [batch[j * bs:(j + 1) * bs] for j in range(self.cfg.grad_accum * self.world)]
        return [m for j, m in enumerate(micro) if j % self.world == self.rank]

    @torch.no_grad()
    def evaluate(self) -> float | None:
        from .data import collate

        ex = self.data.eval
        if not ex:
            return None
        model = self.acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        mine = ex[self.rank::self.world]
        tot = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        bs = self.cfg.eval_batch_size
        for i in range(0, len(mine), bs):
            b = collate(mine[i:i + bs], self.pad_id)
            b = {k: v.to(self.acc.device) for k, v in b.items()}
            _, nll, _ = _forward_loss(model, model, b, None, self.acc.autocast)
            tot[0] += nll
            tot[1] += int((b["labels"][:, 1:] != -100).sum())
        tot = self.acc.reduce(tot, "sum")
        model.train(was_training)
        return float(tot[0] / tot[1]) if tot[1] > 0 else None


def _accelerator(cfg: TrainConfig, method):
    """The ``accelerate`` Accelerator for ``cfg.device`` / ``cfg.bf16`` (bf16 autocast only on a CUDA GPU)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PrunetuneError("device 'cuda' is not available on this machine (no CUDA GPU)")
    bf16 = cfg.bf16
    if bf16 == "auto":
        bf16 = (not use_cpu) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(cpu=use_cpu, mixed_precision="bf16" if bf16 else "no",
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=bool(method.find_unused_parameters))])


def _check_data(data, cfg: TrainConfig, world: int) -> int:
    """The global batch size, once the training set is known to hold at least one."""
    if not data.train:
        raise PrunetuneError("the training set is empty")
    global_bs = cfg.batch_size * cfg.grad_accum * world
    if len(data.train) < global_bs:
        raise PrunetuneError(
            f"training set has {len(data.train)} examples, fewer than one global batch of {global_bs} "
            f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes)"
        )
    return global_bs


def _fingerprint(model, method, data, cfg: TrainConfig, distill) -> tuple[str, dict]:
    """The run's fingerprint and its parts (train config, method, base model, data, teacher)."""
    parts = {
        "train": _hash({k: v for k, v in asdict(cfg).items() if k not in _NON_SEMANTIC}),
        "method": _hash(method.fingerprint()),
        "model": model_fingerprint(model),
        "data": data.fingerprint() if hasattr(data, "fingerprint") else _hash([data.train, data.eval]),
    }
    if distill is not None:
        parts["distill"] = _hash(distill.describe())
    return _hash(parts), parts


def _resume_point(out_dir: Path, resume: bool, fingerprint: str, parts: dict) -> tuple[Path | None, dict | None]:
    """``(checkpoint, its state)`` to continue from, or ``(None, None)``; refuses a foreign or unasked resume."""
    ckpts = _checkpoints(out_dir)
    if ckpts and not resume:
        raise PrunetuneError(f"{out_dir} already holds checkpoints of a run; resume it or choose an empty directory")
    if not (resume and ckpts):
        return None, None
    state = json.loads((ckpts[-1] / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        differ = [k for k in parts if state.get("fingerprint_parts", {}).get(k) != parts[k]]
        raise PrunetuneError(
            f"cannot resume from {ckpts[-1]}: it belongs to a different run "
            f"(differs in: {', '.join(differ) or 'fingerprint'})"
        )
    return ckpts[-1], state


def train(model: nn.Module, tokenizer, method: TuningMethod, data, config: TrainConfig | None = None,
          out_dir=None, resume: bool = False, distill: Distillation | None = None) -> dict:
    """Fine-tune ``model`` with ``method`` on ``data`` (a ``TuneData``), distilling from ``distill.teacher``
    when given. See the module docstring.

    Returns ``{"history": [{"step", "loss", "lr", "tokens_per_s", ["eval_loss"], <method scalars>}...],
    "steps", "total_steps", "eval_loss", "fingerprint", "stopped", "wall_s", "model"}`` where ``model`` is
    the trained (unwrapped, not merged) model.
    """
    cfg = config or TrainConfig()
    if out_dir is None:
        raise PrunetuneError("train() needs an output directory")
    out_dir = Path(out_dir)
    acc = _accelerator(cfg, method)
    global_bs = _check_data(data, cfg, acc.num_processes)
    fingerprint, parts = _fingerprint(model, method, data, cfg, distill)
    ckpt, state = _resume_point(out_dir, resume, fingerprint, parts)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = method.prepare(model)
    model.train()
    if ckpt is not None:
        method.load_adapters(model, ckpt / "adapters")
    params = method.trainable_parameters(model)
    if not params:
        raise PrunetuneError(f"method '{method.name}' left no trainable parameter")
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise PrunetuneError(f"model type '{model.config.model_type}' does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = acc.prepare(model)
    if distill is not None:
        distill.teacher.to(acc.device)
    runner = _Runner(acc, model, method, data, cfg, out_dir, tokenizer.pad_token_id
                     if tokenizer is not None and tokenizer.pad_token_id is not None else 0)
    runner.optimise(params, distill, fingerprint, parts)

    torch.manual_seed(cfg.seed + acc.process_index)
    random.seed(cfg.seed + acc.process_index)
    start, history = 0, []
    if ckpt is not None:
        start, history = runner.restore(ckpt, state)

    t_start = time.perf_counter()
    history, eval_loss, stopped = runner.run(start, history)

    final_model = acc.unwrap_model(model)
    final_model.eval()
    result = {"history": history, "steps": history[-1]["step"] if history else start, "total_steps": runner.total,
              "eval_loss": eval_loss, "fingerprint": fingerprint, "stopped": stopped,
              "wall_s": time.perf_counter() - t_start, "world_size": acc.num_processes, "global_batch": global_bs,
              "trainable_parameters": sum(p.numel() for p in params)}
    acc.wait_for_everyone()
    if acc.is_main_process and not stopped:
        out_dir.mkdir(parents=True, exist_ok=True)
        method.save_adapters(final_model, out_dir / "adapters")
        (out_dir / "train_log.json").write_text(json.dumps(result, indent=1))
    acc.wait_for_everyone()
    result["model"] = final_model
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
