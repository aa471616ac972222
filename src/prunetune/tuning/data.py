"""Tuning data: instruction records in the Alpaca template, or plain text packed into windows.

Instruction mode (jsonl with ``instruction``, optional ``input``, ``output``): the prompt is the Alpaca
template (with or without the input block), the target is ``output`` followed by EOS. Prompt and response
are tokenised separately and concatenated (prompt with the tokenizer's special tokens, e.g. BOS; response
without), so the label mask is exact by construction: ``labels = -100`` on every prompt token, the token
ids on the response and EOS. The sequence is cut to ``cutoff_len`` tokens; a record whose prompt alone
fills the cut-off has no response token left and is dropped (counted in ``dropped``).

Text mode (jsonl with ``text``, or a ``.txt`` file read as one document): every document is tokenised
without special tokens and followed by EOS, all are concatenated, and the stream is cut into
non-overlapping windows of ``seq_len`` tokens (the remainder is dropped); every token is a label.

The held-out split is deterministic: examples are permuted with ``random.Random(seed)`` and the first
``eval_size`` (an int, or a fraction of the examples when < 1) go to the held-out set.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.bos import check_bos
from ..data.sources import read_jsonl
from ..errors import PrunetuneError
from ..paths import TINYSTORIES, data_dir

IGNORE_INDEX = -100

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


NAMED_DATA = ("alpaca", "tinystories")


def resolve_data(data) -> Path:
    """A data file, or ``alpaca`` (the local data folder's instruct/alpaca_14k.jsonl) or ``tinystories``
    (the bundled TinyStories excerpt, plain text)."""
    if data is None or str(data) == "":
        raise PrunetuneError("no tuning data given (a .jsonl/.txt file, 'alpaca' or 'tinystories')")
    s = str(data)
    if s == "tinystories" and not Path(s).exists():
        return TINYSTORIES
    if s == "alpaca" and not Path(s).exists():
        d = data_dir()
        f = d / "instruct" / "alpaca_14k.jsonl" if d is not None else None
        if f is None or not f.is_file():
            raise PrunetuneError("'alpaca' needs the local data folder with instruct/alpaca_14k.jsonl "
                                 "(set PRUNETUNE_DATA) or give the path of a .jsonl file")
        return f
    p = Path(s).expanduser()
    if not p.is_file():
        raise PrunetuneError(f"data file not found: {p}")
    return p


def _check_text(path: Path) -> None:
    """Refuse a binary or non-UTF-8 data file in one line (its first 64 KiB tell)."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise PrunetuneError(f"{path}: looks like a binary file, not text")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as e:
        raise PrunetuneError(f"{path}: is not UTF-8 text (byte {e.start})") from None


def check_data_file(path: Path, mode: str) -> None:
    """Refuse a jsonl whose first record is neither Alpaca (instruction/output) nor text, in one line."""
    _check_text(path)
    if mode != "auto" or path.suffix == ".txt":
        return
    with path.open(encoding="utf-8", errors="replace") as f:  # _check_text has refused non-UTF-8 starts
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise PrunetuneError(f"{path}: the data file is empty")
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        raise PrunetuneError(f"{path}: line 1 is not valid JSON") from None
    if not isinstance(rec, dict):
        raise PrunetuneError(f"{path}: line 1 is not a JSON object")
    if "instruction" not in rec and "text" not in rec:
        found = ", ".join(sorted(map(str, rec))[:6]) or "none"
        raise PrunetuneError(f"{path}: records need Alpaca fields (instruction, input, output) or a 'text' field "
                             f"(line 1 has: {found})")


@dataclass
class TuneData:
    """Tokenised examples (``{"input_ids": [...], "labels": [...]}``) split into train and held-out sets."""

    train: list[dict]
    eval: list[dict]
    kind: str
    source: str
    dropped: int = 0
    info: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.eval):
            h.update(str(len(split)).encode())
            for ex in split:
                h.update(torch.tensor(ex["input_ids"], dtype=torch.int64).numpy().tobytes())
                h.update(torch.tensor(ex["labels"], dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]


def _check_len(name: str, n: int) -> None:
    if n is None or int(n) <= 0:
        raise PrunetuneError(f"{name} must be a positive number of tokens (got {n})")


def _existing(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise PrunetuneError(f"data file not found: {p}")
    return p


def _split(examples: list[dict], eval_size: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    n = len(examples)
    n_eval = int(round(eval_size * n)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if n_eval < 0:
        raise PrunetuneError(f"eval size must not be negative (got {eval_size})")
    n_eval = min(n_eval, n - 1)  # always keep at least one training example
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [examples[i] for i in train], [examples[i] for i in held]


def tokenize_instruction(tokenizer, rec: dict, cutoff_len: int) -> dict | None:
    """One Alpaca record -> ``{"input_ids", "labels"}`` (None when no response token survives the cut)."""
    prompt = alpaca_prompt(rec["instruction"], rec.get("input") or "")
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(rec["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:cutoff_len]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:cutoff_len]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    return {"input_ids": ids, "labels": labels, "prompt_len": min(len(p_ids), cutoff_len)}


def load_instruction_data(path, tokenizer, cutoff_len: int = 512, eval_size: float | int = 0.05,
                          seed: int = 0, limit: int | None = None) -> TuneData:
    _check_len("cutoff_len", cutoff_len)
    p = _existing(path)
    records = read_jsonl(p, ("instruction", "output"), limit)
    examples, dropped = [], 0
    for rec in records:
        if rec.get("input") is not None and not isinstance(rec["input"], str):
            raise PrunetuneError(f"{p}: a record has a non-text 'input' field")
        ex = tokenize_instruction(tokenizer, rec, cutoff_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise PrunetuneError(
            f"{p}: no usable example ({len(records)} records read, {dropped} dropped: prompt longer than cutoff_len={cutoff_len})"
        )
    train, held = _split(examples, eval_size, seed)
    return TuneData(train, held, "instruction", str(p), dropped,
                    {"records": len(records), "cutoff_len": cutoff_len, "seed": seed})


def load_text_data(path, tokenizer, seq_len: int = 256, eval_size: float | int = 0.05, seed: int = 0,
                   limit: int | None = None, bos: str = "stream") -> TuneData:
    """Documents packed into windows of ``seq_len``; ``bos="window"`` (a family trained that way, `data.bos`)
    opens every window with BOS and ``seq_len − 1`` tokens of the packed stream."""
    _check_len("seq_len", seq_len)
    check_bos(bos, getattr(tokenizer, "bos_token_id", None))
    p = _existing(path)
    if p.suffix == ".txt":
        try:
            docs = [p.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise PrunetuneError(f"{p}: is not UTF-8 text") from None
    else:
        docs = [r["text"] for r in read_jsonl(p, ("text",), limit)]
    docs = [d for d in docs if d.strip()]
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
    body = seq_len - 1 if bos == "window" else seq_len
    head = [tokenizer.bos_token_id] if bos == "window" else []
    n_win = len(stream) // body if body > 0 else 0
    if n_win == 0:
        raise PrunetuneError(f"{p}: {len(stream)} tokens, not enough for one window of seq_len={seq_len}")
    examples = []
    for i in range(n_win):
        ids = head + stream[i * body:(i + 1) * body]
        examples.append({"input_ids": ids, "labels": list(ids)})
    train, held = _split(examples, eval_size, seed)
    return TuneData(train, held, "text", str(p), 0, {"documents": len(docs), "seq_len": seq_len, "seed": seed,
                                                     "bos": bos})


def load_tuning_data(path, tokenizer, mode: str = "auto", seq_len: int = 512, bos: str = "stream",
                     **kw) -> TuneData:
    """``mode``: "instruction", "text" or "auto" (.txt or jsonl whose first record has ``text`` -> text)."""
    p = _existing(path)
    if mode == "auto":
        mode = "text"
        if p.suffix != ".txt":
            with p.open(encoding="utf-8", errors="replace") as f:  # decoding errors are reported by the reader
                first = next((line for line in f if line.strip()), "")
            try:
                rec = json.loads(first) if first else {}
            except json.JSONDecodeError:
                raise PrunetuneError(f"{p}: line 1 is not valid JSON") from None
            if isinstance(rec, dict) and "instruction" in rec:
                mode = "instruction"
    if mode == "instruction":
        return load_instruction_data(p, tokenizer, cutoff_len=seq_len, **kw)
    if mode == "text":
        return load_text_data(p, tokenizer, seq_len=seq_len, bos=bos, **kw)
    raise PrunetuneError(f"unknown data mode '{mode}' (use auto, instruction or text)")


def collate(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions get attention 0 and label -100."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
