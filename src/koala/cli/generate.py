"""`koala generate`: text-to-image with a pipeline of any supported family (a KOALA / BK student or a teacher)."""

from __future__ import annotations

import argparse

from .options import add_choice_argument, add_dtype_argument

EPILOG = """\
sampling defaults are the student's own when it records them (koala_layer_map.json meta.sampling, e.g. a
few-step LCM student: LCMScheduler, 4 steps, cfg 1.0); otherwise the paper's (App. A.3): Euler discrete
scheduler, 10 steps, guidance 3.5. Students of step-distilled teachers (KOALA-Lightning / -Turbo: teacher kind
lightning / turbo, recorded by koala compress / koala distill) get trailing timestep spacing by default.
--scheduler, --timestep-spacing, --steps and --cfg override them. fp16 on a GPU (fp32 on CPU).

memory modes (docs/inference.md): --vae DIR (fp16-fix VAE; otherwise an fp16 VAE decodes in fp32),
--vae-slicing, --vae-tiling, --offload model|sequential (CUDA only), --attention sdpa|classic,
--channels-last, --compile. KOALA-700M at 1024x1024 fits an 8 GB GPU with: --dtype fp16 --vae FP16_FIX_DIR
--vae-tiling (add --offload model if the text encoders do not fit alongside).

examples:
  koala generate "a photo of a koala" --model out/koala-700m --out images/
  koala generate "a koala" --model out/koala-700m --ip-adapter ipa.safetensors --ip-image ref.png   # image prompt
  koala generate --prompts-file prompts.txt --unet runs/koala-lightning-700m/checkpoints/step-0005000/unet \\
      --base sdxl-base --batch-size 4 --seed 42 --grid --out images/   # trailing spacing from the layer map
"""


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images with a KOALA / BK student or teacher pipeline (SDXL or SD-1.x)",
        description="Generate PNG images; each PNG carries its prompt, seed, steps, cfg, scheduler and model as "
        "tEXt metadata. Image i gets seed --seed + i, so any image can be regenerated alone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="*", help="one or more prompts (or use --prompts-file)")
    p.add_argument("--prompts-file", default=None, help="text file with one prompt per line ('#' lines skipped)")
    _add_model_args(p.add_argument_group("model"))
    _add_ip_adapter_args(p.add_argument_group("image prompt (IP-Adapter)"))
    _add_controlnet_args(p.add_argument_group("ControlNet"))
    _add_sampling_args(p.add_argument_group("sampling"))
    _add_memory_args(p.add_argument_group("memory and speed"))
    _add_safety_args(p.add_argument_group("safety"))
    o = p.add_argument_group("output")
    o.add_argument("--out", default="koala-images", help="output directory (default koala-images)")
    o.add_argument("--grid", action="store_true", help="also write grid.png with all kept images")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _add_model_args(g) -> None:
    g.add_argument("--model", default=None, help="pipeline directory, SDXL or SD-1.x (e.g. written by koala compress)")
    g.add_argument(
        "--unet",
        default=None,
        help="student U-Net (or DiT transformer) directory to drop into --base (e.g. koala distill's "
        "OUT/checkpoints/step-N/unet, or .../transformer for a PixArt student)",
    )
    g.add_argument("--base", default=None, help="teacher pipeline directory supplying text encoders, VAE, scheduler")
    g.add_argument(
        "--vae",
        default=None,
        help="VAE directory in place of the pipeline's: fp16-safe (e.g. sdxl-vae-fp16-fix) or tiny (an "
        "AutoencoderTiny from koala vae distill); the PNG parameters name it",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="apply a LoRA (.safetensors; repeatable; scale default 1.0). For a KOALA student, transfer an "
        "SDXL LoRA first: koala lora transfer",
    )
    g.add_argument(
        "--onnx",
        default=None,
        metavar="DIR",
        help="run an ONNX export (koala export --format onnx) on onnxruntime: CUDA provider with --device cuda "
        "(when onnxruntime has it), else CPU; instead of --model / --unet",
    )


def _add_ip_adapter_args(g) -> None:
    g.add_argument(
        "--ip-adapter",
        default=None,
        metavar="FILE",
        help="an IP-Adapter (.safetensors, diffusers' load_ip_adapter layout); for a KOALA student, transfer the "
        "teacher's first: koala adapter transfer --kind ip-adapter",
    )
    g.add_argument("--ip-image", default=None, metavar="IMG", help="the reference image (needed with --ip-adapter)")
    g.add_argument(
        "--ip-scale", type=float, default=None, metavar="S", help="IP-Adapter strength (default 1.0; 0: no effect)"
    )
    g.add_argument(
        "--image-encoder",
        default=None,
        metavar="DIR",
        help="the CLIP image encoder the IP-Adapter was trained with (CLIPVisionModelWithProjection; default: the "
        "pipeline's own, else an image_encoder/ folder beside the adapter file)",
    )


def _ip_adapter(args):
    """--ip-adapter FILE --ip-image IMG [--ip-scale S] [--image-encoder DIR] -> IPAdapterArgs (None without)."""
    from ..errors import KoalaError
    from ..inference.ip_adapter import IPAdapterArgs

    if not args.ip_adapter:
        for flag in ("ip_image", "ip_scale", "image_encoder"):
            if getattr(args, flag) is not None:
                raise KoalaError(f"--{flag.replace('_', '-')} needs --ip-adapter FILE", option=flag)
        return None
    if not args.ip_image:
        raise KoalaError("--ip-adapter needs --ip-image IMG (the reference image)", option="ip_image")
    scale = 1.0 if args.ip_scale is None else args.ip_scale
    return IPAdapterArgs(args.ip_adapter, args.ip_image, scale, args.image_encoder)


