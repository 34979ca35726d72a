"""The SDPA backend switch (``train.attention``): diffusers' attention calls ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import contextlib

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")  # auto: PyTorch picks per call


def attention_context(backend: str):
    """``train.attention``: a context forcing one SDPA backend (diffusers' attention calls
    ``F.scaled_dot_product_attention``), or nothing for ``auto``."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[backend]
    )
