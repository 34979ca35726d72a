"""Load the frozen parts (text encoders, VAE, teacher), the trainable student and its layer map through the
teacher's family, and turn a data batch into denoiser inputs exactly as the family's pipeline conditions them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from ..arch.layer_map import LayerMap
from ..data.cache import encode_batch as encode_raw_batch
from ..errors import KoalaError
from ..families import Family, Parts, family_of, model_dir, model_dir_kind
from ..formats.single_file import load_denoiser
from ..utils.devices import parse_dtype
from .config import DistillConfig


@dataclass
class Frozen:
    """Everything that is not trained: the family, its parts (encoders, VAE, scheduler) and the noise schedule."""

    family: Family
    parts: Parts | None  # None: cached batches only (benchmarks with random real-size models)
    noise_scheduler: DDPMScheduler  # discrete DDPM schedule from the teacher pipeline's scheduler config
    weight_dtype: torch.dtype

    def to(self, device) -> "Frozen":
        if self.parts is not None:
            self.parts.to(device)
        return self


def teacher_pipeline(cfg: DistillConfig) -> str:
    """``teacher.pipeline``, checked to be a pipeline directory; a single-file checkpoint is converted once into
    ``OUTPUT_DIR/teacher`` (reused while the file is unchanged) and that directory returned."""
    pipe_dir = cfg.teacher.pipeline
    if not pipe_dir:
        raise KoalaError(
            "teacher.pipeline is required: a local pipeline directory (set it in the recipe or pass "
            "teacher.pipeline=/path/to/pipeline; for a tiny test pipeline run `koala lab make-tiny DIR` first)",
            option="teacher.pipeline",
        )
    if os.path.isfile(pipe_dir):
        from ..formats.single_file import ensure_diffusers

        out = os.path.join(os.path.abspath(cfg.train.output_dir), "teacher")
        return ensure_diffusers(pipe_dir, out, cfg.teacher.config)
    if not os.path.isdir(pipe_dir):
        raise KoalaError(
            f"teacher.pipeline {pipe_dir}: no such directory; point it at a local pipeline directory "
            f"(for a smoke run, make a random tiny one first: koala lab make-tiny {pipe_dir})",
            option="teacher.pipeline",
        )
    if model_dir_kind(pipe_dir) != "pipeline":
        raise KoalaError(
            f"teacher.pipeline {pipe_dir}: expected a pipeline directory (with model_index.json)",
            option="teacher.pipeline",
        )
    return pipe_dir


def init_selection(cfg: DistillConfig) -> str:
    """Which teacher layers initialise an in-memory student: ``kd.layer_selection`` when set (the student is then
    initialised from the very layers it is matched with, as Table 10c's SA-bottom / -interleave / -up), else
    ``student.layer_selection``. A conflicting pair is refused."""
    kd_sel, s_sel = cfg.kd.layer_selection, cfg.student.layer_selection
    if kd_sel and s_sel not in ("bottom", kd_sel):  # bottom is student.layer_selection's default
        raise KoalaError(
            f"kd.layer_selection={kd_sel} and student.layer_selection={s_sel} disagree; set one of them "
            "(kd.layer_selection initialises and matches alike)",
            option="kd.layer_selection",
        )
    return kd_sel or s_sel


def load_student(cfg: DistillConfig, teacher, fam: Family):
    """``(student, layer_map)``: the compressed student at ``student.path`` (checked against the teacher's family
    and ``kd.layer_selection``), or the teacher compressed in memory per ``student.preset``."""
    s, kd_sel = cfg.student, cfg.kd.layer_selection
    if not s.path:
        return fam.compress(teacher, s.preset, init_selection(cfg), torch.float32)
    path = model_dir(s.path)
    lmap = LayerMap.load(path)
    if lmap.family != fam.name:
        raise KoalaError(
            f"student.path {s.path} was compressed from a {lmap.family} teacher but teacher.pipeline is {fam.name}",
            option="student.path",
        )
    if kd_sel and kd_sel != lmap.layer_selection:  # Table 10c: initialisation and matching go together
        raise KoalaError(
            f"kd.layer_selection is {kd_sel} but student.path {s.path} was initialised from the "
            f"{lmap.layer_selection} teacher layers; compress it again with --layer-selection {kd_sel} "
            "(or set kd.layer_selection=null to match the layers the map names)",
            option="kd.layer_selection",
        )
    return fam.load_model(path, torch.float32), lmap


def load_models(cfg: DistillConfig):
    """Return ``(teacher, student, layer_map, frozen)``; all on CPU, teacher frozen in ``teacher.dtype``."""
    pipe_dir = teacher_pipeline(cfg)
    fam = family_of(pipe_dir, cfg.teacher.family)
    weight_dtype = parse_dtype(cfg.teacher.dtype)
    teacher, fam = load_denoiser(cfg.teacher.unet_path or pipe_dir, torch.float32, config_from=pipe_dir, family=fam)
    student, lmap = load_student(cfg, teacher, fam)
    lmap.validate(teacher, student)  # refuse a map that does not fit before any training
    lmap.meta["teacher_kind"] = cfg.teacher.kind  # saved with every checkpoint: koala generate samples by it
    if not cfg.student.path:  # compressed here: record what koala compress records (the model card reads it)
        lmap.meta.setdefault("teacher_path", os.path.abspath(cfg.teacher.unet_path or pipe_dir))
        lmap.meta.setdefault("preset", cfg.student.preset if isinstance(cfg.student.preset, str) else None)
    if teacher.dtype != weight_dtype:  # (diffusers warns on every dtype cast of some models: only cast when needed)
        teacher = teacher.to(weight_dtype)
    teacher = teacher.requires_grad_(False).eval()
    parts = fam.load_parts(pipe_dir, weight_dtype, cfg.teacher.vae_dtype)
    frozen = Frozen(fam, parts, DDPMScheduler.from_config(parts.scheduler.config), weight_dtype)
    return teacher, student.float().train(), lmap, frozen


@torch.no_grad()
def encode_batch(
    batch: dict,
    frozen: Frozen,
    device,
    generators: list[torch.Generator],
    caption_dropout: float = 0.0,
    uncond: dict | None = None,
) -> tuple[torch.Tensor, dict]:
    """``(latents, cond)`` in fp32 on ``device`` from a raw or a cached batch; ``cond`` holds the family's
    conditioning tensors (``frozen.family.cond_keys``).

    A raw batch is encoded by :func:`koala.data.cache.encode_batch` (the function that builds the cache, so the
    two cannot drift apart) with ``latent_dist.sample(generator)``; ``generator`` should be a CPU generator:
    diffusers then draws the VAE noise on the CPU and moves it, so a run is the same on any device. A cached
    batch (``latents`` present; stored fp16 or fp32) is only cast to fp32.
    Dropped captions get the family's unconditional text conditioning ``uncond`` (SDXL: zeros, as
    ``force_zeros_for_empty_prompt``; SD-1.x: the empty prompt's embedding).
    """
    if "latents" not in batch:
        batch = encode_raw_batch(batch, frozen.parts, latent="sample", generator=generators)
    latents = batch["latents"].to(device, torch.float32)
    cond = {k: batch[k].to(device, torch.float32) for k in frozen.family.cond_keys}
    if caption_dropout > 0:
        drop = (torch.stack([torch.rand((), generator=g) for g in generators]) < caption_dropout).to(device)
        cond = frozen.family.drop_captions(
            cond, drop, frozen.family.uncond(frozen.parts) if uncond is None else uncond
        )
    return latents, cond
