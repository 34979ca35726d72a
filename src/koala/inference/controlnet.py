"""ControlNets at inference: load one (a teacher's or one from ``koala controlnet transfer``), turn a loaded
pipeline into its family's diffusers ControlNet pipeline, and read a control image at the output size."""

from __future__ import annotations

import os

import torch

from ..errors import KoalaError
from ..formats.controlnet import read_controlnet_config
from ..utils.files import read_json


def load_controlnet(path: str, dtype: torch.dtype | None = None):
    """The ControlNet of folder ``path``, usable as ``controlnet=`` in the family's diffusers ControlNet pipeline
    (StableDiffusionXLControlNetPipeline / StableDiffusionControlNetPipeline): a diffusers ``ControlNetModel``, or
    koala's ``KoalaControlNetModel`` for a student without a mid block."""
    from diffusers import ControlNetModel

    from ..arch.controlnet_model import KoalaControlNetModel

    cfg = read_controlnet_config(path)
    cls = KoalaControlNetModel if cfg["_class_name"] == "KoalaControlNetModel" else ControlNetModel
    from diffusers.utils import logging

    kw = {"dtype": dtype} if dtype is not None else {}
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # not the "auto_map was passed but is not expected" warning: it is for AutoModel
    try:
        return cls.from_pretrained(path, use_safetensors=True, **kw).eval()
    finally:
        logging.set_verbosity(level)


def controlnet_pipeline_class(fam):
    """The family's diffusers ControlNet pipeline class; refused for a family diffusers has none for (PixArt)."""
    import diffusers

    if not fam.controlnet_pipeline_class_name:
        raise KoalaError(f"diffusers has no ControlNet pipeline for {fam.label}", option="controlnet")
    return getattr(diffusers, fam.controlnet_pipeline_class_name)


def load_checked_controlnet(path: str, src, dtype: torch.dtype | None = None):
    """:func:`load_controlnet`, refused (naming the folder and the fields) unless its encoder is the U-Net's of the
    pipeline source ``src`` (``koala.inference.pipeline._Source``): a teacher's ControlNet on a student is."""
    from ..arch.controlnet import encoder_mismatches

    fam = src.family
    controlnet_pipeline_class(fam)
    unet = src.kwargs.get(fam.model_subfolder)
    ucfg = dict(unet.config) if unet is not None else read_json(os.path.join(src.path, "unet", "config.json"))
    cfg = read_controlnet_config(path)
    bad = encoder_mismatches(cfg, ucfg)
    if (cfg.get("mid_block_type", "x") is None) != (ucfg.get("mid_block_type", "x") is None):
        bad.append(f"mid_block_type: {cfg.get('mid_block_type')!r} here, {ucfg.get('mid_block_type')!r} in the U-Net")
    if bad:
        raise KoalaError(
            f"ControlNet {path} does not fit the U-Net of {src.name} (for a student, transfer the teacher's "
            "ControlNet first: koala controlnet transfer TEACHER_CONTROLNET --student STUDENT --out DIR):\n  "
            + "\n  ".join(bad[:8]).replace("in the teacher's U-Net", "in the U-Net"),
            option="controlnet",
        )
    return load_controlnet(path, dtype)


def controlnet_pipeline(pipe, controlnet):
    """The family's diffusers ControlNet pipeline over the components of the loaded pipeline ``pipe``."""
    from ..families import family_of_pipeline

    cls = controlnet_pipeline_class(family_of_pipeline(pipe))
    controlnet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    return cls.from_pipe(pipe, controlnet=controlnet)


def load_control_image(path: str, width: int, height: int):
    """The control image of ``path`` as an RGB PIL image resized to the output size."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise KoalaError(f"control image {path}: no such file", option="control_image")
    try:
        with Image.open(path) as im:
            return im.convert("RGB").resize((width, height), Image.BICUBIC)
    except (UnidentifiedImageError, OSError) as err:
        raise KoalaError(f"control image {path}: cannot read it as an image ({err})", option="control_image") from None
