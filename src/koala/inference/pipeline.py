"""Load a pipeline of any supported family (SDXL, SD-1.x, PixArt) for inference, with the memory/speed modes applied.

``load_pipeline(model=DIR)`` loads a full pipeline directory (as written by ``koala compress``/``koala distill``);
``load_pipeline(unet=DIR, base=PIPE)`` drops a student denoiser (U-Net or DiT transformer) into a teacher pipeline.
The family (and so the diffusers pipeline class) is detected from the denoiser config. The scheduler, steps and
guidance are the student's sampling defaults (``meta.sampling`` in its layer map, :mod:`koala.families.sampling`),
else the paper's (App. A.3): Euler discrete scheduler, 10 steps, guidance 3.5; fp16 on GPU, fp16-fix VAE when given.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..errors import KoalaError
from ..families import Family, denoiser_of, family_of, model_dir, model_dir_kind
from ..families.sampling import SPACING, SPACINGS, SamplingDefaults, check_scheduler_class, defaults_from_meta
from ..utils.compile import compile_module
from ..utils.devices import check_dtype_on_device, parse_device, parse_dtype
from ..utils.files import read_json
from .quantize import check_loadable

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}
OFFLOAD = (None, "model", "sequential")
ATTENTION_PROCESSORS = ("sdpa", "classic")  # diffusers attention processors (classic: AttnProcessor)


@dataclass
class LoadedPipeline:
    """A ready pipeline plus what was applied, for the PNG metadata and the user."""

    pipe: "object"  # the family's diffusers pipeline (StableDiffusionXLPipeline, StableDiffusionPipeline, PixArt...)
    model: str
    device: str
    dtype: str
    scheduler: str
    timestep_spacing: str
    modes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    family: str = "sdxl"
    lora: str = ""  # the LoRA files applied, "name:scale, ..." (PNG metadata)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)  # what generate() uses by default
    quantization: str = ""  # the denoiser's koala quantize scheme ("" full precision; PNG metadata)
    vae: str = ""  # the VAE given in place of the pipeline's, "name (class)" (PNG metadata); "" for its own
    ip_adapter: "object" = None  # an AppliedIPAdapter (koala.inference.ip_adapter): what every call gets
    controlnet: str = ""  # the ControlNet folder's name (PNG metadata); "" without one


def _check_pipeline_dir(path: str, what: str) -> Family:
    if model_dir_kind(path) != "pipeline":
        raise KoalaError(
            f"{what} {path} is a model (U-Net / transformer) directory; give a pipeline directory (with "
            "model_index.json), or the model together with a base pipeline directory",
            option=what,
        )
    fam = family_of(path)
    fam.check_pipeline_dir(path, what)
    return fam


def _check_denoiser_fits(denoiser_dir: str, base: str, fam: Family) -> None:
    cfg = read_json(os.path.join(denoiser_dir, "config.json"))
    fam.check(cfg, f"{denoiser_dir}/config.json")
    enc_cfgs = [read_json(os.path.join(base, enc, "config.json")) for _, enc, _ in fam.text_encoders]
    widths = [c.get("hidden_size", c.get("d_model", 0)) for c in enc_cfgs]  # CLIP: hidden_size, T5: d_model
    key = "caption_channels" if "caption_channels" in cfg else "cross_attention_dim"
    if cfg.get(key) != sum(widths):
        raise KoalaError(
            f"{denoiser_dir}/config.json: {key} is {cfg.get(key)} but the base pipeline {base} has text "
            f"encoders of width {' + '.join(map(str, widths))} = {sum(widths)}; use the base pipeline the "
            "student was compressed/distilled from",
            option="base",
        )


def scheduler_label(class_name: str) -> str:
    """The short name of a diffusers scheduler class (``euler`` for ``EulerDiscreteScheduler``), else the class
    name: how PNG metadata and reports name the scheduler."""
    return next((k for k, v in SCHEDULERS.items() if v == class_name), class_name)


def _scheduler(pipe, sampling: SamplingDefaults, name: str | None, spacing: str | None, notes: list[str]):
    """Set the pipeline's scheduler: ``name`` (a ``SCHEDULERS`` key or a diffusers class name), else the sampling
    defaults' own, from the pipeline's scheduler config with the defaults' overrides and ``spacing`` applied.
    Returns ``(label, spacing in use, the sampling defaults as applied)``."""
    if name is not None and name not in SCHEDULERS and not _is_scheduler_class(name):
        raise KoalaError(
            f"scheduler {name!r}: choose one of {', '.join(SCHEDULERS)} (or a diffusers scheduler class name)",
            option="scheduler",
        )
    if spacing is not None and spacing not in SPACINGS:
        raise KoalaError(
            f"timestep spacing {spacing!r}: choose one of {', '.join(SPACINGS)}", option="timestep_spacing"
        )
    cls_name = SCHEDULERS.get(name, name) if name else sampling.scheduler
    chosen = replace(sampling, scheduler=cls_name)
    extra = {"timestep_spacing": spacing} if spacing else None
    pipe.scheduler, overrides = chosen.build_scheduler(pipe.scheduler.config, extra)
    timesteps = _usable_timesteps(pipe.scheduler, sampling.timesteps, spacing, notes)
    applied = replace(sampling, scheduler=cls_name, scheduler_config=overrides, timesteps=timesteps)
    return name or scheduler_label(cls_name), pipe.scheduler.config.get("timestep_spacing", "leading"), applied


def _is_scheduler_class(name: str) -> bool:
    try:
        check_scheduler_class(name)
    except KoalaError:
        return False
    return True


def _usable_timesteps(scheduler, timesteps: list[int] | None, spacing: str | None, notes: list[str]):
    """The recorded ``timesteps`` when ``scheduler`` can take them and no spacing was asked for, else None (a note
    says why they are not used)."""
    if timesteps is None:
        return None
    limit = scheduler.config.get("num_train_timesteps", 1000)
    if max(timesteps) >= limit:
        raise KoalaError(
            f"the student's recorded timesteps {timesteps} (koala_layer_map.json meta.sampling.timesteps) exceed "
            f"the scheduler's {limit} training timesteps; record timesteps below {limit}",
            option="scheduler",
        )
    if spacing:
        notes.append(f"timestep spacing {spacing} asked for: the recorded timesteps {timesteps} are not used")
        return None
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        notes.append(f"{type(scheduler).__name__} takes no explicit timesteps: the recorded {timesteps} are not used")
        return None
    return timesteps


def load_pipeline(
    model: str | None = None,
    *,
    unet: str | None = None,
    base: str | None = None,
    vae: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = None,
    timestep_spacing: str | None = None,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    offload: str | None = None,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: bool = False,
    lora: list[str] | None = None,
    ip_adapter=None,
    controlnet: str | None = None,
) -> LoadedPipeline:
    """Load a pipeline and apply the memory/speed modes; see ``docs/inference.md`` for what each mode saves.

    ``model``: a pipeline directory; or ``unet`` (a student U-Net / DiT transformer dir, or a pipeline dir) + ``base``
    (the teacher's pipeline dir).
    ``scheduler`` (a ``SCHEDULERS`` key or a diffusers scheduler class name) and ``timestep_spacing``: None: the
    student's sampling defaults (``LoadedPipeline.sampling``; the paper's Euler when it records none).
    ``vae``: an fp16-safe VAE directory (e.g. sdxl-vae-fp16-fix), or a tiny one (AutoencoderTiny, e.g. from
    ``koala vae distill``) of the pipeline's latent size; without it an fp16 VAE decodes in fp32.
    ``offload``: None, "model" (whole components move to the GPU in turn) or "sequential" (sub-module by
    sub-module; least memory, slowest). Both need CUDA and accelerate; on CPU they do not apply and a note says so.
    ``lora``: LoRA files, each ``FILE`` or ``FILE:SCALE`` (diffusers / PEFT or kohya format; for a KOALA student,
    transferred with ``koala lora transfer``).
    ``ip_adapter``: an :class:`~koala.inference.ip_adapter.IPAdapterArgs` (for a KOALA student, an IP-Adapter
    transferred with ``koala adapter transfer``).
    ``controlnet``: a ControlNet folder (for a student, from ``koala controlnet transfer``): the pipeline is then the
    family's diffusers ControlNet pipeline (generate with ``control_image``).
    """
    _check_modes(offload, attention)
    device = str(parse_device(device))
    on_cuda = torch.device(device).type == "cuda"
    dt = parse_dtype(dtype) or (torch.float16 if on_cuda else torch.float32)
    check_dtype_on_device(dt, device)
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]
    notes: list[str] = []
    modes: list[str] = []
    if dt == torch.float16 and not on_cuda:
        notes.append("fp16 on CPU is slow and some ops are missing; bf16 or fp32 is the better choice on CPU")
    src = _source(model, unet, base, dt)
    fam = src.family
    quant = check_loadable(model or unet, device)  # a koala quantize scheme (None: full precision)
    if quant:
        modes.append(f"{quant} {fam.model_subfolder} (torchao)")
    pipe = _from_pretrained(src, vae, dt, controlnet)
    denoiser = denoiser_of(pipe)
    modes += _vae_precision(pipe, fam, bool(vae), dt)
    vae_desc = f"{_base_name(vae)} ({type(pipe.vae).__name__})" if vae else ""
    _sampling_note(src, scheduler, timestep_spacing, notes)
    label, spacing, sampling = _scheduler(pipe, src.sampling, scheduler, timestep_spacing, notes)
    lora_desc = _apply_loras(pipe, lora, modes)
    modes.append(_set_attention(pipe, denoiser, attention))
    ipa = _apply_ip_adapter(pipe, fam, ip_adapter, modes)  # after the attention processors: it replaces them
    _memory_modes(pipe, denoiser, fam, (vae_slicing, vae_tiling, channels_last), modes, notes)
    _place(pipe, offload, device, modes, notes)
    if compile:
        _compile(pipe, denoiser, fam, modes, notes)
    loaded = (pipe, src.name, device, dtype_name, label, spacing, modes, notes, fam.name, lora_desc, sampling)
    cn_desc = _base_name(controlnet) if controlnet else ""
    return LoadedPipeline(*loaded, quantization=quant or "", vae=vae_desc, ip_adapter=ipa, controlnet=cn_desc)


def _memory_modes(pipe, denoiser, fam: Family, flags: tuple[bool, bool, bool], modes: list[str], notes: list[str]):
    """VAE slicing, VAE tiling and channels_last (``flags``, in that order), each named in ``modes`` when applied."""
    vae_slicing, vae_tiling, channels_last = flags
    if vae_slicing:
        pipe.vae.enable_slicing()
        modes.append("VAE slicing")
    if vae_tiling:
        pipe.vae.enable_tiling()
        modes.append("VAE tiling")
    if channels_last and fam.model_subfolder != "unet":
        notes.append("channels_last applies to convolutional U-Nets; a DiT works on token sequences: not applied")
    elif channels_last:  # the U-Net only: a channels_last VAE decoded 1.5x slower (H200, fp16, 1024^2; results/h200)
        denoiser.to(memory_format=torch.channels_last)
        modes.append("channels_last (U-Net)")


def _check_modes(offload: str | None, attention: str) -> None:
    if offload not in OFFLOAD:
        raise KoalaError(f"offload {offload!r}: choose model or sequential", option="offload")
    if attention not in ATTENTION_PROCESSORS:
        raise KoalaError(
            f"attention {attention!r}: choose one of {', '.join(ATTENTION_PROCESSORS)}", option="attention"
        )


class _Source(NamedTuple):
    """What :func:`load_pipeline` loads: the pipeline directory ``path`` of ``family`` with ``from_pretrained``
    keyword arguments ``kwargs`` (a student denoiser among them), its display ``name``, and the layer map ``meta``
    of its denoiser (koala_layer_map.json; empty without one) with the sampling defaults it gives."""

    family: Family
    path: str
    name: str
    meta: dict
    sampling: SamplingDefaults
    kwargs: dict


def _source(model: str | None, denoiser: str | None, base: str | None, dt: torch.dtype) -> _Source:
    """A pipeline directory (``model``), or a student ``denoiser`` directory (the ``unet`` argument) in a ``base``
    pipeline."""
    if model and (denoiser or base):
        raise KoalaError(
            "give either a pipeline directory (model) or a U-Net with a base pipeline (unet + base), not both",
            option="model",
        )
    if model:
        fam = _check_pipeline_dir(model, "model")
        return _Source(fam, model, _base_name(model), *_student_sampling(model), {"dtype": dt})
    if not (denoiser and base):
        raise KoalaError(
            "no model: give a pipeline directory (model), or a U-Net directory (unet) together with a base "
            "pipeline directory (base)",
            option="model",
        )
    fam = _check_pipeline_dir(base, "base")
    denoiser_dir = model_dir(denoiser)
    meta, sampling = _student_sampling(denoiser_dir)
    _check_denoiser_fits(denoiser_dir, base, fam)
    kwargs = {"dtype": dt, fam.model_subfolder: fam.load_model(denoiser_dir, dt)}
    name = f"{_base_name(denoiser)} ({fam.model_subfolder}) + {_base_name(base)}"
    return _Source(fam, base, name, meta, sampling, kwargs)


def _student_sampling(path: str) -> tuple[dict, SamplingDefaults]:
    """The layer map ``meta`` of the model at ``path`` (empty without a layer map) and its sampling defaults."""
    from ..arch.layer_map import LayerMap

    found = LayerMap.find(path)
    meta = LayerMap.load(found).meta if found else {}
    return meta, defaults_from_meta(meta, found or path)


def _base_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _from_pretrained(src: _Source, vae: str | None, dt: torch.dtype, controlnet: str | None = None):
    """The family's diffusers pipeline from ``src``, with the VAE of ``vae`` when given; with ``controlnet``, the
    family's ControlNet pipeline."""
    kw = dict(src.kwargs)
    if vae:
        kw["vae"] = load_vae(vae, dt, base_vae=os.path.join(src.path, "vae"))
    fam = src.family
    if controlnet:
        from .controlnet import controlnet_pipeline_class, load_checked_controlnet

        kw["controlnet"] = load_checked_controlnet(controlnet, src, dt)
        return controlnet_pipeline_class(fam).from_pretrained(src.path, **fam.pipeline_load_kwargs, **kw)
    return fam.pipeline_class_of(src.path).from_pretrained(src.path, **fam.pipeline_load_kwargs, **kw)


