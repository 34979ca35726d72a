"""Control adherence in the shapes world: does a generated image follow its layout?

For a scene with known objects (:class:`koala.lab.shapes.Scene`), the layout's mask of each object is compared
with the pixels of the generated image that the lab scorer's colour classifier
(:func:`koala.lab.score.color_labels`, nearest palette colour) gives that object's colour:

* ``iou``: per object, |layout mask AND pixels of its colour| / |layout mask OR pixels of its colour|, averaged
  over the objects of all scenes (colour-aware: a shape drawn in the right place but the wrong colour scores 0);
* ``fg_iou``: the same for the union of all objects against all non-background pixels (colour-blind);
* ``binding`` (and ``color``, ``shape``, ``spatial``, ``all``): :func:`koala.lab.score.score_image` against the
  scene's caption.

A rendered scene scores ``iou`` 1 exactly; a blank image 0. :func:`score_control` generates one image per val
scene with a pipeline, with the layout as control image when a ControlNet is given, and scores them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .layout import draw_layout, object_masks
from .score import aggregate, color_labels, score_image
from .shapes import Scene


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def layout_iou(image: np.ndarray, scene: Scene) -> dict:
    """``{"iou": mean over objects, "fg_iou", "per_object": [...]}`` of one ``uint8 [H, W, 3]`` image."""
    size = image.shape[0]
    lab, names = color_labels(image)
    masks = object_masks(scene.objects, size)
    covered = np.zeros((size, size), bool)
    per = []
    for o, m in zip(scene.objects, masks):
        per.append(_iou(m, lab == names.index(o.color)) if o.color in names else 0.0)
        covered |= m
    return {"iou": float(np.mean(per)) if per else 1.0, "fg_iou": _iou(covered, lab != 0), "per_object": per}


def score_control_images(images: Sequence[np.ndarray], scenes: Sequence[Scene]) -> dict:
    """IoU (object-weighted), foreground IoU and the lab scorer's categories over (image, scene) pairs."""
    per_obj, fg, facts = [], [], []
    for im, sc in zip(images, scenes):
        r = layout_iou(np.asarray(im), sc)
        per_obj += r["per_object"]
        fg.append(r["fg_iou"])
        facts.append(score_image(np.asarray(im), sc.text))
    agg = aggregate(facts)
    return {
        "iou": float(np.mean(per_obj)) if per_obj else None,
        "fg_iou": float(np.mean(fg)) if fg else None,
        **{k: agg[k] for k in ("color", "shape", "binding", "spatial", "all")},
        "n_images": len(scenes),
        "n_objects": len(per_obj),
    }


def control_pipeline(pipe, controlnet):
    """``pipe`` itself (no ControlNet) or the family's ControlNet pipeline on ``pipe``'s components."""
    if controlnet is None:
        return pipe
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    names = ["vae", "text_encoder", "tokenizer", "unet", "scheduler"]
    if hasattr(pipe, "text_encoder_2"):
        cls, extra = StableDiffusionXLControlNetPipeline, {}
        names += ["text_encoder_2", "tokenizer_2"]
    else:
        cls = StableDiffusionControlNetPipeline
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    comps = {n: getattr(pipe, n) for n in names} | extra
    out = cls(**comps, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    return out


def generate_with_layouts(
    pipe,
    controlnet,
    scenes: Sequence[Scene],
    sampling: dict,
    seed: int = 0,
    batch: int = 16,
    control_scale: float = 1.0,
    progress: bool = True,
) -> list[np.ndarray]:
    """One ``uint8`` image per scene: the scene's caption as prompt and (with ``controlnet``) its layout as control;
    batch ``i`` seeded ``seed + i`` (the same noise with and without ControlNet)."""
    import torch
    from PIL import Image

    from ..utils.console import progress_bar

    run = control_pipeline(pipe, controlnet)
    run.set_progress_bar_config(disable=True)
    size = int(sampling.get("height", 32))
    images = []
    for i in progress_bar(range(0, len(scenes), batch), desc="generating", disable=not progress):
        chunk = scenes[i : i + batch]
        kw = dict(sampling)
        if controlnet is not None:
            kw["image"] = [Image.fromarray(draw_layout(s.objects, size)) for s in chunk]
            kw["controlnet_conditioning_scale"] = control_scale
        with torch.no_grad():
            out = run(
                [s.text for s in chunk], generator=torch.Generator().manual_seed(seed + i), output_type="np", **kw
            ).images
        images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
    return images


def score_control(
    pipe,
    controlnet=None,
    num: int = 64,
    seed: int = 0,
    sampling: dict | None = None,
    control_scale: float = 1.0,
    progress: bool = True,
) -> dict:
    """Generate for val scenes ``0..num-1`` (scene seed ``seed``) with ``pipe`` (+ ``controlnet`` fed the layouts)
    and score control adherence (module doc). ``sampling``: the teacher's (20 steps, guidance 5, 32 x 32)."""
    from .models import IMAGE_SIZE, default_sampling
    from .shapes import generate_scenes

    scenes = generate_scenes(num, "val", seed, IMAGE_SIZE)
    images = generate_with_layouts(
        pipe, controlnet, scenes, sampling or default_sampling(), seed, control_scale=control_scale, progress=progress
    )
    return score_control_images(images, scenes)
