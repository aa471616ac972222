"""Which device a command runs on: below every command module, so none of them imports the top-level API."""

from __future__ import annotations

import torch

from .errors import PrunetuneError


def resolve_device(device: str | None) -> str:
    """The device a command runs on (``auto``: a CUDA GPU when there is one); one clear line for an unusable
    one. ``cuda:N`` also becomes the current CUDA device, so libraries that use ``cuda`` land there too."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrunetuneError(f"device '{device}' is not available on this machine (no CUDA GPU)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise PrunetuneError(f"unknown device '{device}' (use cpu, cuda or cuda:N)")
    if device.startswith("cuda:"):
        try:
            index = int(device.split(":", 1)[1])
        except ValueError:
            raise PrunetuneError(f"unknown device '{device}' (use cpu, cuda or cuda:N)") from None
        if not 0 <= index < torch.cuda.device_count():
            raise PrunetuneError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA GPU(s))")
        torch.cuda.set_device(index)
    return device
