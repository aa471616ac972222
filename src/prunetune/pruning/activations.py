"""The hidden states between two decoder layers for every calibration batch, and the resume journal.

The driver keeps two slots, ``a`` and ``b``: a layer reads its inputs from one and writes its outputs to the
other, then they swap. Each slot is a file of fixed-size records (one per batch, raw tensor bytes) in the run's
working folder (``.<out>.partial/resume/hidden-a.bin``), read back one batch at a time with plain reads — not a
memory map, so nothing of it stays resident. When the whole cache fits the RAM budget the slot also keeps its
batches in RAM and reads come from there; the file is written either way, because it is the resume state:
after a finished layer its outputs are already on disk, and ``journal.json`` (layer, slot, per-linear results,
a few hundred bytes per layer) is replaced atomically. Nothing else is rewritten per layer, so resuming costs
one small file write per layer instead of a copy of the whole cache, and peak memory does not grow with the
number of calibration samples once the cache is larger than the budget.

RAM budget (``--cache-budget``): ``auto`` is a quarter of the memory available when the run starts; a number
of MB; or 0 for "always read from disk". It must hold at least one batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import OutputWriteError, PrunetuneError
from ..manifest import trim_heap

JOURNAL = "journal.json"


def available_ram_mb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except Exception:  # no psutil or no /proc: a conservative constant
        return 4096.0


def parse_budget(budget) -> float:
    """The RAM budget in MB: ``"auto"`` (a quarter of the memory available now) or a non-negative number."""
    if budget is None or str(budget).strip().lower() == "auto":
        return available_ram_mb() / 4
    try:
        v = float(budget)
    except (TypeError, ValueError):
        raise PrunetuneError(f"--cache-budget must be 'auto' or a number of MB (got '{budget}')") from None
    if not v >= 0:
        raise PrunetuneError(f"--cache-budget must not be negative (got {budget})")
    return v


class Slot:
    """One copy of the hidden states of every batch: a record file, and the batches in RAM when they fit."""

    def __init__(self, path: Path, shapes: list[tuple], dtype: torch.dtype, in_ram: bool):
        self.path, self.shapes, self.dtype, self.in_ram = Path(path), [tuple(s) for s in shapes], dtype, in_ram
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.offsets, off = [], 0
        for s in self.shapes:
            self.offsets.append(off)
            n = 1
            for x in s:
                n *= x
            off += n * self.itemsize
        self.nbytes = off
        self.ram: list[torch.Tensor | None] = [None] * len(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.read(i)

    def __iter__(self):
        return (self.read(i) for i in range(len(self.shapes)))

    def tokens(self) -> int:
        return sum(s[0] * s[1] for s in self.shapes)

    def create(self) -> None:
        """An empty file of the right size (sparse where the file system allows)."""
        with open(self.path, "wb") as f:
            f.truncate(self.nbytes)

    def write(self, i: int, t: torch.Tensor) -> None:
        t = t.detach().to("cpu", self.dtype).contiguous()
        if tuple(t.shape) != self.shapes[i]:
            raise RuntimeError(f"batch {i} has shape {tuple(t.shape)}, the cache holds {self.shapes[i]}")
        try:
            with open(self.path, "r+b") as f:
                f.seek(self.offsets[i])
                f.write(t.view(torch.uint8).numpy().tobytes())
        except OSError as e:
            raise OutputWriteError(f"cannot write the activation cache '{self.path}': {e.strerror or e}") from None
        if self.in_ram:
            self.ram[i] = t

    def read(self, i: int) -> torch.Tensor:
        if self.in_ram and self.ram[i] is not None:
            return self.ram[i]
        n = self.offsets[i + 1] - self.offsets[i] if i + 1 < len(self.offsets) else self.nbytes - self.offsets[i]
        buf = bytearray(n)
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            got = f.readinto(buf)
        if got != n:
            raise PrunetuneError(f"the activation cache '{self.path}' is truncated (start again without --resume)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).view(self.shapes[i])

    def flush(self) -> None:
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())

    def release(self) -> None:
        self.ram = [None] * len(self.shapes)
        trim_heap()


class ActivationCache:
    """The two slots and the journal of one pruning run (see the module docstring)."""

    def __init__(self, directory: Path, shapes: list[tuple], dtype: torch.dtype, budget_mb: float):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        probe = Slot(self.dir / "hidden-a.bin", shapes, dtype, False)
        self.total_mb = probe.nbytes / 2**20
        largest = max(probe.offsets[i + 1] - probe.offsets[i] for i in range(len(shapes) - 1)) \
            if len(shapes) > 1 else probe.nbytes
        self.batch_mb = largest / 2**20
        self.budget_mb = budget_mb
        if budget_mb and budget_mb < self.batch_mb:
            raise PrunetuneError(f"--cache-budget {budget_mb:g} MB is below one calibration batch ({self.batch_mb:.1f} "
                                 f"MB): give at least {self.batch_mb:.1f}, or 0 to read every batch from disk")
        # two slots live at once (a layer's inputs and outputs)
        self.in_ram = 2 * self.total_mb <= budget_mb
        self.slots = {k: Slot(self.dir / f"hidden-{k}.bin", shapes, dtype, self.in_ram) for k in ("a", "b")}

    def check_disk(self) -> None:
        """Refuse, before the first layer, a disk without room for both slots."""
        import shutil

        free = shutil.disk_usage(self.dir).free / 2**20
        need = 2 * self.total_mb
        if free < need:
            raise PrunetuneError(f"not enough disk space for the activation cache in '{self.dir}': it needs "
                                 f"{need:.0f} MB, {free:.0f} MB are free")

    def describe(self) -> dict:
        return {"total_mb": round(self.total_mb, 1), "in_ram": self.in_ram, "budget_mb": round(self.budget_mb, 1),
                "batches": len(self.slots["a"])}

    def write_journal(self, state: dict) -> None:
        tmp = self.dir / (JOURNAL + ".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.dir / JOURNAL)
        except OSError as e:
            raise OutputWriteError(f"cannot write '{self.dir / JOURNAL}': {e.strerror or e}") from None


def read_journal(directory: Path) -> dict:
    f = Path(directory) / JOURNAL
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError):
        raise PrunetuneError(f"cannot resume: '{f}' is damaged (start again without --resume)") from None
    if not isinstance(state, dict) or "layer" not in state or "slot" not in state:
        raise PrunetuneError(f"cannot resume: '{f}' is not a prunetune resume journal")
    return state
