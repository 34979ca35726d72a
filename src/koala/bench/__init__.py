"""Latency, memory, params and FLOPs of SDXL-architecture models (paper Tables 1/6, Fig. 7)."""

from .memory import PeakMemory
from .models import BenchModel, build_bench_model, materialize, preset_unet_config, random_fill_
from .report import load_json, markdown_table, plot, write_json
from .timing import SCHEMA, BenchSettings, run_bench

__all__ = [
    "PeakMemory",
    "BenchModel",
    "build_bench_model",
    "materialize",
    "preset_unet_config",
    "random_fill_",
    "load_json",
    "markdown_table",
    "plot",
    "write_json",
    "SCHEMA",
    "BenchSettings",
    "run_bench",
]
