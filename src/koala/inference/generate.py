"""Generate images with a loaded pipeline; save them as PNG with the generation parameters as tEXt chunks.

Image ``i`` of a call (counting over all prompts) is drawn from its own CPU generator seeded ``seed + i``,
so an image is reproducible from the seed in its metadata alone, whatever the batch size or device.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from ..errors import KoalaError
from ..families import denoiser_of, family_of_pipeline
from ..families.sampling import SamplingDefaults
from ..utils.console import is_terminal

PNG_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg",
    "scheduler",
    "timestep_spacing",
    "model",
    "width",
    "height",
    "dtype",
    "lora",
    "timesteps",
    "quantization",
    "ip_adapter",
)


@dataclass
class GeneratedImage:
    image: "object"  # PIL.Image.Image, or None when withheld by the NSFW filter
    params: dict
    nsfw_score: float | None = None
    withheld: bool = False


@dataclass
class GenerationResult:
    items: list[GeneratedImage]
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> list:
        return [it.image for it in self.items if not it.withheld]

    @property
    def params(self) -> list[dict]:
        return [it.params for it in self.items if not it.withheld]

    @property
    def withheld(self) -> list[GeneratedImage]:
        return [it for it in self.items if it.withheld]


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except FileNotFoundError:
        raise KoalaError(f"prompts file {path}: file not found", option="prompts_file") from None
    if not prompts:
        raise KoalaError(f"prompts file {path}: no prompts (one per line)", option="prompts_file")
    return prompts


def generate(
    pipe,
    prompts: str | list[str],
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    batch_size: int = 1,
    images_per_prompt: int = 1,
    width: int | None = None,
    height: int | None = None,
    safety=None,
    progress: bool = True,
    log=print,
    control_image: str | None = None,
    control_scale: float = 1.0,
) -> GenerationResult:
    """Generate ``len(prompts) * images_per_prompt`` images, ``batch_size`` per pipeline call.

    ``pipe``: a :class:`~koala.inference.pipeline.LoadedPipeline` or a plain diffusers pipeline of a supported family
    (``StableDiffusionXLPipeline``, ``StableDiffusionPipeline``, ``PixArtSigmaPipeline``, ...); the family's own call
    arguments are added (PixArt: ``clean_caption=False``, ``use_resolution_binning=False``).
    ``safety``: an :class:`~koala.inference.safety.NSFWFilter` or None (then a note says no filter is active).
    ``control_image`` / ``control_scale``: the control image (resized to the output size) and the ControlNet's
    conditioning scale, for a ControlNet pipeline (``load_pipeline(..., controlnet=DIR)``).
    ``steps`` / ``cfg``: None: the loaded pipeline's sampling defaults (``LoadedPipeline.sampling``: the student's
    record, else the paper's 10 steps and guidance 3.5, App. A.3; a plain pipeline gets the paper's). Recorded
    explicit timesteps are used when ``steps`` is None. The PNG metadata holds what was used.
    """
    from .pipeline import LoadedPipeline

    info = pipe if isinstance(pipe, LoadedPipeline) else None
    sd = info.pipe if info else pipe
    sampling = info.sampling if info else SamplingDefaults()
    timesteps = sampling.timesteps if steps is None else None
    steps = sampling.steps if steps is None else steps
    cfg = sampling.guidance_scale if cfg is None else cfg
    prompts = _checked_prompts(prompts, steps, batch_size, images_per_prompt)
    fam = family_of_pipeline(sd)
    width, height = _image_size(sd, width, height)
    notes = list(info.notes) if info else []
    if safety is None:
        notes.append("no NSFW filter is active (give an NSFW classifier to withhold flagged images)")
    for n in notes:
        log(f"note: {n}")
    base = _shared_params(sd, info, negative_prompt, steps, cfg, width, height)
    if timesteps:
        base["timesteps"] = list(timesteps)
    control = _control_inputs(sd, base, control_image, control_scale)
    jobs = [(p, seed + i) for i, p in enumerate(p for p in prompts for _ in range(images_per_prompt))]
    sd.set_progress_bar_config(disable=not progress or not is_terminal(sys.stderr), leave=False)
    items: list[GeneratedImage] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        if progress:
            log(f"images {start + 1}-{start + len(chunk)} of {len(jobs)}")
        images = _pipeline_call(sd, fam, chunk, base, {**_adapter_kwargs(info, len(chunk)), **control})
        flags = safety.flags(images) if safety is not None else [(False, None)] * len(chunk)
        for (p, s), img, (bad, score) in zip(chunk, images, flags):
            params = {"prompt": p, "seed": s, **base}
            items.append(GeneratedImage(None if bad else img, params, score, bad))
    res = GenerationResult(items, notes)
    for it in res.withheld:
        log(f"withheld: seed {it.params['seed']} ({safety.label} score {it.nsfw_score:.3f} > {safety.threshold})")
    return res


def _checked_prompts(prompts: str | list[str], steps: int, batch_size: int, images_per_prompt: int) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise KoalaError("give at least one prompt (text), or a prompts file", option="prompts_file")
    if steps < 1 or batch_size < 1 or images_per_prompt < 1:
        raise KoalaError("steps, batch_size and images_per_prompt must be >= 1", option="steps")
    return prompts


def _image_size(sd, width: int | None, height: int | None) -> tuple[int, int]:
    """``(width, height)``: as given, else the pipeline's default size; each a multiple of the VAE's factor."""
    scale = sd.vae_scale_factor
    # SD-1.x and PixArt pipelines have no default_sample_size: the denoiser's sample size
    default = getattr(sd, "default_sample_size", None) or denoiser_of(sd).config.sample_size
    height = height or default * scale
    width = width or default * scale
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % scale:
            raise KoalaError(
                f"{name} {v} must be a positive multiple of {scale} (the VAE's downscaling factor)", option=name
            )
    return width, height


def _shared_params(sd, info, negative_prompt: str | None, steps: int, cfg: float, width: int, height: int) -> dict:
    """The generation parameters every image of the call shares (its PNG metadata besides prompt and seed)."""
    base = {
        "negative_prompt": negative_prompt or "",
        "steps": steps,
        "cfg": cfg,
        "scheduler": info.scheduler if info else type(sd.scheduler).__name__,
        "timestep_spacing": sd.scheduler.config.get("timestep_spacing", ""),
        "model": info.model if info else getattr(sd.config, "_name_or_path", "") or "",
        "width": width,
        "height": height,
        "dtype": info.dtype if info else str(denoiser_of(sd).dtype).replace("torch.", ""),
    }
    if info and info.lora:
        base["lora"] = info.lora
    if info and info.quantization:
        base["quantization"] = info.quantization
    if info and getattr(info, "vae", ""):
        base["vae"] = info.vae
    if info and getattr(info, "ip_adapter", None) is not None:
        base["ip_adapter"] = info.ip_adapter.desc
    if info and getattr(info, "controlnet", ""):
        base["controlnet"] = info.controlnet
    return base


def _adapter_kwargs(info, n: int) -> dict:
    """The call arguments of the loaded adapters for ``n`` images (an IP-Adapter's reference image)."""
    ipa = getattr(info, "ip_adapter", None) if info else None
    return ipa.call_kwargs(n) if ipa is not None else {}


def _control_inputs(sd, params: dict, control_image: str | None, control_scale: float) -> dict:
    """The ControlNet call arguments (``image``: the control image at the output size; the conditioning scale),
    recorded in ``params`` (PNG metadata); {} without a ControlNet. A control image needs a ControlNet and back."""
    has_controlnet = getattr(sd, "controlnet", None) is not None
    if has_controlnet != bool(control_image):
        raise KoalaError(
            "--control-image needs --controlnet" if control_image else "a ControlNet pipeline needs --control-image",
            option="control_image" if control_image else "controlnet",
        )
    if not has_controlnet:
        return {}
    from .controlnet import load_control_image

    params.update(control_image=os.path.abspath(control_image), control_scale=float(control_scale))
    image = load_control_image(control_image, params["width"], params["height"])
    return {"image": image, "controlnet_conditioning_scale": float(control_scale)}


def _pipeline_call(sd, fam, chunk: list[tuple[str, int]], params: dict, adapter_kwargs: dict | None = None) -> list:
    """One pipeline call for ``chunk`` ((prompt, seed) per image, each image from its own CPU generator) with the
    shared ``params``, the family's own call arguments and the adapters' (an IP-Adapter's reference image, a
    ControlNet's control image and scale); returns the images."""
    negative = params["negative_prompt"]
    extra = {"timesteps": params["timesteps"]} if params.get("timesteps") else {}
    return sd(
        prompt=[p for p, _ in chunk],
        negative_prompt=[negative] * len(chunk) if negative else fam.empty_negative_prompt,
        num_inference_steps=params["steps"],
        guidance_scale=params["cfg"],
        width=params["width"],
        height=params["height"],
        generator=[torch.Generator("cpu").manual_seed(s) for _, s in chunk],
        **fam.pipeline_call_kwargs,
        **extra,
        **(adapter_kwargs or {}),
    ).images


def png_info(params: dict):
    """PIL ``PngInfo`` with one tEXt chunk per parameter plus ``parameters`` (all of them as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    from .. import __version__

    info = PngInfo()
    for k in PNG_KEYS:
        if k in params:
            info.add_text(k, str(params[k]))
    info.add_text("parameters", json.dumps(params, sort_keys=True))
    info.add_text("software", f"koala {__version__}")
    return info


def make_grid(images, cols: int | None = None):
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(result: GenerationResult, out_dir: str, grid: bool = False, prefix: str = "") -> list[str]:
    """Write each kept image as ``{prefix}{index:04d}-s{seed}.png`` (index over the whole call); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, it in enumerate(result.items):
        if it.withheld:
            continue
        path = os.path.join(out_dir, f"{prefix}{i:04d}-s{it.params['seed']}.png")
        it.image.save(path, pnginfo=png_info(it.params))
        paths.append(path)
    if grid and result.images:
        path = os.path.join(out_dir, f"{prefix}grid.png")
        make_grid(result.images).save(path)
        paths.append(path)
    return paths


def read_png_params(path: str) -> dict:
    """The generation parameters stored in a PNG written by :func:`save_images`."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(im.text)
    if "parameters" not in text:
        raise KoalaError(f"{path}: no koala generation parameters in the PNG metadata")
    return json.loads(text["parameters"])
