"""Named corpora and local files, resolved to one text with a documented joining rule.

Named sources: ``wikitext2`` (raw test split: its non-empty lines concatenated, each ending in a newline —
the local file as is, or the same built from the HF dataset's lines when online), ``c4`` (validation
documents joined with "\\n\\n"), ``tinystories`` (bundled excerpt). Anything else is a path: ``.txt`` (as is), ``.jsonl`` (the ``text`` field of each line,
joined with "\\n\\n") or ``.parquet`` (its ``text`` column, same joining).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PrunetuneError
from ..manifest import sha256_bytes
from ..paths import TINYSTORIES, data_dir

NAMED = ("wikitext2", "c4", "tinystories")
#: one name, one text: the local raw test file and the Hub's test split both give the split's non-empty lines,
#: each with its newline, concatenated (the local copy has no empty lines); the recorded sha256 tells them apart
WIKITEXT_JOINING = "the test split's non-empty lines concatenated, each ending in a newline (the raw file as is)"
DOC_SEP = "\n\n"


@dataclass
class TextSource:
    name: str
    text: str
    origin: str  # file path or "hf:<dataset>"
    split: str
    joining: str

    def describe(self) -> dict:
        return {"name": self.name, "origin": self.origin, "split": self.split, "joining": self.joining,
                "chars": len(self.text), "sha256": sha256_bytes(self.text.encode("utf-8"))}


def read_jsonl(path: Path, required: tuple[str, ...] = (), limit: int | None = None) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped, at most ``limit``), each checked to be an object
    with a string in every ``required`` field; one clear line naming the file and line otherwise."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise PrunetuneError(f"'{path}' line {lineno} is not valid JSON (not UTF-8 text)") from None
            except json.JSONDecodeError as e:
                raise PrunetuneError(f"'{path}' line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise PrunetuneError(f"'{path}' line {lineno} is not a JSON object")
            for key in required:
                if not isinstance(rec.get(key), str):
                    raise PrunetuneError(f"'{path}' line {lineno} has no string field '{key}'")
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    return records


def _read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    return [r[field] for r in read_jsonl(path, (field,))]


def _read_file(path: Path) -> tuple[str, str]:
    if not path.exists():
        raise PrunetuneError(f"text file '{path}' does not exist")
    if not path.is_file():
        raise PrunetuneError(f"'{path}' is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return DOC_SEP.join(_read_jsonl_texts(path)), "jsonl 'text' fields joined with \\n\\n"
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path, columns=["text"])
            except (KeyError, ValueError):
                raise PrunetuneError(f"'{path}' has no 'text' column") from None
            return DOC_SEP.join(str(t) for t in table.column("text").to_pylist()), "parquet 'text' column joined with \\n\\n"
        data = path.read_bytes()
    except PermissionError:
        raise PrunetuneError(f"cannot read '{path}' (permission denied)") from None
    except OSError as e:
        raise PrunetuneError(f"cannot read '{path}': {e.strerror or e}") from None
    if b"\x00" in data[:65536]:
        raise PrunetuneError(f"'{path}' looks like a binary file, not text")
    try:
        return data.decode("utf-8"), "file as is"
    except UnicodeDecodeError:
        raise PrunetuneError(f"'{path}' is not UTF-8 text") from None


def wikitext_from_lines(lines) -> str:
    """The text ``wikitext2`` names, from the dataset's lines (each ends in a newline; blank ones separate
    paragraphs): the non-empty lines concatenated — the local raw file exactly."""
    return "".join(t for t in lines if t.strip())


def _from_hf(name: str) -> tuple[str, str, str]:
    """Fetch a named corpus from the Hugging Face Hub (only when no local copy exists)."""
    try:
        import datasets

        if name == "wikitext2":  # the same text as the local raw file: its non-empty lines, as they are
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return wikitext_from_lines(ds["text"]), "hf:wikitext/wikitext-2-raw-v1", WIKITEXT_JOINING
        if name == "c4":
            ds = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       split="validation")
            return DOC_SEP.join(ds["text"][:2000]), "hf:allenai/c4 en validation shard 0, first 2000 docs", "documents joined with \\n\\n"
    except Exception as e:  # network, missing dataset: one clear line
        raise PrunetuneError(f"no local copy of '{name}' (set PRUNETUNE_DATA to a data folder) and the Hub is not reachable: {type(e).__name__}") from None
    raise PrunetuneError(f"unknown dataset '{name}'")


def load_text(source: str | Path) -> TextSource:
    """Resolve a named corpus or a local file to text; empty corpora are an error."""
    source = str(source)
    key = source.lower().replace("-", "").replace("_", "")
    if key in ("wikitext2", "wikitext"):
        local = data_dir() / "wikitext-2" / "wiki.test.raw" if data_dir() else None
        if local and local.is_file():
            text, _ = _read_file(local)
            ts = TextSource("wikitext2", text, str(local), "test", WIKITEXT_JOINING)
        else:
            text, origin, joining = _from_hf("wikitext2")
            ts = TextSource("wikitext2", text, origin, "test", joining)
    elif key == "c4":
        local = data_dir() / "c4" / "c4_validation_2k.jsonl" if data_dir() else None
        if local and local.is_file():
            ts = TextSource("c4", DOC_SEP.join(_read_jsonl_texts(local)), str(local), "validation", "documents joined with \\n\\n")
        else:
            text, origin, joining = _from_hf("c4")
            ts = TextSource("c4", text, origin, "validation", joining)
    elif key == "tinystories":
        text, joining = _read_file(TINYSTORIES)
        ts = TextSource("tinystories", text, str(TINYSTORIES), "validation (excerpt)", joining)
    else:
        p = Path(source).expanduser()
        if not p.exists() and not any(c in source for c in "/\\.") :
            raise PrunetuneError(f"unknown dataset '{source}' (choose from: {', '.join(NAMED)}, or give a .txt/.jsonl/.parquet file)")
        text, joining = _read_file(p)
        ts = TextSource(p.name, text, str(p), "file", joining)
    if not ts.text.strip():
        raise PrunetuneError(f"corpus '{source}' is empty")
    return ts


def token_stream(tokenizer, source: TextSource) -> torch.Tensor:
    """Tokenise the whole text once (the tokenizer's own BOS handling: at most one BOS at the start)."""
    ids = tokenizer(source.text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids[0]
    if ids.numel() == 0:
        raise PrunetuneError(f"corpus '{source.name}' has no tokens")
    return ids
