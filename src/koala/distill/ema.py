"""The EMA weights swapped into a model for a while (saving them, rendering with them)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def ema_weights(ema, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block ``model``'s parameters hold the EMA weights of ``ema`` (a diffusers ``EMAModel``); after
    it, also on an error, their own again. With ``ema`` None the model is left as it is."""
    if ema is None:
        yield model
        return
    params = list(model.parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        yield model
    finally:
        ema.restore(params)
