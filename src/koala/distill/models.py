"""Load the frozen parts (text encoders, VAE, teacher U-Net), the trainable student and its layer map,
and turn a data batch into U-Net inputs exactly as SDXL inference conditions them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from ..arch.compress import compress_unet, load_teacher_unet
from ..arch.layer_map import LayerMap
from ..data.cache import Encoders
from ..data.cache import encode_batch as encode_raw_batch
from ..errors import KoalaError
from ..utils import model_dir_kind, parse_dtype, unet_dir


@dataclass
class Frozen:
    """Everything that is not trained: conditioning encoders, VAE, noise schedule (and the pipeline's scheduler)."""
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module
    noise_scheduler: DDPMScheduler  # discrete DDPM schedule from the teacher pipeline's scheduler config
    scheduler: object               # the pipeline's own (inference) scheduler, for validation images
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype

    def to(self, device):
        for m in (*self.text_encoders, self.vae):
            m.to(device)
        return self

    @property
    def encoders(self) -> Encoders:
        """The conditioning parts as ``koala.data``'s :class:`Encoders` (same modules, no copy)."""
        return Encoders(vae=self.vae, tokenizers=self.tokenizers, text_encoders=self.text_encoders)


def _freeze(m: torch.nn.Module) -> torch.nn.Module:
    m.requires_grad_(False)
    return m.eval()


def load_teacher(cfg: dict, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The pipeline's U-Net, or ``teacher.unet_path`` (a U-Net dir or a single .safetensors, e.g. SDXL-Lightning)."""
    pipe_dir, path = cfg["teacher"]["pipeline"], cfg["teacher"]["unet_path"]
    return load_teacher_unet(path or pipe_dir, dtype, config_from=pipe_dir)


def ensure_pipeline(cfg: dict) -> str:
    """``teacher.pipeline``, created first when ``teacher.make_tiny`` asks for it; refuse a non-pipeline dir."""
    pipe_dir = cfg["teacher"]["pipeline"]
    if cfg["teacher"].get("make_tiny") and not os.path.exists(pipe_dir):
        from ..lab.tiny import save_tiny_pipeline

        save_tiny_pipeline(pipe_dir, seed=0, words=["a", "photo", "of", "red", "blue", "circle", "square", "left"])
    if model_dir_kind(pipe_dir) != "pipeline":
        raise KoalaError(f"teacher.pipeline {pipe_dir}: expected an SDXL pipeline directory (model_index.json)")
    return pipe_dir


def load_models(cfg: dict):
    """Return ``(teacher, student, layer_map, frozen)``; all on CPU, teacher frozen in ``teacher.dtype``."""
    pipe_dir = ensure_pipeline(cfg)
    weight_dtype = parse_dtype(cfg["teacher"]["dtype"])
    teacher = load_teacher(cfg, torch.float32)
    s = cfg["student"]
    if s["path"]:
        path = unet_dir(s["path"])
        student = UNet2DConditionModel.from_pretrained(path, dtype=torch.float32)
        lmap = LayerMap.load(path)
    else:
        student, lmap = compress_unet(teacher, s["preset"], s["layer_selection"], torch.float32)
    lmap.validate(teacher, student)  # refuse a map that does not fit before any training
    teacher = _freeze(teacher.to(weight_dtype))

    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, unet=teacher, dtype=weight_dtype)
    if pipe.text_encoder_2 is None or pipe.tokenizer_2 is None:
        raise KoalaError(f"teacher.pipeline {pipe_dir}: SDXL needs text_encoder_2 and tokenizer_2")
    vae_dtype = parse_dtype(cfg["teacher"]["vae_dtype"]) or (
        torch.float32 if getattr(pipe.vae.config, "force_upcast", False) else weight_dtype)
    frozen = Frozen(
        tokenizers=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoders=[_freeze(pipe.text_encoder), _freeze(pipe.text_encoder_2)],
        vae=_freeze(pipe.vae.to(vae_dtype)),
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        scheduler=pipe.scheduler,
        weight_dtype=weight_dtype,
        vae_dtype=vae_dtype,
    )
    return teacher, student.float().train(), lmap, frozen


@torch.no_grad()
def encode_batch(batch: dict, frozen: Frozen | None, device, generator: torch.Generator, caption_dropout: float = 0.0):
    """``(latents, prompt_embeds, pooled, add_time_ids)`` in fp32 on ``device``, from a raw or a cached batch.

    A raw batch is encoded by :func:`koala.data.cache.encode_batch` (the function that builds the cache, so the
    two cannot drift apart) with ``latent_dist.sample(generator)``; ``generator`` should be a CPU generator:
    diffusers then draws the VAE noise on the CPU and moves it, so a run is the same on any device. A cached
    batch (``latents`` present; stored fp16 or fp32) needs no ``frozen`` and is only cast to fp32.
    Dropped captions get zero prompt and pooled embeddings, as SDXL's ``force_zeros_for_empty_prompt`` uncond.
    """
    if "latents" not in batch:
        batch = encode_raw_batch(batch, frozen.encoders, latent="sample", generator=generator)
    latents = batch["latents"].to(device, torch.float32)
    pe = batch["prompt_embeds"].to(device, torch.float32)
    pooled = batch["pooled_prompt_embeds"].to(device, torch.float32)
    ids = batch["add_time_ids"].to(device, torch.float32)
    if caption_dropout > 0:
        drop = (torch.rand(pe.shape[0], generator=generator) < caption_dropout).to(device)
        pe = torch.where(drop[:, None, None], torch.zeros_like(pe), pe)
        pooled = torch.where(drop[:, None], torch.zeros_like(pooled), pooled)
    return latents, pe, pooled, ids
