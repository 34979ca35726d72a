"""Shapes-world models: the untrained shapes pipeline and the packaged trained teacher.

The architecture is :data:`koala.testing.tiny.SHAPES` (a tiny SDXL-topology pipeline: two CLIP text encoders,
``text_time`` conditioning, transformer depths [., 2, 10], 32x32 images, 16x16 latents); the tokenizer knows
every caption word (:data:`koala.lab.shapes.VOCAB_WORDS`) as one token and pads prompts to 32 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from ..errors import KoalaError
from ..testing.tiny import SHAPES, SHAPES_DIT, tiny_pipeline
from .shapes import VOCAB_WORDS

IMAGE_SIZE = SHAPES.image_size  # pixels; the VAE downsamples by 2, so latents are 16 x 16


def build_shapes_pipeline(seed: int = 0, family: str = "sdxl"):
    """An untrained shapes pipeline (random weights, fp32): SDXL topology (``SHAPES``), or PixArt topology
    (``family="pixart"``: ``SHAPES_DIT``, a T5 encoder and a 12-block DiT); ``save_pretrained`` gives a normal
    diffusers directory."""
    return tiny_pipeline(SHAPES_DIT if family == "pixart" else SHAPES, seed, words=VOCAB_WORDS, family=family)


def shapes_teacher_dir() -> str:
    """Path of the packaged trained teacher pipeline (``koala/assets/shapes-teacher``)."""
    d = Path(__file__).resolve().parent.parent / "assets" / "shapes-teacher"
    if not (d / "model_index.json").is_file():
        raise KoalaError(
            f"{d}: the packaged shapes teacher is missing; regenerate it with `koala lab train-teacher "
            f"--out {d}` (see the README there)"
        )
    return str(d)


def load_shapes_teacher(dtype=torch.float32, device: str | None = None) -> StableDiffusionXLPipeline:
    """The packaged teacher as a ``StableDiffusionXLPipeline`` (sample with 20 Euler steps, guidance 5); its files
    are checked first as for any model koala reads (every component there, safetensors headers whole)."""
    from ..families import get_family

    path = shapes_teacher_dir()
    get_family("sdxl").check_pipeline_dir(path, "packaged shapes teacher")
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_sampling() -> dict:
    """Sampler settings the teacher's scores were measured with."""
    return {"num_inference_steps": 20, "guidance_scale": 5.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE}


__all__ = ["IMAGE_SIZE", "build_shapes_pipeline", "shapes_teacher_dir", "load_shapes_teacher", "default_sampling"]
