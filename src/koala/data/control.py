"""Control images (ControlNet conditioning) in ``koala.data`` batches: ``data.control``.

* ``control: canny``: koala computes Canny edges of each training image *after* its crop (so they line up with
  ``pixel_values`` by construction), with OpenCV's ``cv2.Canny`` (``pip install "koala-diffusion[control]"``, i.e.
  opencv-python-headless; thresholds 100 / 200, diffusers' ControlNet training example's values). Without OpenCV
  a PIL fallback is used: ``ImageFilter.FIND_EDGES`` on the grey image, thresholded at 32 (a plain edge map, not
  Canny's thin hysteresis edges; install OpenCV for training data meant to match Canny at inference).
* ``control: NAME``: the file ``<image stem>.NAME.png`` next to each image (``x.jpg`` -> ``x.depth.png``), e.g.
  ``layout`` (the shapes world), ``depth``, ``seg``, ``pose``. It is resized to the image's size if it differs
  and then gets the same resize, flip and crop as the image. A missing file stops the run with its path named.

In a batch: ``control_image`` float ``[B, 3, H, W]`` in ``[0, 1]``, what diffusers' ControlNet pipelines feed a
ControlNet as ``controlnet_cond``. The latent/text cache (``koala cache``) does not store control images: a data
config with ``control`` and ``type: cache`` (or ``koala cache`` of one) is refused.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..errors import KoalaError
from .transforms import Cropped, resize_to_cover

CANNY = "canny"
CANNY_THRESHOLDS = (100, 200)
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_control(cfg: dict) -> None:
    """``data.control``: null, ``canny`` or a file-name part NAME (letters, digits, ``_``, ``-``); a named
    control needs image files on disk, and no kind of control goes with ``type: cache``."""
    control = cfg.get("control")
    if control is None:
        return
    if not isinstance(control, str) or not _NAME.match(control):
        raise KoalaError(
            f"data.control must be 'canny' or a name NAME (letters, digits, _ or -) meaning <image stem>.NAME.png "
            f"next to each image, got {control!r}",
            option="data.control",
        )
    if cfg.get("type") == "cache":
        raise KoalaError(
            "data.control: the latent cache holds no control images; train from the raw source (the image folder "
            "or table the cache was built from) with data.control set",
            option="data.control",
        )
    if control != CANNY and cfg.get("type") not in ("folder", "csv", "parquet", None):
        raise KoalaError(
            f"data.control: {control!r} reads <image stem>.{control}.png next to each image file, which needs "
            f"images on disk (type folder, csv or parquet), not type {cfg.get('type')!r}; use control: canny",
            option="data.control",
        )


def control_path(image_path: str, name: str) -> str:
    """``<image stem>.NAME.png`` next to the image."""
    return f"{os.path.splitext(os.fspath(image_path))[0]}.{name}.png"


def canny(img: Image.Image, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """RGB edge map (white edges on black) of an RGB image: OpenCV's Canny, or the PIL fallback (module doc)."""
    grey = np.asarray(img.convert("L"))
    try:
        import cv2
    except ImportError:
        edges = np.asarray(Image.fromarray(grey).filter(ImageFilter.FIND_EDGES))
        edges = np.where(edges >= 32, 255, 0).astype(np.uint8)
        edges[[0, -1], :] = edges[:, [0, -1]] = 0  # the 3x3 filter has no full neighbourhood on the border
    else:
        edges = cv2.Canny(grey, *thresholds)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


def crop_like(control: Image.Image, c: Cropped) -> Image.Image:
    """``control`` (at the image's original size) resized, flipped and cropped exactly as the image was."""
    img = resize_to_cover(control, c.target_size)
    if c.flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    (top, left), (th, tw) = c.crop_top_left, c.target_size
    return img.crop((left, top, left + tw, top + th))


def read_control_file(image_src, name: str, size_hw: tuple[int, int]) -> Image.Image:
    """The control file of an image (RGB, at the image's ``(h, w)``); refused naming the file when missing."""
    src = image_src.get("path") if isinstance(image_src, dict) else image_src
    if not isinstance(src, (str, os.PathLike)):
        raise KoalaError(
            f"data.control {name!r}: this sample's image is not a file on disk, so there is no <stem>.{name}.png",
            option="data.control",
        )
    path = control_path(src, name)
    if not os.path.isfile(path):
        raise KoalaError(
            f"{path}: control image missing (data.control: {name} reads <image stem>.{name}.png next to each "
            "image); add it or remove the image",
            option="data.control",
        )
    with Image.open(path) as im:
        im = im.convert("RGB")
    h, w = size_hw
    return im if im.size == (w, h) else im.resize((w, h), Image.BICUBIC)


def control_image(name: str, image_src, cropped: Cropped) -> torch.Tensor:
    """The control tensor ``[3, H, W]`` in ``[0, 1]`` of one sample (``cropped``: the image's crop)."""
    if name == CANNY:
        pil = canny(cropped.image)
    else:
        pil = crop_like(read_control_file(image_src, name, cropped.original_size), cropped)
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
