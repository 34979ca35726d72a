"""Inference: load pipelines of any supported family with memory/speed modes, generate, save PNGs with metadata."""

from .generate import (
    GeneratedImage,
    GenerationResult,
    generate,
    make_grid,
    png_info,
    read_png_params,
    read_prompts,
    save_images,
)
from .pipeline import LoadedPipeline, load_pipeline
from .safety import NSFWFilter

__all__ = [
    "GeneratedImage",
    "GenerationResult",
    "generate",
    "make_grid",
    "png_info",
    "read_png_params",
    "read_prompts",
    "save_images",
    "LoadedPipeline",
    "load_pipeline",
    "NSFWFilter",
]