def _add_controlnet_args(g) -> None:
    g.add_argument(
        "--controlnet",
        default=None,
        metavar="DIR",
        help="sample with a ControlNet folder (diffusers; for a student, made by koala controlnet transfer); "
        "needs --control-image",
    )
    g.add_argument(
        "--control-image", default=None, metavar="IMAGE", help="the control image, resized to the output size"
    )
    g.add_argument(
        "--control-scale", type=float, default=1.0, help="the ControlNet's conditioning scale (default 1.0)"
    )


def _add_sampling_args(g) -> None:
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the student's recorded sampling; paper: 10)",
    )
    g.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the student's recorded sampling; paper: 3.5)",
    )
    g.add_argument("--negative-prompt", default=None, help="negative prompt (default: none, zeroed embedding)")
    add_choice_argument(
        g,
        "--scheduler",
        default=None,
        choices="koala.inference.pipeline.SCHEDULERS",
        help="sampler (default: the student's recorded sampling; paper: euler, EulerDiscreteScheduler)",
    )
    add_choice_argument(
        g,
        "--timestep-spacing",
        default=None,
        choices="koala.inference.pipeline.SPACINGS",
        help="timestep spacing (default: the student's recorded sampling; else trailing for a student of a "
        "turbo/lightning teacher, per its koala_layer_map.json; else the pipeline's)",
    )
    g.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed+i (default 0)")
    g.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (default 1)")
    g.add_argument("--images-per-prompt", type=int, default=1, help="images for each prompt (default 1)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    g.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")


def _add_memory_args(g) -> None:
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    add_dtype_argument(g, help="default: fp16 on cuda, fp32 on cpu")
    g.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    g.add_argument("--vae-tiling", action="store_true", help="decode in overlapping tiles (lowest VAE memory)")
    add_choice_argument(
        g,
        "--offload",
        default=None,
        choices="koala.inference.pipeline.OFFLOAD",
        help="CPU offload (CUDA + accelerate only): 'model' moves whole components to the GPU in turn; "
        "'sequential' moves sub-modules (least memory, much slower)",
    )
    add_choice_argument(
        g,
        "--attention",
        default="sdpa",
        choices="koala.inference.pipeline.ATTENTION_PROCESSORS",
        help="attention kernel: PyTorch scaled_dot_product_attention (default) or the classic one",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last memory format for the U-Net (not the VAE: slower there on GPU)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net / DiT, the VAE decoder and the text encoders (first image is slow)",
    )


def _add_safety_args(g) -> None:
    g.add_argument(
        "--nsfw-model", default=None, help="local image-classification model directory; flagged images are withheld"
    )
    g.add_argument("--nsfw-label", default="nsfw", help="class name of the classifier to filter on (default nsfw)")
    g.add_argument(
        "--nsfw-threshold", type=float, default=0.5, help="withhold when the label's probability exceeds this"
    )


_NOT_WITH_ONNX = ("model", "unet", "base", "vae", "lora", "dtype", "vae_slicing", "vae_tiling", "offload")
_NOT_WITH_ONNX += ("channels_last", "compile", "ip_adapter", "controlnet")


def _load_onnx(args):
    """--onnx DIR: the export on onnxruntime; torch-only options are refused by name."""
    from ..errors import KoalaError
    from ..inference.onnx import load_onnx_pipeline

    for name in _NOT_WITH_ONNX:
        if getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise KoalaError(f"{flag} does not apply with --onnx (the graphs are fixed at export)", option=name)
    return load_onnx_pipeline(
        args.onnx, device=args.device, scheduler=args.scheduler, timestep_spacing=args.timestep_spacing
    )


def run(args) -> int:
    from ..errors import KoalaError
    from ..inference import NSFWFilter, generate, load_pipeline, read_prompts, save_images
    from ..utils.files import check_output_folder

    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise KoalaError("no prompt: give one or more prompts as arguments or --prompts-file FILE")
    check_output_folder(args.out, "--out (the images)")
    ip_adapter = _ip_adapter(args)
    loaded = _load_onnx(args) if args.onnx else None  # --onnx: the export on onnxruntime
    loaded = loaded or load_pipeline(
        args.model,
        unet=args.unet,
        base=args.base,
        vae=args.vae,
        device=args.device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        timestep_spacing=args.timestep_spacing,
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
        offload=args.offload,
        attention=args.attention,
        channels_last=args.channels_last,
        compile=args.compile,
        lora=args.lora,
        ip_adapter=ip_adapter,
        controlnet=args.controlnet,
    )
    print(f"model: {loaded.model} on {loaded.device} ({loaded.dtype}); {', '.join(loaded.modes)}")
    safety = None
    if args.nsfw_model:
        safety = NSFWFilter(args.nsfw_model, args.nsfw_label, args.nsfw_threshold)
    result = generate(
        loaded,
        prompts,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        batch_size=args.batch_size,
        images_per_prompt=args.images_per_prompt,
        width=args.width,
        height=args.height,
        safety=safety,
        progress=not args.no_progress,
        control_image=args.control_image,
        control_scale=args.control_scale,
    )
    paths = save_images(result, args.out, grid=args.grid)
    if loaded.device.startswith("cuda"):
        import torch

        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (torch max allocated)")
    for path in paths:
        print(f"wrote {path}")
    if result.withheld:
        print(f"{len(result.withheld)} image(s) withheld by the NSFW filter")
    return 0
