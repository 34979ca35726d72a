"""``koala analyze``: the paper's instruments for looking inside a teacher or a student (Table 1, Figs. 3, 11, 13).

Each ``analyze_*`` function writes a PNG figure and a JSON of its numbers into an output folder and returns the
numbers: :func:`analyze_params` (parameters per stage and component, FLOPs per stage; teacher vs student),
:func:`analyze_latency` (forward time per stage), :func:`analyze_similarity` (cross-layer cosine similarity,
and teacher vs student per mapped layer), :func:`analyze_sa_pca` (PCA of self-attention outputs per stage).
Models are preset names (built on the meta device or with random weights) or local directories.
"""

from __future__ import annotations

import json
import os

import torch

from ..arch.layer_map import LAYER_MAP_FILE, LayerMap
from ..errors import KoalaError
from ..families import Family, all_presets, load_diffusers_denoiser, model_dir, model_dir_kind
from ..utils.files import atomic_write_text
from .structure import COMPONENTS, dissect, self_map

__all__ = ["analyze_params", "analyze_latency", "analyze_similarity", "analyze_sa_pca", "resolve_model", "COMPONENTS"]


def _student_map(path: str) -> LayerMap | None:
    found = LayerMap.find(model_dir(path))
    return LayerMap.load(found) if found else None


def resolve_model(name: str, device: str = "meta", dtype=torch.float32):
    """``(family, model, layer_map_or_None, teacher_config_or_None)`` for a preset (built on ``device``; random
    weights off meta) or a model / pipeline directory (its weights; its saved layer map when it is a student)."""
    if os.path.exists(name):
        model, fam = load_diffusers_denoiser(name, dtype)
        lmap = _student_map(name)
        return fam, model.to(device).eval(), lmap, (lmap.teacher_config if lmap is not None else None)
    fam = all_presets().get(name)
    if fam is None:
        raise KoalaError(
            f"{name}: neither a local model/pipeline directory nor a preset ({', '.join(all_presets())})",
            option="model",
        )
    cfg = fam.student_config(fam.reference_config, name)
    if device == "meta":
        model = fam.build_model(cfg, "meta")
    else:
        from ..bench.models import materialize

        model = materialize(lambda: fam.build_model(cfg, "meta"), device, dtype)
    teacher_cfg = dict(fam.reference_config)
    if fam.resolve_spec(name) == fam.teacher_spec(teacher_cfg):  # the reference teacher itself: no teacher beside it
        return fam, model.eval(), None, None
    return fam, model.eval(), fam.build_layer_map(fam.build_model(teacher_cfg, "meta"), model), teacher_cfg


def _write(out_dir: str, stem: str, numbers: dict, figure) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "png": os.path.join(out_dir, f"{stem}.png")}
    atomic_write_text(paths["json"], json.dumps(numbers, indent=1, default=str))
    figure(paths["png"])
    return {**numbers, "files": paths}


def analyze_params(model: str, out_dir: str, teacher: str | None = None, resolution: int = 1024) -> dict:
    """Parameters per stage and component and FLOPs per stage (meta device: no weights needed). A student (a
    preset, or a directory with ``koala_layer_map.json``) is shown next to its teacher (``teacher``, or the
    family's reference teacher / the teacher config its layer map saved)."""
    from .figures import params_figure

    fam, s_model, lmap, t_cfg = resolve_model(model, "meta")
    s_cfg = dict(s_model.config)
    lat = resolution // 8
    rows = {model: dissect(fam, s_model, lmap or self_map(fam, s_model), fam.dummy_inputs(s_cfg, lat)).to_dict()}
    if teacher or lmap is not None:
        if teacher:
            _, t_model, _, _ = resolve_model(teacher, "meta")
        else:
            t_model = fam.build_model(t_cfg, "meta")
        t_name = teacher or "teacher"
        rows = {
            t_name: dissect(
                fam, t_model, self_map(fam, t_model), fam.dummy_inputs(dict(t_model.config), lat)
            ).to_dict(),
            **rows,
        }
    stages = list(dict.fromkeys(s for r in rows.values() for s in r["params"]))
    numbers = {
        "family": fam.name,
        "resolution": resolution,
        "stages": stages,
        "components": list(COMPONENTS),
        "models": rows,
    }
    return _write(out_dir, "params", numbers, lambda p: params_figure(numbers, p))


