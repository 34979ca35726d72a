"""What a micro-step trains on: a prepared micro-batch (:class:`Prepared`) and its teacher targets
(:class:`KDItem`). Kept apart from :mod:`koala.distill.step`, so step objectives (:mod:`koala.distill.fewstep`),
which the Distiller builds, can name them without importing it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prepared:
    """One micro-batch ready for the denoisers: noisy latents, timesteps, conditioning and the task target."""

    noisy: torch.Tensor
    t: torch.Tensor
    cond: dict
    target: torch.Tensor
    latents: torch.Tensor | None = None  # the clean latents (step objectives noise them their own way)
    gens: list | None = None  # the samples' generators, drawn on by step objectives after the noise and timestep
    control: torch.Tensor | None = None  # the control images [B, 3, H, W] in [0, 1] (ControlNet KD)


@dataclass
class KDItem:
    """A prepared micro-batch with its teacher targets (output, features): what a micro-step trains on."""

    prepared: Prepared
    teacher_out: torch.Tensor | None
    teacher_feats: dict
