"""Architecture: presets, compression with teacher-weight initialisation, the teacher->student layer map."""

from .compress import CompressResult, build_unet, compress, compress_unet, load_teacher_unet
from .layer_map import LAYER_MAP_FILE, LayerMap, MapEntry, build_layer_map, select_layers
from .presets import PAPER_MODELS, PRESETS, SDXL_BASE_UNET_CONFIG, UNetSpec, check_sdxl_topology, resolve_spec, student_config, teacher_spec

__all__ = [
    "CompressResult", "build_unet", "compress", "compress_unet", "load_teacher_unet",
    "LAYER_MAP_FILE", "LayerMap", "MapEntry", "build_layer_map", "select_layers",
    "PAPER_MODELS", "PRESETS", "SDXL_BASE_UNET_CONFIG", "UNetSpec", "check_sdxl_topology", "resolve_spec",
    "student_config", "teacher_spec",
]