def _vae_precision(pipe, fam: Family, custom_vae: bool, dt: torch.dtype) -> list[str]:
    """A given VAE decodes in the pipeline's dtype; the family's own decodes an fp16 pipeline in fp32 when the
    family needs it (SDXL's VAE overflows in fp16)."""
    if custom_vae:
        pipe.vae.register_to_config(force_upcast=False)
        if type(pipe.vae).__name__ == "AutoencoderTiny":
            return ["tiny VAE (AutoencoderTiny)"]
        return ["fp16-fix VAE" if dt == torch.float16 else "custom VAE"]
    if dt == torch.float16 and fam.vae_upcast:
        pipe.vae.register_to_config(force_upcast=True)
        return ["VAE decode upcast to fp32"]
    return []


def _sampling_note(src: _Source, scheduler: str | None, timestep_spacing: str | None, notes: list[str]) -> None:
    """Say where the scheduler settings come from when the student decides them: its record, or (without one) the
    trailing spacing of a turbo / lightning student (as the paper samples them)."""
    kind = src.meta.get("teacher_kind")
    if "sampling" in src.meta:
        d = src.sampling
        ts = f", timesteps {d.timesteps}" if d.timesteps else ""
        notes.append(
            f"sampling defaults recorded with the student (koala_layer_map.json meta.sampling): {d.scheduler}, "
            f"{d.steps} steps, cfg {d.guidance_scale:g}{ts}; --scheduler, --timestep-spacing, --steps and --cfg "
            "override them"
        )
    elif timestep_spacing is None and SPACING.get(kind):
        notes.append(
            f"timestep spacing {SPACING[kind]}: the student's teacher is {kind} "
            "(koala_layer_map.json); --timestep-spacing overrides it"
        )


