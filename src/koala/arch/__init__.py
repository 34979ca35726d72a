"""Architecture primitives shared by every family: the teacher->student layer map, generic U-Net surgery
(specs, student configs, layer-map building) and initialisation of a student from its teacher."""

from .compress import init_from_teacher
from .layer_map import LAYER_MAP_FILE, SELECTIONS, LayerMap, MapEntry, select_layers
from .unet import UNetSpec, build_unet_layer_map, unet_student_config, unet_teacher_spec

__all__ = [
    "init_from_teacher",
    "LAYER_MAP_FILE",
    "SELECTIONS",
    "LayerMap",
    "MapEntry",
    "select_layers",
    "UNetSpec",
    "build_unet_layer_map",
    "unet_student_config",
    "unet_teacher_spec",
]
