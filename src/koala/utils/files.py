"""Files: JSON and JSON-lines reading, output-folder checks, and atomic writes (a temporary name beside the target,
renamed on success, removed on failure: nothing half-written is ever left at the target)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Iterator

from ..errors import KoalaError
from .writes import writing


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise KoalaError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise KoalaError(f"{path}: not valid JSON ({err})") from err


def read_jsonl(path: str) -> list[dict]:
    """The JSON-object lines of ``path`` ([] when it does not exist); a line cut by a kill is skipped."""
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def existing_parent(path: str) -> str:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_folder(out: str, what: str = "the output", option: str | None = "out") -> None:
    """Before any work: ``out`` is a folder or can be created as one, in a writable place."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise KoalaError(f"{out} exists and is a file; {what} needs a folder", option=option)
    parent = existing_parent(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise KoalaError(f"{out}: cannot write there ({parent} is not a writable folder)", option=option)


def refuse_existing(path: str, overwrite: bool = False, what: str = "directory") -> None:
    """The one "already exists" refusal: a KoalaError (option ``overwrite``) when ``path`` exists and ``overwrite`` is
    off. ``what``: "directory" or "file", as the message names the output."""
    if os.path.exists(path) and not overwrite:
        raise KoalaError(f"{path} already exists; overwrite it or choose another output {what}", option="overwrite")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on error it is removed.

    Nothing half-written is ever left at ``out_dir``.
    """
    out_dir = os.path.abspath(out_dir)
    refuse_existing(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        with writing(out_dir, parent, f"nothing half-written is left at {out_dir}", certain=True):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a fresh temporary file name beside ``path`` (nothing is created there: the caller writes the file, so
    it gets a plain file's permissions); on success it replaces ``path``, on error it is removed. Nothing
    half-written is ever left at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}{suffix}")
    try:
        with writing(path, folder, f"nothing half-written is left at {path}", certain=True):
            yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file in the same folder: never a half-written file."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def atomic_write_json(path: str, data, indent: int | None = 1) -> str:
    """``data`` as JSON at ``path``, written through a temporary file in the same folder."""
    return atomic_write_text(path, json.dumps(data, indent=indent))


def append_lines(path: str, lines: list[str]) -> None:
    """Append whole ``lines`` (each without its newline) to ``path``, synced; a failed write (a full disk) is cut
    back off, so the file never ends in half a line that the next append would run into."""
    data = memoryview("".join(line + "\n" for line in lines).encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
