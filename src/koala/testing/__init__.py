"""The testing floor: tiny random models, an offline CLIP tokenizer and generated image/caption data.

Imports nothing of koala but ``errors`` and ``utils``, so every other part (and the test suite) may build on it.
Names are loaded on first use, so ``koala.testing.images`` does not pull in diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tiny": [
        "TinySpec",
        "RANDOM",
        "SHAPES",
        "FAMILIES",
        "unet_config",
        "tiny_unet",
        "tiny_vae",
        "tiny_text_encoders",
        "tiny_tokenizer",
        "sdxl_scheduler",
        "sd_scheduler",
        "tiny_pipeline",
        "save_tiny_pipeline",
    ],
    "tokenizer": ["build_clip_tokenizer"],
    "images": ["WORDS", "random_image", "random_caption", "encode", "write_folder", "odd_images"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
