"""Latency, memory, params and FLOPs of models of every family (paper Tables 1/6, Fig. 7), the training-step
benchmark and the memory planner."""

from .memory import PeakMemory
from .models import BenchModel, build_bench_model, materialize, preset_unet_config, random_fill_
from .report import bench_markdown, load_json, plot
from .timing import SCHEMA, BenchSettings, run_bench

__all__ = [
    "PeakMemory",
    "BenchModel",
    "build_bench_model",
    "materialize",
    "preset_unet_config",
    "random_fill_",
    "load_json",
    "bench_markdown",
    "plot",
    "SCHEMA",
    "BenchSettings",
    "run_bench",
]
