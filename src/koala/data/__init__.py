"""Training data: sources (folder, parquet/csv, webdataset, HF datasets on disk), robust decoding, synCap
captions, SDXL size/crop conditioning, aspect buckets, and the precomputed latent/text cache.

The trainer calls :func:`make_dataloader`; ``koala data stats`` and ``koala cache`` are the CLI front ends.
"""

from .cache import build_cache, check_cache_compatible, encode_batch, pipeline_fingerprint
from .config import DEFAULTS as DATA_CFG_DEFAULTS
from .loader import make_dataloader
from .stats import data_stats

__all__ = [
    "make_dataloader",
    "check_cache_compatible",
    "build_cache",
    "encode_batch",
    "pipeline_fingerprint",
    "data_stats",
    "DATA_CFG_DEFAULTS",
]
