"""Optional dependencies: import one, or say which ``koala-diffusion[extra]`` provides it."""

from __future__ import annotations

import importlib

from ..errors import KoalaError


def require(module: str, extra: str, what: str):
    """``import module``, or a KoalaError naming the optional extra that provides it (``koala-diffusion[extra]``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KoalaError(
            f"{what} needs the {module.split('.')[0]} package: pip install 'koala-diffusion[{extra}]'"
        ) from None
