"""Failed writes: what went wrong, read from the error itself, and the one message every writer gives.

A full disk does not reach koala as one exception type: Python's own writes raise ``OSError`` (``ENOSPC``, or
``EDQUOT`` over a quota), safetensors raises ``SafetensorError("Error while serializing: I/O error: No space left
on device (os error 28)")``, and ``torch.save`` raises ``RuntimeError("[enforce fail at inline_container.cc:...]
unexpected pos ...")`` (or ``PytorchStreamWriter failed writing file ...``) with the ``OSError`` as its context
when it wrote through a Python file object (:func:`koala.utils.weights.save_tensor_file` does). :func:`write_failure`
reads all three by errno; :func:`writing` turns them into one :class:`~koala.errors.KoalaError` (exit status 2)
that names the kind ("disk full", "quota exceeded"), the folder and what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Callable, Iterator

from ..errors import KoalaError

KINDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "quota exceeded"}
# an errno in a message: Rust's std::io::Error (safetensors) ends with "(os error N)"; shutil.Error (copytree)
# lists each file's OSError as "[Errno N] ..."
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
_TORCH_WRITER = ("PytorchStreamWriter failed writing", "unexpected pos")  # the reader's errors say neither


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _is_write_error(err: BaseException) -> bool:
    text = str(err)
    if type(err).__name__ == "SafetensorError":  # "Error while serializing: I/O error: ..." (reads: deserializing)
        return "I/O error" in text and "deserializ" not in text
    if isinstance(err, RuntimeError):
        return any(s in text for s in _TORCH_WRITER)
    return isinstance(err, OSError)


def write_failure(err: BaseException) -> tuple[str, str] | None:
    """``(kind, reason)`` when ``err`` is a failed write, else None (an error of another sort: let it through).

    ``kind`` is "disk full" (``ENOSPC``), "quota exceeded" (``EDQUOT``) or "write failed" (any other errno, or a
    torch writer error with no errno behind it); ``reason`` is the system's words for it. The errno comes from an
    ``OSError`` anywhere in the chain of causes, or from the message (safetensors' ``(os error N)``, the
    ``[Errno N]`` of each file in a ``shutil.Error``)."""
    if not _is_write_error(err):
        return None
    for e in _chain(err):
        code = e.errno if isinstance(e, OSError) else None
        if code is None:
            m = _ERRNO_IN_TEXT.search(str(e))
            code = int(m.group(1) or m.group(2)) if m else None
        if code is not None:
            return KINDS.get(code, "write failed"), os.strerror(code)
    return "write failed", " ".join(str(err).split())[:200]


class WriteFailed(KoalaError):
    """A write that failed for want of room (or another reason the system gave): ``kind`` ("disk full", "quota
    exceeded", "write failed") and ``reason`` (the system's words), so an outer :func:`writing` can say it again in
    its own terms (what was being written, what is kept)."""

    def __init__(self, message: str, kind: str, reason: str):
        super().__init__(message)
        self.kind, self.reason = kind, reason


def is_full_disk(err: BaseException) -> tuple[str, str] | None:
    """:func:`write_failure` when it is certain a write failed: the disk or quota is full, or the error is a
    safetensors / torch writer's own (an ``OSError`` of another kind may come from a read, and passes)."""
    failure = write_failure(err)
    if failure is None or (failure[0] == "write failed" and isinstance(err, OSError)):
        return None
    return failure


@contextlib.contextmanager
def writing(
    what: str,
    folder: str,
    kept: str | Callable[[], str] = "nothing half-written is left",
    again: str = "run the same command again",
    certain: bool = False,
) -> Iterator[None]:
    """Inside the block a failed write (:func:`write_failure`) becomes a :class:`WriteFailed`: "disk full: writing
    WHAT under FOLDER failed (No space left on device); KEPT. Free some space there (or write elsewhere) and
    AGAIN" (``kept`` may be a function, called only then). ``certain``: only what :func:`is_full_disk` is sure of
    (for a block that also reads). An inner WriteFailed is said again in these terms; other errors, KoalaErrors
    included, pass unchanged."""
    try:
        yield
    except WriteFailed as err:
        raise WriteFailed(
            write_failure_message((err.kind, err.reason), what, folder, kept, again), err.kind, err.reason
        ) from err
    except KoalaError:
        raise
    except Exception as err:
        failure = is_full_disk(err) if certain else write_failure(err)
        if failure is None:
            raise
        raise WriteFailed(write_failure_message(failure, what, folder, kept, again), *failure) from err


def write_failure_message(failure: tuple[str, str], what: str, folder: str, kept, again: str) -> str:
    kind, reason = failure
    kept = kept() if callable(kept) else kept
    fix = {
        "disk full": "free some space there (or write elsewhere)",
        "quota exceeded": "free some of your quota there (or write elsewhere)",
    }.get(kind, "fix the folder (or write elsewhere)")
    return f"{kind}: writing {what} under {folder} failed ({reason}); {kept}. {fix[0].upper()}{fix[1:]} and {again}"
