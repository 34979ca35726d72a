"""Model families (one module each) and the registry that finds the family of a checkpoint.

Add a family: write ``families/NAME.py`` with a :class:`~koala.families.base.Family` subclass (topology
check, presets, conditioning, pipeline) and register an instance in the loop below.
"""

from __future__ import annotations

import os

from ..errors import KoalaError
from ..utils.files import read_json
from .base import (
    REGISTRY,
    Family,
    Parts,
    UNetFamily,
    describe_config,
    family_of_preset,
    find_model_folder,
    model_subfolders,
)
from .pixart import PixArtFamily
from .sd import SDFamily
from .sdxl import SDXLFamily

FAMILIES: dict[str, Family] = REGISTRY
for _family in (SDXLFamily(), SDFamily(), PixArtFamily()):
    REGISTRY[_family.name] = _family


def get_family(name: str | Family) -> Family:
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise KoalaError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def all_presets() -> dict[str, Family]:
    """Preset name -> its family, over every family."""
    return {p: f for f in FAMILIES.values() for p in f.presets}


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline, by its class (StableDiffusionXLPipeline -> sdxl, ...)."""
    name = type(pipe).__name__
    for fam in FAMILIES.values():
        if name in (*(fam.pipeline_class_names or (fam.pipeline_class_name,)), fam.controlnet_pipeline_class_name):
            return fam
    raise KoalaError(f"{name} is not the pipeline of a supported model family ({', '.join(FAMILIES)})")


def denoiser_of(pipe):
    """A pipeline's denoiser: its ``unet`` or its ``transformer``."""
    model = getattr(pipe, "unet", None)
    return model if model is not None else pipe.transformer


def detect_family(config: dict, where: str = "model config") -> Family:
    """The family whose topology check ``config`` (a denoiser config) passes; else a KoalaError listing why."""
    for fam in FAMILIES.values():
        if not fam.problems(config):
            return fam
    why = "; ".join(f"not {f.label}: {'; '.join(f.problems(config))}" for f in FAMILIES.values())
    raise KoalaError(f"{where} belongs to no supported model family ({', '.join(FAMILIES)}): {why}")


def model_dir_kind(path: str) -> str:
    """'pipeline' (has model_index.json), 'model' (a denoiser's config.json), else a KoalaError."""
    if not os.path.isdir(path):
        raise KoalaError(
            f"{path}: no such directory (give a model directory (U-Net / transformer) or a pipeline directory)"
        )
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "pipeline"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "model"
    raise KoalaError(f"{path}: neither a pipeline directory (model_index.json) nor a model directory (config.json)")


def model_dir(path: str) -> str:
    """The denoiser directory of a pipeline directory (its family's ``model_subfolder``: unet/ or transformer/), or
    ``path`` itself."""
    if model_dir_kind(path) == "pipeline":
        found = find_model_folder(path)
        if found:
            return found
        raise KoalaError(
            f"{path}: pipeline directory has no {' or '.join(f'{s}/config.json' for s in model_subfolders())}"
        )
    return path


def model_config(path: str) -> dict:
    """The denoiser config of a pipeline or model directory."""
    return read_json(os.path.join(model_dir(path), "config.json"))


def family_of(path: str, family: str | Family | None = None) -> Family:
    """The family of a pipeline or model directory: ``family`` when given (then checked), else detected."""
    cfg_path = os.path.join(model_dir(path), "config.json")
    config = read_json(cfg_path)
    if family is None:
        return detect_family(config, cfg_path)
    fam = get_family(family)
    fam.check(config, cfg_path)
    return fam


def load_diffusers_denoiser(path: str, dtype=None, config_from: str | None = None, family: str | Family | None = None):
    """``(model, family)`` from a model or pipeline directory, after checking its topology (diffusers' layouts only).

    ``path`` may also be a single ``.safetensors`` checkpoint in diffusers' key layout (e.g. SDXL-Lightning's U-Net);
    its config then comes from ``config_from`` (a pipeline or model directory of the same architecture). For the
    original single-file layout as well use :func:`koala.formats.single_file.load_denoiser`.
    """
    import torch

    from ..utils.devices import parse_dtype

    if os.path.isfile(path):
        if not path.endswith(".safetensors") or not config_from:
            raise KoalaError(
                f"{path}: give a model directory, or a .safetensors checkpoint together with the "
                "pipeline whose config it fits"
            )
        from safetensors.torch import load_file

        from ..utils.weights import check_safetensors

        check_safetensors(path)
        fam = family_of(config_from, family)
        model = fam.build_model(model_config(config_from), "meta")
        try:
            model.load_state_dict(load_file(path), strict=True, assign=True)
        except RuntimeError as err:
            raise KoalaError(f"{path}: weights do not fit the config of {config_from} ({str(err)[:300]})") from err
        return model.to(parse_dtype(dtype) or torch.float32), fam
    fam = family_of(path, family)
    return fam.load_model(model_dir(path), dtype), fam


def preset_stats(name: str, flops: bool = True) -> dict:
    """Row of the presets table: family, params (exact count of the denoiser), TFLOPs at 1024² and 512², and the
    family's structure columns (depths, or DiT blocks)."""
    from ..arch.stats import forward_flops
    from ..utils.weights import count_params

    fam = family_of_preset(name)
    if fam is None:
        raise KoalaError(f"unknown preset {name!r}; choose one of: {', '.join(all_presets())}")
    spec = fam.resolve_spec(name)
    cfg = fam.student_config(fam.reference_config, spec)
    model = fam.build_model(cfg, "meta")
    row = {
        "name": name,
        "family": fam.name,
        "description": spec.description,
        "params": count_params(model),
        "paper_params": spec.paper_params,
        **fam.spec_summary(spec),
    }
    if flops:
        for res in (1024, 512):
            row[f"tflops_{res}"] = round(forward_flops(model, fam.dummy_inputs(cfg, res // 8)) / 1e12, 3)
    return row


def all_preset_stats(flops: bool = True) -> list[dict]:
    return [preset_stats(n, flops=flops) for n in all_presets()]


__all__ = [
    "FAMILIES",
    "Family",
    "Parts",
    "UNetFamily",
    "SDFamily",
    "SDXLFamily",
    "PixArtFamily",
    "get_family",
    "family_of_preset",
    "all_presets",
    "detect_family",
    "family_of_pipeline",
    "denoiser_of",
    "describe_config",
    "model_dir_kind",
    "model_dir",
    "model_subfolders",
    "find_model_folder",
    "model_config",
    "family_of",
    "load_diffusers_denoiser",
    "preset_stats",
    "all_preset_stats",
]
