"""Generated image/caption data for tests, benchmarks and smoke runs (no downloads).

``write_folder`` makes a folder of random-pattern images with sidecar captions; ``odd_images`` gives the
kinds of files web-scraped data sets contain (truncated, CMYK, palette+alpha, 16-bit, grayscale, animated,
EXIF-rotated).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

WORDS = ["a", "red", "blue", "circle", "square", "photo", "of", "green", "small", "large", "on", "the", "table"]


def random_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def random_caption(seed: int, n_words: int = 8) -> str:
    rng = np.random.default_rng(seed + 10_000)
    return " ".join(rng.choice(WORDS, size=n_words))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_folder(
    path: str, n: int, sizes=((40, 56), (64, 48), (36, 36)), sidecar: bool = True, seed: int = 0
) -> list[dict]:
    """n images ``{i:05d}.jpg`` (+ ``.txt``); returns rows {file_name, text, syncap, h, w}."""
    os.makedirs(path, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        name = f"{i:05d}.jpg"
        random_image(h, w, seed + i).save(os.path.join(path, name), quality=95)
        cap, syn = random_caption(seed + i, 3 + i % 5), "synthetic " + random_caption(seed + i + 7, 6)
        if sidecar:
            with open(os.path.join(path, f"{i:05d}.txt"), "w") as f:
                f.write(cap)
        rows.append({"file_name": name, "text": cap, "syncap": syn, "h": h, "w": w})
    return rows


def write_noise_pngs(path: str, n: int, broken: bool = True, captions: bool = False, seed: int = 0) -> str:
    """``0.png`` .. ``{n-1}.png`` of uniform noise (40x48) in ``path`` and, with ``broken``, ``{n}.png`` that is
    not an image; with ``captions``, a ``metadata.jsonl`` row ``{"file_name", "text": "photo i"}`` for each
    (``"broken"`` for the broken one). Returns ``path``."""
    import json

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
        rows.append({"file_name": f"{i}.png", "text": f"photo {i}"})
    if broken:
        with open(os.path.join(path, f"{n}.png"), "wb") as f:
            f.write(b"broken")
        rows.append({"file_name": f"{n}.png", "text": "broken"})
    if captions:
        with open(os.path.join(path, "metadata.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def odd_images(h: int = 40, w: int = 48) -> dict[str, bytes]:
    """Name -> encoded bytes for each awkward case (the ``truncated_*`` one must be skipped, others decode)."""
    rgb = random_image(h, w, 123)
    out = {}
    full = encode(rgb, "JPEG", quality=95)
    out["truncated.jpg"] = full[: len(full) // 2]
    out["cmyk.jpg"] = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16).convert("RGBA")
    a = np.asarray(pal).copy()
    a[: h // 2, :, 3] = 0  # top half fully transparent
    pa = Image.fromarray(a, "RGBA").quantize(colors=16, method=Image.FASTOCTREE)
    out["palette_alpha.png"] = encode(pa, "PNG")
    g16 = (np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)
    out["gray16.png"] = encode(Image.fromarray(g16), "PNG")
    out["gray.png"] = encode(rgb.convert("L"), "PNG")
    frames = [Image.new("RGB", (w, h), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out["exif_rot.jpg"] = encode(rgb, "JPEG", quality=95, exif=exif.tobytes())
    out["not_an_image.jpg"] = b"this is not an image"
    return out
