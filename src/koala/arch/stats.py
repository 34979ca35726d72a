"""FLOP counts of real-size architectures, computed on the ``meta`` device (no memory, seconds)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of ``model(**inputs)``; with a meta model and meta inputs this allocates nothing."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return int(counter.get_total_flops())
