"""The images a scorer reads: a folder of images with their prompts (metadata.jsonl or PNG 'prompt' chunks), or a
list of files. Unreadable images are skipped and counted, never scored."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import KoalaError


@dataclass
class PromptedImages:
    folder: str
    images: list = field(default_factory=list)  # RGB PIL images
    prompts: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # paths relative to the folder
    skipped: list[dict] = field(default_factory=list)  # {"file_name", "reason"}


def read_prompted_images(folder: str, limit: int | None = None) -> PromptedImages:
    """Every readable (image, prompt) of ``folder`` (the first ``limit``); a KoalaError when none can be read."""
    from PIL import Image

    from ..lab.score import image_prompt_pairs

    items = image_prompt_pairs(folder)[:limit]
    out = PromptedImages(folder)
    for path, text in items:
        try:
            with Image.open(path) as im:
                out.images.append(im.convert("RGB"))
        except (OSError, ValueError) as err:
            out.skipped.append({"file_name": os.path.relpath(path, folder), "reason": str(err)[:200]})
            continue
        out.prompts.append(text)
        out.names.append(os.path.relpath(path, folder))
    if not out.images:
        raise KoalaError(f"{folder}: none of the {len(items)} images could be read ({len(out.skipped)} skipped)")
    return out


def open_rgb(paths: list[str]) -> list:
    """RGB PIL images of ``paths`` (files koala wrote itself, e.g. koala eval run's PNGs)."""
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images
