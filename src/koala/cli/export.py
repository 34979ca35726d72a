"""`koala export`: a student (or teacher) as one single-file checkpoint for ComfyUI / A1111, a single file back
to a diffusers directory, or the pipeline as ONNX graphs for onnxruntime."""

from __future__ import annotations

import argparse

from .options import add_choice_argument, add_dtype_argument

EPILOG = """\
examples:
  koala export out/koala-700m --format single-file --out koala-700m.safetensors --dtype fp16
  koala export runs/k/checkpoints/step-0005000/unet --base sdxl-base --out koala.safetensors   # student U-Net + base
  koala export out/koala-700m --unet-only --out koala-700m-unet.safetensors   # ComfyUI 'Load Diffusion Model'
  koala export sdxl_finetune.safetensors --format diffusers --out sdxl-finetune/   # single file -> pipeline dir
  koala export out/koala-700m --format diffusers --dtype fp16 --out koala-700m-fp16/   # a directory in another dtype
  koala export out/koala-700m --format onnx --out koala-700m-onnx/   # ONNX graphs, then:
  koala generate "a photo of a koala" --onnx koala-700m-onnx/ --out images/   # runs on onnxruntime

A single file loads back in diffusers with the student's directory as its config:
  StableDiffusionXLPipeline.from_single_file("koala-700m.safetensors", config="out/koala-700m")
ComfyUI's checkpoint loader recognises KOALA-700M / KOALA-1B from their transformer depths.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as one single-file checkpoint (ComfyUI / A1111) or as ONNX, or convert one to diffusers",
        description="--format single-file: a diffusers pipeline directory (a KOALA student, or any SDXL / SD-1.x "
        "pipeline) -> one .safetensors in the original LDM/SGM key layout (model.diffusion_model.*, "
        "first_stage_model.*, "
        "conditioner.embedders.0/1.*), with the U-Net's key map derived from its own blocks (any transformer depth, "
        "with or without mid block). --format diffusers: a single-file SDXL / SD-1.x checkpoint -> a diffusers "
        "directory (offline; configs from --config or koala's SDXL-Base configs); given a directory it rewrites it in "
        "diffusers' format (e.g. in another --dtype), layer map and model card kept. --format onnx: an SDXL / SD-1.x "
        "pipeline directory -> ONNX graphs of the U-Net "
        "(inputs sample, timestep, encoder_hidden_states[, text_embeds, time_ids] -> out_sample, as Optimum names "
        "them), the VAE decoder and the text encoders, with dynamic batch and size, in Optimum's folder layout plus "
        "tokenizers, scheduler and koala_onnx.json; each graph is checked on onnxruntime against torch (1e-3 "
        "relative) before anything is written. Output is written atomically.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="pipeline or U-Net directory, or (with --format diffusers) a single-file .safetensors",
    )
    add_choice_argument(
        p,
        "--format",
        default="single-file",
        choices="koala.formats.single_file.FORMATS",
        help="what to write (default single-file)",
    )
    p.add_argument(
        "--out", required=True, help="output .safetensors file (single-file) or directory (diffusers, onnx)"
    )
    p.add_argument(
        "--base", default=None, help="single-file from a U-Net directory: the pipeline supplying VAE and text encoders"
    )
    p.add_argument("--unet-only", action="store_true", help="write / convert the U-Net alone")
    add_dtype_argument(p, help="weight dtype (default: each component as it is stored)")
    p.add_argument(
        "--config",
        default=None,
        metavar="DIR",
        help="diffusers: a pipeline directory of the file's architecture whose configs and tokenizers are used "
        "(not its weights); default: koala's SDXL-Base-1.0 configs, tokenizers from the local HF cache",
    )
    add_choice_argument(
        p,
        "--exporter",
        default="dynamo",
        choices="koala.formats.onnx.EXPORTERS",
        help="onnx: torch.onnx.export(dynamo=True) (default; needs onnxscript) or the older TorchScript exporter "
        "(torchscript; faster to export)",
    )
    p.add_argument("--opset", type=int, default=18, help="onnx: ONNX opset version (default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="onnx: no progress bar")
    p.set_defaults(func=run)


def _run_onnx(args) -> int:
    from ..errors import KoalaError
    from ..formats.onnx import export_onnx

    for flag, value in (("base", args.base), ("unet_only", args.unet_only), ("dtype", args.dtype)):
        if value:
            raise KoalaError(
                f"--{flag.replace('_', '-')} does not apply to --format onnx (it exports a whole pipeline directory "
                "in fp32)",
                option=flag,
            )
    res = export_onnx(
        args.src,
        args.out,
        exporter=args.exporter,
        opset=args.opset,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"wrote {res.out} ({res.family}, {res.exporter} exporter): {', '.join(res.graphs)}")
    return 0


def run(args) -> int:
    import os

    from ..errors import KoalaError
    from ..formats.single_file import export_diffusers, export_single_file, single_file_to_diffusers

    if args.format == "onnx":
        return _run_onnx(args)
    if args.format == "single-file":
        if os.path.isfile(args.src):
            raise KoalaError(
                f"{args.src} is a file; single-file export reads a diffusers directory (to convert a single "
                "file to diffusers use --format diffusers)",
                option="format",
            )
        res = export_single_file(
            args.src, args.out, base=args.base, dtype=args.dtype, unet_only=args.unet_only, overwrite=args.overwrite
        )
        parts = ", ".join(f"{k} {v} tensors" for k, v in res.components.items())
        print(f"wrote {res.out} ({res.family}, {res.dtype}, {res.bytes / 2**20:.1f} MiB): {parts}")
        return 0
    if os.path.isdir(args.src):
        out = export_diffusers(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {out} (diffusers directory{', ' + args.dtype if args.dtype else ''})")
        return 0
    if not os.path.isfile(args.src):
        raise KoalaError(f"{args.src}: no such file or directory")
    res = single_file_to_diffusers(
        args.src, args.out, config=args.config, dtype=args.dtype, overwrite=args.overwrite, unet_only=args.unet_only
    )
    cfg = res.unet_config
    print(
        f"wrote {res.out}: {res.family} {res.kind} ({', '.join(res.components)}); configs: {res.config_source}; U-Net "
        f"resnets per stage {cfg['layers_per_block']}, transformer depth {cfg['transformer_layers_per_block']}, "
        f"mid block {'yes' if cfg.get('mid_block_type') else 'no'}"
        + (
            f"; {len(res.ignored)} key(s) of the file used by no component (e.g. {res.ignored[0]})"
            if res.ignored
            else ""
        )
    )
    return 0
