"""Protocol manifests: every number prunetune writes carries how it was made."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import writing


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict:
    import transformers

    from ._version import __version__

    out = {
        "prunetune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("peft", "accelerate", "lm_eval", "datasets"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            out[name] = mod.__version__
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count (Linux VmHWM) so a job reports its own peak, not an earlier one's of the
    same process (a benchmark loop, a notebook). False where the kernel does not allow it.

    The count restarts from the current RSS, so garbage is collected and freed heap handed back to the
    system first; otherwise memory that glibc keeps from an earlier job counts towards this one's peak."""
    import gc

    gc.collect()
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last `reset_peak_rss` (Linux VmHWM), else of the whole process."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux ru_maxrss is in KiB


class Measure:
    """Wall time and peak memory (CPU RSS; CUDA allocator peak when a GPU is used) of a block."""

    def __init__(self):
        self.wall_s = 0.0
        self.peak_rss_mb = 0.0
        self.peak_cuda_mb = None

    def as_dict(self) -> dict:
        d = {"wall_time_s": round(self.wall_s, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.peak_cuda_mb is not None:
            d["peak_cuda_mb"] = round(self.peak_cuda_mb, 1)
        return d


@contextmanager
def measure():
    m = Measure()
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_s = time.perf_counter() - t0
        m.peak_rss_mb = peak_rss_mb()
        if torch.cuda.is_available():
            m.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``path`` in one rename; a refused write leaves no temp file and is one `OutputWriteError` line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=False, default=str)
                f.write("\n")
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_LIBC = None


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Freed blocks below glibc's mmap threshold (which rises to 32 MB as large blocks are freed) stay in the
    heap and keep counting as resident memory; between the layers of a streamed prune they are only waste."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (raises AttributeError where it does not exist)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