def analyze_latency(
    model: str,
    out_dir: str,
    resolution: int = 512,
    batch: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = True,
) -> dict:
    """Median forward time per stage (random weights for a preset, the real ones for a directory)."""
    from ..utils.devices import parse_device, parse_dtype
    from .figures import latency_figure
    from .timing import stage_latency

    dev, dt = parse_device(device), parse_dtype(dtype) or torch.float32
    fam, m, lmap, _ = resolve_model(model, str(dev), dt)
    m = m.to(dev, dt)
    lmap = lmap or self_map(fam, m)
    inputs = fam.dummy_inputs(dict(m.config), resolution // 8, batch, device=dev, dtype=dt)
    times = stage_latency(m, lmap, inputs, repeats=repeats, warmup=warmup, progress=progress)
    numbers = {
        "family": fam.name,
        "model": model,
        "resolution": resolution,
        "batch": batch,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "repeats": repeats,
        "ms": times,
    }
    return _write(out_dir, "latency", numbers, lambda p: latency_figure(numbers, p))


def _pipeline(path: str, what: str, device: str):
    from ..inference import load_pipeline

    if not os.path.isdir(path) or model_dir_kind(path) != "pipeline":
        raise KoalaError(
            f"{what} {path}: give a pipeline directory (the text encoders and VAE are needed to generate)", option=what
        )
    return load_pipeline(path, device=device, dtype="fp32")


def _student(path: str, family: Family, device: str):
    lmap = _student_map(path)
    if lmap is None:
        raise KoalaError(
            f"student {path}: no {LAYER_MAP_FILE} (a student written by koala compress / koala distill "
            "is needed to know which teacher layer each of its layers matches)",
            option="student",
        )
    model, fam = load_diffusers_denoiser(path, torch.float32, family=family)
    return model.to(device).eval(), lmap


def analyze_similarity(
    model: str,
    out_dir: str,
    prompts: list[str],
    student: str | None = None,
    steps: int = 10,
    cfg: float = 3.5,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Cross-layer cosine similarity of the transformer layers of ``model`` (a pipeline directory) while it
    samples ``prompts``; with ``student``, also each student layer against its mapped teacher layer."""
    from ..families import denoiser_of, get_family
    from .features import layer_similarity
    from .figures import similarity_figure

    loaded = _pipeline(model, "model", device)
    fam = get_family(loaded.family)
    lmap = self_map(fam, denoiser_of(loaded.pipe))
    s_model, s_lmap = _student(student, fam, device) if student else (None, None)
    res = layer_similarity(loaded, prompts, lmap, s_model, s_lmap, steps=steps, cfg=cfg, seed=seed, progress=progress)
    numbers = {
        "family": fam.name,
        "model": model,
        "student": student,
        "prompts": prompts,
        "steps": steps,
        "cfg": cfg,
        **res,
    }
    return _write(out_dir, "similarity", numbers, lambda p: similarity_figure(numbers, p))


def analyze_sa_pca(
    model: str,
    out_dir: str,
    prompt: str,
    student: str | None = None,
    timestep: float = 500,
    steps: int = 10,
    cfg: float = 3.5,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """PCA (top 3 components as RGB) of each stage's self-attention output at the sampling step nearest
    ``timestep``, next to the generated image; a student (dropped into the same pipeline) on a second row."""
    from ..families import denoiser_of, get_family
    from ..inference import load_pipeline
    from .features import sa_pca
    from .figures import pca_figure

    loaded = _pipeline(model, "model", device)
    fam = get_family(loaded.family)
    rows = {
        "teacher" if student else "model": sa_pca(
            loaded, prompt, self_map(fam, denoiser_of(loaded.pipe)), timestep, steps, cfg, seed
        )
    }
    if student:
        _, s_lmap = _student(student, fam, device)
        s_loaded = load_pipeline(unet=student, base=model, device=device, dtype="fp32")
        rows["student"] = sa_pca(s_loaded, prompt, s_lmap, timestep, steps, cfg, seed)
    numbers = {
        "family": fam.name,
        "model": model,
        "student": student,
        "prompt": prompt,
        "steps": steps,
        "timestep": next(iter(rows.values()))["timestep"],
        "rows": {
            k: {s: {kk: vv for kk, vv in v.items() if kk != "rgb"} for s, v in r["stages"].items()}
            for k, r in rows.items()
        },
    }
    return _write(out_dir, "sa_pca", numbers, lambda p: pca_figure(rows, prompt, p))
