"""The teacher of a distilled recovery: which model it is, and whether it can teach this student.

``--teacher auto`` is the model the input was pruned or shrunk from: every prunetune output records the
absolute path of its input as ``source_model`` in ``prunetune_manifest.json``, and ``auto`` follows those
records back to the first model that has none (a pruned-then-tuned checkpoint leads to the dense original).
For a method that shrinks the model itself (PAT) the teacher is the input. A teacher must share the
student's vocabulary (the same token ids mean the same strings, the same number of logits); anything else
is refused in one line before training starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PrunetuneError
from ..io import MANIFEST, load_model, resolve_model

#: records followed at most (a loop of records is refused, not followed forever)
MAX_HOPS = 16


#: reports whose ``manifest.model.path`` (or ``model.path``) names the input, for outputs written before
#: ``source_model`` was recorded
_REPORTS = ("prune_report.json", "shrink_report.json", "tune_report.json", "merge_report.json")


def _read(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (ValueError, OSError):
        return {}
    return d if isinstance(d, dict) else {}


def recorded_source(directory) -> str | None:
    """The model a prunetune output folder was made from (an absolute path or Hub id), or None."""
    d = Path(directory)
    src = _read(d / MANIFEST).get("source_model") if (d / MANIFEST).is_file() else None
    if isinstance(src, str) and src:
        return src
    for name in _REPORTS:
        if (d / name).is_file():
            rep = _read(d / name)
            model = (rep.get("manifest") or {}).get("model") or rep.get("model") or {}
            path = model.get("path") if isinstance(model, dict) else None
            if isinstance(path, str) and Path(path).is_absolute():
                return path
    return None


def resolve_teacher(spec: str | None, input_spec: str, input_path: str | None, teacher_is_input: bool) -> str | None:
    """The teacher's model reference for ``--teacher spec`` (None: no distillation)."""
    if spec is None or str(spec) == "":
        return None
    if str(spec) != "auto":
        return str(spec)
    if teacher_is_input:
        return input_spec
    src = recorded_source(input_path) if input_path else None
    if src is None:
        raise PrunetuneError(f"--teacher auto: '{input_spec}' records no model it was pruned or shrunk from "
                             "(it is not a prunetune output); give the teacher with --teacher MODEL")
    seen = {str(Path(input_path).resolve())}
    for _ in range(MAX_HOPS):
        if src in seen:
            raise PrunetuneError(f"--teacher auto: the source records of '{input_spec}' form a loop at '{src}'")
        seen.add(src)
        if not Path(src).exists():
            raise PrunetuneError(f"--teacher auto: '{input_spec}' was made from '{src}', which no longer exists; "
                                 "give the teacher with --teacher MODEL")
        nxt = recorded_source(src) if Path(src).is_dir() else None
        if nxt is None:
            return src
        src = nxt
    raise PrunetuneError(f"--teacher auto: more than {MAX_HOPS} source records behind '{input_spec}'")


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def load_teacher(spec: str, student, student_tok, *, dtype: str = "float32"):
    """``(teacher model on CPU, info)``; one clear line if it cannot be loaded or cannot teach ``student``."""
    try:
        resolve_model(spec)
        teacher, t_tok, info = load_model(spec, dtype=dtype, device="cpu")
    except PrunetuneError as e:
        raise PrunetuneError(f"cannot load the teacher: {e}") from None
    ns, nt = _vocab_size(student), _vocab_size(teacher)
    if ns != nt:
        raise PrunetuneError(f"teacher '{spec}' predicts {nt} tokens, the student {ns}: distillation needs the "
                             "same vocabulary")
    if t_tok is not None and student_tok is not None and t_tok.get_vocab() != student_tok.get_vocab():
        raise PrunetuneError(f"teacher '{spec}' has another tokenizer than the student (the same ids map to other "
                             "strings): distillation needs the same vocabulary")
    return teacher, info
