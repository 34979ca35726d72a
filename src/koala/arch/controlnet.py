"""ControlNet surgery through the layer map: a student ControlNet whose encoder mirrors the student U-Net's.

A ControlNet is a copy of its U-Net's encoder (``conv_in``, time / added embeddings, ``down_blocks``, ``mid_block``,
with the U-Net's own module names) plus the conditioning embedding and one zero convolution per residual the
encoder hands the decoder (``controlnet_down_blocks``: ``conv_in``'s output, every resnet(+attention) pair's
output, every downsampler's output) and one for the mid block (``controlnet_mid_block``). So the student
ControlNet takes:

- the encoder modules the layer map names (kept blocks, kept transformer layers), copied from the teacher
  ControlNet's modules at the teacher names;
- ``controlnet_cond_embedding``, ``conv_in``, time and added embeddings as they are;
- for each student residual slot, the teacher ControlNet's zero convolution of the teacher slot it maps to;
- the mid block and ``controlnet_mid_block`` when the student has a mid block. Without one, the mid residual is
  ``controlnet_mid_block`` on the last encoder output (where the student U-Net adds it), a new zero convolution
  (ControlNet's own initialisation of a new link: it adds nothing until trained).

Works for any U-Net family whose ControlNet is diffusers' ``ControlNetModel`` (SDXL, SD-1.x/2.x).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import KoalaError
from .config import public_config
from .layer_map import LayerMap

# ControlNet config fields that describe the encoder: they must equal the teacher U-Net's, and the student
# ControlNet takes the student U-Net's
ENCODER_FIELDS = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
    "use_linear_projection",
    "norm_num_groups",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "class_embed_type",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "resnet_time_scale_shift",
    "flip_sin_to_cos",
    "freq_shift",
)
CONTROLNET_CLASSES = ("ControlNetModel", "KoalaControlNetModel")
# diffusers' defaults of the fields above where a U-Net config and a ControlNet config may leave them out
_DEFAULTS = {"only_cross_attention": False, "use_linear_projection": False, "transformer_layers_per_block": 1}


def _norm(value, n: int):
    """A per-stage field as one list of ``n`` values (an int or bool means the same for every stage)."""
    if isinstance(value, (list, tuple)):
        return [list(v) if isinstance(v, (list, tuple)) else v for v in value]
    return [value] * n


def encoder_mismatches(controlnet_config: dict[str, Any], unet_config: dict[str, Any]) -> list[str]:
    """The encoder fields where a ControlNet config differs from a U-Net config; [] when it is that U-Net's."""
    n = len(unet_config.get("down_block_types", []))
    out = []
    for key in ENCODER_FIELDS:
        a, b = controlnet_config.get(key, _DEFAULTS.get(key)), unet_config.get(key, _DEFAULTS.get(key))
        if key == "num_attention_heads":  # diffusers: None means attention_head_dim
            a = a or controlnet_config.get("attention_head_dim")
            b = b or unet_config.get("attention_head_dim")
        per_stage = isinstance(a, (list, tuple)) or isinstance(b, (list, tuple))
        if (_norm(a, n) != _norm(b, n)) if per_stage else a != b:
            out.append(f"{key}: {a!r} here, {b!r} in the teacher's U-Net")
    return out


def student_controlnet_config(teacher_controlnet_config: dict[str, Any], student_config: dict[str, Any]) -> dict:
    """The student ControlNet's config: the teacher ControlNet's (conditioning embedding, channel order, ...) with
    the student U-Net's encoder fields and mid block."""
    cfg = public_config(teacher_controlnet_config)
    for key in ENCODER_FIELDS:
        if key in student_config:
            cfg[key] = student_config[key]
    lpb = cfg.get("layers_per_block")
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise KoalaError(
                f"the student has {list(lpb)} resnets per encoder stage; diffusers' ControlNet takes one count "
                "for every stage (layers_per_block is an int), so this student cannot have a ControlNet"
            )
        cfg["layers_per_block"] = lpb[0]
    cfg["mid_block_type"] = student_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return cfg


def controlnet_class_name(config: dict[str, Any]) -> str:
    """``ControlNetModel``, or ``KoalaControlNetModel`` for a config without a mid block."""
    return "KoalaControlNetModel" if config.get("mid_block_type") is None else "ControlNetModel"


def build_controlnet(config: dict[str, Any], device: str | torch.device = "meta"):
    """A ControlNet (diffusers' class, or koala's subclass without a mid block) from a config, on ``device``."""
    from diffusers import ControlNetModel

    from .controlnet_model import KoalaControlNetModel

    cls = KoalaControlNetModel if controlnet_class_name(config) == "KoalaControlNetModel" else ControlNetModel
    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k != "auto_map"}
    with torch.device(device):
        return cls.from_config(cfg)


def residual_slots(model: torch.nn.Module) -> list[str]:
    """The module that makes each down residual of a U-Net or ControlNet, in order: ``conv_in``, then per
    encoder stage its resnets (each with its attention) and its downsampler."""
    names = ["conv_in"]
    for i, block in enumerate(model.down_blocks):
        names += [f"down_blocks.{i}.resnets.{j}" for j in range(len(block.resnets))]
        if block.downsamplers is not None:
            names.append(f"down_blocks.{i}.downsamplers")
    return names


def slot_map(lmap: LayerMap, student: torch.nn.Module, teacher: torch.nn.Module) -> list[int]:
    """For each residual slot of ``student`` (U-Net or ControlNet), the teacher slot the layer map maps it to."""
    t_index = {name: k for k, name in enumerate(residual_slots(teacher))}
    out = []
    for name in residual_slots(student):
        tname = lmap.teacher_name(name)
        if tname not in t_index:
            raise KoalaError(f"student residual {name} maps to {tname}, which makes no residual in the teacher")
        out.append(t_index[tname])
    return out


def _teacher_tensor_name(name: str, lmap: LayerMap, slots: list[int], has_mid: bool) -> str | None:
    """The teacher ControlNet tensor a student ControlNet tensor is copied from (None: a new zero convolution)."""
    head, _, rest = name.partition(".")
    if head == "controlnet_down_blocks":
        k, _, tail = rest.partition(".")
        return f"controlnet_down_blocks.{slots[int(k)]}.{tail}"
    if head == "controlnet_mid_block":
        return name if has_mid else None
    if head == "controlnet_cond_embedding":
        return name
    return lmap.teacher_name(name)


def init_controlnet_from_teacher(
    teacher: torch.nn.Module, student: torch.nn.Module, lmap: LayerMap, dtype: torch.dtype | None = None
) -> list[int]:
    """Fill ``student`` (a ControlNet built from :func:`student_controlnet_config`, on ``meta`` or anywhere) from the
    teacher ControlNet through the layer map, in place. Returns the slot map (student residual -> teacher)."""
    slots = slot_map(lmap, student, teacher)
    t_state = teacher.state_dict()
    dtype = dtype or next(teacher.parameters()).dtype
    has_mid = student.mid_block is not None
    state = {}
    for name, p in student.state_dict().items():
        tname = _teacher_tensor_name(name, lmap, slots, has_mid)
        if tname is None:
            state[name] = torch.zeros(p.shape, dtype=dtype)
            continue
        src = t_state.get(tname)
        if src is None or tuple(src.shape) != tuple(p.shape):
            raise KoalaError(
                f"cannot copy the teacher ControlNet's {tname} -> {name}: "
                + ("no such tensor" if src is None else f"{tuple(src.shape)} vs {tuple(p.shape)}")
            )
        state[name] = src.detach().to(dtype=dtype, copy=True)
    student.load_state_dict(state, strict=True, assign=True)
    return slots
