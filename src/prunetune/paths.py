"""Where prunetune finds its bundled assets and the local data folder.

The package ships stories260K and a TinyStories excerpt (so it works offline on a fresh machine).
Larger corpora (WikiText-2, C4 validation, zero-shot task files) are read from a local data folder:
``$PRUNETUNE_DATA`` if set, else ``./shared/data`` or ``../shared/data`` relative to the working
directory, else the ``shared/data`` folder next to a source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "stories260K"
TINYSTORIES = ASSETS / "tinystories_valid_30k.txt"


def data_dir() -> Path | None:
    """The local data folder, or None when there is none."""
    candidates = []
    env = os.environ.get("PRUNETUNE_DATA")
    if env:
        candidates.append(Path(env))
    cwd = Path.cwd()
    candidates += [cwd / "shared" / "data", cwd.parent / "shared" / "data"]
    src_root = Path(__file__).resolve().parents[2]  # <checkout>/src/prunetune -> <checkout>
    candidates += [src_root / "shared" / "data", src_root.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None
