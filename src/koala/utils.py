"""Small shared helpers: dtypes, JSON reading, atomic output directories, parameter counts."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import torch

from .errors import KoalaError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise KoalaError(f"unknown dtype {name!r}; choose one of fp32, fp16, bf16") from None


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise KoalaError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise KoalaError(f"{path}: not valid JSON ({err})") from err


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on error it is removed.

    Nothing half-written is ever left at ``out_dir``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise KoalaError(f"{out_dir} already exists; overwrite it or choose another output directory", option="overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
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


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file in the same folder: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tree_to(tree, device=None, dtype: torch.dtype | None = None):
    """``tree`` (a tensor or nested dict of tensors) moved to ``device``; floating tensors cast to ``dtype``."""
    if isinstance(tree, dict):
        return {k: tree_to(v, device, dtype) for k, v in tree.items()}
    return tree.to(device=device, dtype=dtype if dtype is not None and torch.is_floating_point(tree) else None)


def require(module: str, extra: str, what: str):
    """``import module``, or a KoalaError naming the optional extra that provides it (``koala-diffusion[extra]``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KoalaError(f"{what} needs the {module.split('.')[0]} package: pip install 'koala-diffusion[{extra}]'") \
            from None
