"""Validation images: fixed prompts and seeds through the student (every N steps) and the teacher (once), both
sampled the way the paper samples (Euler; spacing by ``teacher.kind``, :mod:`koala.families.sampling`)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from ..families.sampling import SamplingDefaults, sampling_scheduler
from .ema import ema_weights


def _pipeline(denoiser, frozen, kind: str | None, sampling: dict | None = None):
    config = frozen.parts.scheduler.config
    if sampling:  # a few-step student's recorded scheduler (e.g. LCMScheduler), with its config overrides
        scheduler, _ = SamplingDefaults.from_meta(sampling).build_scheduler(config)
    else:
        scheduler = sampling_scheduler(config, kind)
    return frozen.family.make_pipeline(frozen.parts, denoiser, scheduler)


@torch.no_grad()
def render(
    denoiser, frozen, vcfg, resolution: int, device, kind: str | None = None, sampling: dict | None = None
) -> list:
    """PIL images for every (prompt, seed) pair of ``vcfg`` (a :class:`~koala.distill.config.ValidationConfig`), in
    order; Euler with ``kind``'s spacing, or the scheduler a few-step student records (``sampling``: its layer
    map's ``meta.sampling``)."""
    pipe = _pipeline(denoiser, frozen, kind, sampling)
    pipe.set_progress_bar_config(disable=True)
    was_training = denoiser.training
    denoiser.eval()
    dtype = frozen.weight_dtype
    # frozen parts are in the weight dtype, the student in fp32: autocast makes them meet
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    images = []
    # explicit timesteps a few-step student was trained on (DMD): they replace the step count
    timesteps = {"timesteps": list(sampling["timesteps"])} if sampling and sampling.get("timesteps") else {}
    try:
        for prompt in vcfg.prompts:
            for seed in vcfg.seeds:
                g = torch.Generator("cpu").manual_seed(int(seed))
                with autocast:
                    out = pipe(
                        prompt,
                        height=resolution,
                        width=resolution,
                        num_inference_steps=vcfg.steps,
                        guidance_scale=vcfg.guidance_scale,
                        generator=g,
                        **timesteps,
                        **frozen.family.pipeline_call_kwargs,
                    )
                images.append(out.images[0])
    finally:
        denoiser.train(was_training)
    return images


def save_images(images: list, folder: str, tag: str, step: int, accelerator=None) -> list[str]:
    """Write PNGs to ``folder`` and send the images to the accelerator's trackers (tensorboard, wandb)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = os.path.join(folder, f"{i:02d}.png")
        im.save(p)
        paths.append(p)
    for tracker in getattr(accelerator, "trackers", None) or []:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.stack([np.asarray(im) for im in images])}, step, dataformats="NHWC")
        else:
            tracker.log_images({tag: images}, step)
    return paths


def validate(
    student,
    teacher,
    frozen,
    cfg,
    step: int,
    device,
    output_dir: str,
    accelerator=None,
    ema=None,
    write: bool = True,
    sampling: dict | None = None,
) -> list[str]:
    """Render the teacher (once) and the student into ``output_dir/samples``; ``write=False`` renders without saving
    (the other processes of a sharded student, whose forward needs all of them). ``cfg``: the run's
    :class:`~koala.distill.config.DistillConfig`; ``sampling``: the student's recorded sampling (a few-step
    student), else it is sampled as the teacher is."""
    vcfg, kind = cfg.validation, cfg.teacher.kind
    res = vcfg.resolution or cfg.train.resolution
    out = os.path.join(output_dir, "samples")
    teacher_dir = os.path.join(out, "teacher")
    if write and not os.path.isdir(teacher_dir):
        save_images(render(teacher, frozen, vcfg, res, device, kind), teacher_dir, "teacher", step, accelerator)
    with ema_weights(ema if vcfg.use_ema else None, student):
        images = render(student, frozen, vcfg, res, device, kind, sampling)
    if not write:
        return []
    return save_images(images, os.path.join(out, f"step-{step:07d}"), "student", step, accelerator)