def _apply_loras(pipe, lora: list[str] | None, modes: list[str]) -> str:
    """Load the LoRA files (``FILE`` / ``FILE:SCALE``); returns their description for the PNG metadata."""
    if not lora:
        return ""
    from ..formats.lora import apply_loras, parse_lora_arg

    loras = [parse_lora_arg(x) for x in lora]
    apply_loras(pipe, loras)
    desc = ", ".join(f"{os.path.basename(p)}:{s:g}" for p, s in loras)
    modes.append(f"LoRA {desc}")
    return desc


def _apply_ip_adapter(pipe, fam: Family, args, modes: list[str]):
    """Load an IP-Adapter (None: nothing); its description goes to the modes."""
    if args is None:
        return None
    from .ip_adapter import apply_ip_adapter

    applied = apply_ip_adapter(pipe, fam, args)
    modes.append(f"IP-Adapter {applied.desc}")
    return applied


def _set_attention(pipe, denoiser, attention: str) -> str:
    if attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0 as proc
    else:
        from diffusers.models.attention_processor import AttnProcessor as proc
    denoiser.set_attn_processor(proc())
    if hasattr(pipe.vae, "set_attn_processor"):  # a tiny VAE (AutoencoderTiny) has no attention
        pipe.vae.set_attn_processor(proc())
    return f"attention {attention}"


