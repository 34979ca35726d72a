"""Compress an SDXL-architecture teacher U-Net into a KOALA student, initialised from the teacher's weights."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from ..errors import KoalaError
from ..utils import atomic_output_dir, count_params, model_dir_kind, parse_dtype, read_json, unet_dir
from .layer_map import LayerMap, build_layer_map
from .presets import UNetSpec, check_sdxl_topology, resolve_spec, student_config


def build_unet(config: dict, device: str | torch.device = "meta") -> UNet2DConditionModel:
    """Instantiate a U-Net from a config; on ``meta`` this costs no memory and no init time."""
    with torch.device(device):
        return UNet2DConditionModel.from_config(config)


def load_teacher_unet(path: str, dtype: torch.dtype | str | None = None, config_from: str | None = None) -> UNet2DConditionModel:
    """Load a U-Net from a U-Net directory or an SDXL pipeline directory, after checking its topology.

    ``path`` may also be a single ``.safetensors`` U-Net checkpoint (e.g. SDXL-Lightning's); its config then comes
    from ``config_from`` (a pipeline or U-Net directory of the same architecture).
    """
    if os.path.isfile(path):
        if not path.endswith(".safetensors") or not config_from:
            raise KoalaError(f"{path}: give a U-Net directory, or a .safetensors U-Net checkpoint together with the "
                             "pipeline whose U-Net config it fits")
        from safetensors.torch import load_file

        config = read_json(os.path.join(unet_dir(config_from), "config.json"))
        check_sdxl_topology(config, f"{config_from} U-Net config")
        unet = build_unet(config, "meta")
        try:
            unet.load_state_dict(load_file(path), strict=True, assign=True)
        except RuntimeError as err:
            raise KoalaError(f"{path}: weights do not fit the U-Net config of {config_from} ({str(err)[:300]})") from err
        return unet.to(parse_dtype(dtype) or torch.float32)
    kind = model_dir_kind(path)
    unet_path = os.path.join(path, "unet") if kind == "pipeline" else path
    check_sdxl_topology(read_json(os.path.join(unet_path, "config.json")), f"{unet_path}/config.json")
    return UNet2DConditionModel.from_pretrained(unet_path, dtype=parse_dtype(dtype) or torch.float32)


def compress_unet(
    teacher: UNet2DConditionModel,
    spec: UNetSpec | str | dict,
    layer_selection: str = "bottom",
    dtype: torch.dtype | str | None = None,
) -> tuple[UNet2DConditionModel, LayerMap]:
    """Return ``(student, layer_map)``: every student tensor is a copy of the teacher tensor the map names."""
    spec = resolve_spec(spec)
    cfg = student_config(dict(teacher.config), spec)
    student = build_unet(cfg, "meta")
    lmap = build_layer_map(teacher, student, layer_selection)
    lmap.meta["spec"] = spec.to_dict()
    t_state = teacher.state_dict()
    dtype = parse_dtype(dtype) or next(teacher.parameters()).dtype
    state = {}
    for name, p in student.state_dict().items():
        src = t_state[lmap.teacher_name(name)]
        if tuple(src.shape) != tuple(p.shape):  # would be a bug in build_layer_map; never copy silently
            raise KoalaError(f"shape mismatch copying {lmap.teacher_name(name)} -> {name}: {tuple(src.shape)} vs {tuple(p.shape)}")
        state[name] = src.detach().to(dtype=dtype, copy=True)
    student.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, b in student.named_buffers() if b.is_meta]
    if leftover:
        raise KoalaError(f"student buffers left uninitialised: {leftover[:5]}")
    return student, lmap


@dataclass
class CompressResult:
    out_dir: str
    kind: str  # "unet" or "pipeline"
    teacher_params: int
    student_params: int
    tensors_copied: int

    @property
    def kept(self) -> float:
        return self.student_params / self.teacher_params


def compress(
    teacher_path: str,
    preset: UNetSpec | str | dict,
    out_dir: str,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    layer_selection: str = "bottom",
    teacher_unet: str | None = None,
) -> CompressResult:
    """Compress ``teacher_path`` (U-Net dir or SDXL pipeline dir) into ``out_dir`` atomically.

    For a pipeline, ``out_dir`` becomes a full pipeline directory with the student U-Net in ``unet/``.
    ``teacher_unet`` replaces the pipeline's U-Net as the teacher (e.g. a SDXL-Lightning U-Net checkpoint).
    """
    kind = model_dir_kind(teacher_path)
    spec = resolve_spec(preset)
    if os.path.exists(out_dir) and not overwrite:
        raise KoalaError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out")
    teacher = load_teacher_unet(teacher_unet or teacher_path, dtype, config_from=teacher_path)
    student, lmap = compress_unet(teacher, spec, layer_selection, dtype)
    lmap.meta.update({"teacher_path": os.path.abspath(teacher_unet or teacher_path),
                      "preset": preset if isinstance(preset, str) else None})
    with atomic_output_dir(out_dir, overwrite) as tmp:
        if kind == "pipeline":
            for entry in sorted(os.listdir(teacher_path)):
                src = os.path.join(teacher_path, entry)
                if entry == "unet" or entry.startswith("."):
                    continue
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(tmp, entry))
                else:
                    shutil.copy2(src, os.path.join(tmp, entry))
            unet_out = os.path.join(tmp, "unet")
        else:
            unet_out = tmp
        student.save_pretrained(unet_out, safe_serialization=True)
        lmap.save(unet_out)
    return CompressResult(os.path.abspath(out_dir), kind, count_params(teacher), count_params(student),
                          len(student.state_dict()))
