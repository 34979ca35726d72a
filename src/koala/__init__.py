"""koala: build fast, small SDXL-architecture text-to-image models the KOALA way (Lee et al., NeurIPS 2024)."""

__version__ = "0.1.0"

from .errors import KoalaError  # noqa: E402

__all__ = ["KoalaError", "__version__"]
