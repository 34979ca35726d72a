"""Small shared helpers: dtypes, atomic output directories, model-directory detection."""

from __future__ import annotations

import contextlib
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


def model_dir_kind(path: str) -> str:
    """'pipeline' (has model_index.json and unet/), 'unet' (a UNet2DConditionModel config.json), else error."""
    if not os.path.isdir(path):
        raise KoalaError(f"{path}: no such directory (give a U-Net directory or an SDXL pipeline directory)")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        if not os.path.isfile(os.path.join(path, "unet", "config.json")):
            raise KoalaError(f"{path}: pipeline directory has no unet/config.json")
        return "pipeline"
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        cls = read_json(cfg).get("_class_name")
        if cls != "UNet2DConditionModel":
            raise KoalaError(f"{cfg}: _class_name is {cls!r}, expected 'UNet2DConditionModel'")
        return "unet"
    raise KoalaError(f"{path}: neither a pipeline directory (model_index.json) nor a U-Net directory (config.json)")


def unet_dir(path: str) -> str:
    return os.path.join(path, "unet") if model_dir_kind(path) == "pipeline" else path


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on error it is removed.

    Nothing half-written is ever left at ``out_dir``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise KoalaError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out")
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


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
