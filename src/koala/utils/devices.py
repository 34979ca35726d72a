"""Devices and dtypes: the names koala accepts for them, checked against this machine."""

from __future__ import annotations

import torch

from ..errors import KoalaError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # the short names: what the CLI offers and errors suggest


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise KoalaError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def parse_device(name: str | None, option: str = "device") -> torch.device:
    """A checked ``torch.device``: a known type that this machine has (cuda:N within the visible count)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise KoalaError(f"device {name!r}: unknown; use cpu, cuda, cuda:N or mps", option=option)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KoalaError(f"device {name}: no CUDA device is visible to PyTorch; use the cpu device", option=option)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KoalaError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) visible", option=option)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KoalaError(f"device {name}: MPS is not available on this machine; use the cpu device", option=option)
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise KoalaError(f"device {name}: no XPU device is visible to PyTorch; use the cpu device", option=option)
    return dev


def check_dtype_on_device(dtype: torch.dtype, device: torch.device | str, option: str = "dtype") -> None:
    """Refuse a dtype the device cannot compute in (bf16 on a CUDA GPU before Ampere)."""
    device = torch.device(device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KoalaError(
            f"dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16", option=option
        )


def tree_to(tree, device=None, dtype: torch.dtype | None = None):
    """``tree`` (a tensor or nested dict of tensors) moved to ``device``; floating tensors cast to ``dtype``."""
    if isinstance(tree, dict):
        return {k: tree_to(v, device, dtype) for k, v in tree.items()}
    return tree.to(device=device, dtype=dtype if dtype is not None and torch.is_floating_point(tree) else None)
