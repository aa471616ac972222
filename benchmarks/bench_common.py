"""What several benchmark scripts share: the C4 training documents recovery runs tune on."""

from __future__ import annotations

import json
from pathlib import Path


def c4_train_file(docs: str, work) -> Path:
    """C4 validation documents ``lo-hi`` (inclusive) of the local data folder as a ``{"text": ...}`` JSONL in
    ``work`` (written once, atomically)."""
    from prunetune.paths import data_dir

    lo, hi = (int(x) for x in docs.split("-"))
    out = Path(work) / f"c4_train_docs_{lo}-{hi}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = (data_dir() / "c4" / "c4_validation_2k.jsonl").read_text(encoding="utf-8").splitlines()[lo:hi + 1]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps({"text": json.loads(x)["text"]}) for x in lines) + "\n", encoding="utf-8")
        tmp.replace(out)
    return out
