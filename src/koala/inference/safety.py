"""The optional NSFW filter of generated images; it lives in :mod:`koala.safety` (the data pipeline uses it too)."""

from ..safety import NSFWFilter

__all__ = ["NSFWFilter"]
