"""SDXL training transforms with size- and crop-conditioning bookkeeping.

Same order as diffusers' ``train_text_to_image_sdxl.py``: record ``original_size`` = (h, w) of the decoded
image, resize so the image covers the target (short side = resolution for square training), random
horizontal flip of the *resized* image, then the crop; ``crop_top_left`` = (top, left) of that crop in the
resized (and possibly flipped) image, recorded when the crop is made. ``target_size`` = the crop size.
A sample whose fields record its size before download-time resizing (img2dataset's ``original_height`` /
``original_width``) gets that as ``original_size`` instead (``koala.data.batching.prepare_sample``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .buckets import nearest_bucket


@dataclass
class Cropped:
    image: Image.Image
    original_size: tuple[int, int]  # (h, w) before any resize
    crop_top_left: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]  # (h, w) of the crop
    flipped: bool


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """Per-sample RNG: the same sample gets the same crop/flip for a given seed and epoch, whatever the
    worker, rank or order (so a cache and the raw loader agree, and resumed runs are reproducible)."""
    return random.Random(f"{seed}:{epoch}:{key}")


def resize_to_cover(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    th, tw = target
    w, h = img.size
    scale = max(th / h, tw / w)
    nh, nw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
    if (nh, nw) == (h, w):
        return img
    return img.resize((nw, nh), Image.BICUBIC)


def sdxl_crop(
    img: Image.Image, target: tuple[int, int], rng: random.Random, center_crop: bool = False, random_flip: bool = True
) -> Cropped:
    original_size = (img.height, img.width)
    img = resize_to_cover(img, target)
    flipped = bool(random_flip and rng.random() < 0.5)
    if flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    th, tw = target
    if center_crop:
        top, left = int(round((img.height - th) / 2.0)), int(round((img.width - tw) / 2.0))
    else:
        top, left = rng.randint(0, img.height - th), rng.randint(0, img.width - tw)
    img = img.crop((left, top, left + tw, top + th))
    return Cropped(img, original_size, (top, left), (th, tw), flipped)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class SDXLTransform:
    """Decoded RGB image -> :class:`Cropped` for a square ``resolution`` or the nearest aspect bucket."""

    def __init__(
        self,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = True,
        buckets: list[tuple[int, int]] | None = None,
    ):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.buckets = buckets

    def target_for(self, h: int, w: int) -> tuple[int, int]:
        return nearest_bucket(h, w, self.buckets) if self.buckets else (self.resolution, self.resolution)

    def __call__(self, img: Image.Image, rng: random.Random) -> Cropped:
        return sdxl_crop(img, self.target_for(img.height, img.width), rng, self.center_crop, self.random_flip)