def _place(pipe, offload: str | None, device: str, modes: list[str], notes: list[str]) -> None:
    """Move the pipeline to ``device``, or offload it to the CPU (CUDA only; on CPU a note says it does not apply)."""
    if offload and torch.device(device).type != "cuda":
        notes.append(
            f"offload {offload} does not apply on {device}: offloading moves weights between CPU and GPU "
            "memory, and on CPU everything already lives in CPU memory; running without offload"
        )
        offload = None
    if not offload:
        pipe.to(device)
        return
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise KoalaError(
            f"offload {offload} needs the accelerate package (pip install accelerate)", option="offload"
        ) from None
    gpu_id = torch.device(device).index or 0
    if offload == "model":
        pipe.enable_model_cpu_offload(gpu_id=gpu_id)
    else:
        pipe.enable_sequential_cpu_offload(gpu_id=gpu_id)
    modes.append(f"{offload} CPU offload")


def _compile(pipe, denoiser, fam: Family, modes: list[str], notes: list[str]) -> None:
    """torch.compile in place: the denoiser, the VAE decoder and the text encoders (H200, KOALA-700M 1024^2: VAE
    85.8 -> 35.3 ms, text 16.4 -> 10.7 ms, U-Net step 26.1 -> 14.3 ms; benchmarks/results/h200/README.md)."""
    encoders = [getattr(pipe, enc, None) for _, enc, _ in fam.text_encoders]
    for module in [denoiser, pipe.vae.decoder, *filter(None, encoders)]:
        compile_module(module)
    modes.append(f"torch.compile({fam.model_subfolder}, VAE decoder, text encoders)")
    notes.append("torch.compile: the first image is slow (compilation); later ones are faster")


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def load_vae(path: str, dtype: torch.dtype, base_vae: str | None = None):
    """The VAE of ``path`` (:func:`vae_dir_of`): an AutoencoderKL or a tiny AutoencoderTiny. ``base_vae``: the VAE
    directory it stands in for; a VAE of another latent size (latent channels, or downsampling factor) is refused."""
    import diffusers

    path = vae_dir_of(path)
    cfg = read_json(os.path.join(path, "config.json"))
    if base_vae and os.path.isfile(os.path.join(base_vae, "config.json")):
        base = read_json(os.path.join(base_vae, "config.json"))
        for what, key in (
            ("latent channels", "latent_channels"),
            ("stages (block_out_channels)", "block_out_channels"),
        ):
            mine, theirs = cfg.get(key), base.get(key)
            if key == "block_out_channels":  # the downsampling factor 2^(stages - 1); widths may differ
                mine, theirs = len(mine or ()), len(theirs or ())
            if mine != theirs:
                raise KoalaError(
                    f"VAE {path}: a VAE of another latent size ({what} {mine}, the pipeline's VAE has {theirs}); "
                    "give a VAE made for this pipeline's latents",
                    option="vae",
                )
    return getattr(diffusers, cfg["_class_name"]).from_pretrained(path, dtype=dtype)


def vae_dir_of(path: str) -> str:
    """A VAE directory (AutoencoderKL or AutoencoderTiny), or a pipeline directory's vae/ (the ``vae`` argument)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        path = os.path.join(path, "vae")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise KoalaError(
            f"VAE {path}: no config.json; give an AutoencoderKL directory (e.g. sdxl-vae-fp16-fix) or an "
            "AutoencoderTiny one (koala vae distill)",
            option="vae",
        )
    cls = read_json(cfg).get("_class_name")
    if cls not in VAE_CLASSES:
        raise KoalaError(f"VAE {cfg}: _class_name is {cls!r}, expected one of {', '.join(VAE_CLASSES)}", option="vae")
    return path
