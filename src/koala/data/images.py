"""Robust image decoding: every odd file a web-scraped data set contains becomes RGB or a counted skip.

Handled: EXIF rotation (applied), CMYK / YCbCr / LAB (converted), palette and alpha (composited on white),
16-bit and float grayscale (rescaled to 8 bit), 1-bit and grayscale (to RGB), animated GIF/WebP/PNG (first
frame). Skipped with a reason: truncated or corrupt files, missing files, decompression bombs.
Nothing is ever raised to the training loop except :class:`SkipSample`, which the callers count.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is a short key counted in the skip summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(src) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    if isinstance(src, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if src.get("bytes"):
            return _open(src["bytes"])
        return _open(src.get("path") or "")
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise SkipSample("missing_file", path)
    return Image.open(path)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit / 32-bit grayscale: rescale to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _upright_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF does not matter for the size
        orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


@contextlib.contextmanager
def skip_on_decode_error():
    """Turn PIL's errors into :class:`SkipSample` with a reason (too_large, not_an_image, truncated, corrupt)."""
    try:
        yield
    except SkipSample:
        raise
    except Image.DecompressionBombError as err:
        raise SkipSample("too_large", str(err)) from None
    except UnidentifiedImageError as err:
        raise SkipSample("not_an_image", str(err)) from None
    except FileNotFoundError as err:  # removed between the existence check and the read
        raise SkipSample("missing_file", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
        raise SkipSample(reason, str(err)) from None


def decode_image(src, check=None) -> Image.Image:
    """Open ``src`` (path, bytes, PIL image or ``{"bytes", "path"}``) as an upright RGB image or raise SkipSample.

    ``check(h, w)`` (upright size, read from the header) may raise SkipSample before the costly full decode.
    """
    if src is None:
        raise SkipSample("no_image")
    with skip_on_decode_error():
        img = _open(src)
        if check is not None:
            check(*_upright_size(img))
        if getattr(img, "is_animated", False):
            img.seek(0)  # first frame of an animation
        img.load()  # forces full decode: truncated files fail here, not in the middle of a batch
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


class SkipCounter(Counter):
    """Counts skipped samples by reason."""

    def summary(self) -> str:
        if not self:
            return "no samples skipped"
        return f"skipped {sum(self.values())}: " + ", ".join(f"{k}={v}" for k, v in sorted(self.items()))
