"""koala: fast, small text-to-image diffusion models made the KOALA way (Lee et al., NeurIPS 2024).

Compress a teacher's denoiser (SDXL and SD-1.x U-Nets, PixArt DiTs), distill the student with self-attention knowledge
distillation, then generate with it, measure it the way the paper does and export it. The parts, one folder each, are
drawn in ``docs/architecture.md``; the ``koala`` command (:mod:`koala.cli`) is a thin front end over them.
"""

__version__ = "0.1.0"

from .errors import KoalaError  # noqa: E402

__all__ = ["KoalaError", "__version__"]
