"""User-facing errors.

Anything a user can cause (bad path, malformed spec, NaN weights...) raises `PrunetuneError`, and so does
a write the system refuses (disk full, quota, read-only, no permission: `OutputWriteError`). The CLI prints
the message as one line and exits non-zero; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager


class PrunetuneError(Exception):
    """An error caused by the user's input, reported as one clear line."""

    exit_code = 2


class OutputWriteError(PrunetuneError):
    """The system refused a write (disk full, quota, read-only, no permission).

    Not a fault of the input, so commands that can resume keep their finished work (``.<out>.partial``)
    for ``--resume`` once the cause is fixed."""


#: errno values of a write the system refused (anything else keeps its traceback: it may be a bug)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
_SAFETENSORS_IO = re.compile(r"I/O error: (.+?)(?: \(os error \d+\))?$")


def write_failure(e: BaseException, where) -> OutputWriteError | None:
    """The one-line error for a failed write, or None when ``e`` is something else (a bug keeps its traceback).

    safetensors reports the OS error inside its own exception type, so it is recognised by its message."""
    if isinstance(e, OSError):
        if e.errno not in WRITE_ERRNOS:
            return None
        return OutputWriteError(f"cannot write '{e.filename or where}': {e.strerror or e}")
    if type(e).__name__ == "SafetensorError":
        m = _SAFETENSORS_IO.search(str(e).strip())
        code = re.search(r"\(os error (\d+)\)", str(e))
        if m and (code is None or int(code.group(1)) in WRITE_ERRNOS):
            return OutputWriteError(f"cannot write '{where}': {m.group(1)}")
    return None


@contextmanager
def writing(where):
    """Turn a failed write inside the block into one `OutputWriteError` line naming ``where`` (or the file)."""
    try:
        yield
    except PrunetuneError:
        raise
    except Exception as e:
        err = write_failure(e, where)
        if err is None:
            raise
        raise err from None
