"""`koala compress`: build a KOALA / BK student (U-Net or pipeline) from a teacher of any supported family."""

from __future__ import annotations

from .options import add_choice_argument, add_dtype_argument


def register(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a teacher U-Net or DiT into a KOALA student initialised from the teacher",
        description="Remove blocks and transformer layers from a teacher U-Net (KOALA, Sec. 3.1.1; BK-SDM) or "
        "transformer blocks from a PixArt DiT (DiT-XL -> DiT-M, App. A.4), and initialise every kept tensor from the "
        "teacher at the same location. The teacher's family (sdxl: SDXL-Base/Turbo/Lightning; sd: SD-1.x/2.x; "
        "pixart: PixArt-Σ/α) is detected from its config; `koala presets` lists each family's presets. Writes the "
        "student with koala_layer_map.json next to its config. A pipeline teacher gives a full pipeline directory "
        "that the family's diffusers pipeline (StableDiffusionXLPipeline / StableDiffusionPipeline / "
        "PixArtSigmaPipeline) loads as is.",
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="teacher model directory (U-Net / transformer) or pipeline directory "
        "(local), or a single-file SDXL / SD-1.x checkpoint (.safetensors, as A1111 / ComfyUI use)",
    )
    p.add_argument(
        "--teacher-config",
        default=None,
        metavar="DIR",
        help="single-file teacher: a pipeline directory of its architecture whose configs and tokenizers are "
        "used (not its weights); default for SDXL: koala's SDXL-Base-1.0 configs, tokenizers from the local "
        "Hugging Face cache",
    )
    p.add_argument(
        "--teacher-unet",
        default=None,
        help="use this denoiser (U-Net / transformer directory, or a .safetensors checkpoint such as "
        "SDXL-Lightning's U-Net) as the teacher instead of the pipeline's",
    )
    p.add_argument(
        "--student",
        required=True,
        help="preset name (sdxl: koala-700m, koala-1b, bk-sdxl, sdxl-base, ssd-1b, segmind-vega; sd: "
        "bk-sdm-base, bk-sdm-small, bk-sdm-tiny, sd-v1; pixart: dit-m, pixart-sigma-xl) or a JSON spec such as "
        '\'{"encoder_layers":[1,1,1],"down_depth":[0,2,4],"up_depth":[4,2,0],"mid_block":false}\' '
        '(optional "stages": N keeps only the N outermost stages) or, for a DiT, \'{"num_layers": 10}\'',
    )
    p.add_argument(
        "--family",
        default=None,
        metavar="NAME",
        help="the teacher's model family, sdxl, sd or pixart (default: detected from its config)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    add_dtype_argument(p, help="student weight dtype (default: fp32)")
    add_choice_argument(
        p,
        "--layer-selection",
        default="bottom",
        choices="koala.arch.layer_map.SELECTIONS",
        help="which teacher transformer layers initialise the student's (default: bottom, the paper's SA-bottom)",
    )
    add_choice_argument(
        p,
        "--teacher-kind",
        default="base",
        choices="koala.families.sampling.TEACHER_KINDS",
        help="what the teacher is: base (SDXL-Base, SD, PixArt), turbo (SDXL-Turbo) or lightning "
        "(SDXL-Lightning); recorded in the layer map, and a turbo/lightning student pipeline gets the Euler "
        "trailing-spacing scheduler it is sampled with (default: base)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compress import compress
    from ..utils.console import Column, print_table

    res = compress(
        args.teacher,
        args.student,
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        layer_selection=args.layer_selection,
        teacher_unet=args.teacher_unet,
        family=args.family,
        teacher_kind=args.teacher_kind,
        teacher_config=args.teacher_config,
    )
    rows = [
        ["denoiser params", f"{res.teacher_params:,}", f"{res.student_params:,}"],
        ["kept", "100%", f"{100 * res.kept:.1f}%"],
        ["tensors copied", "", f"{res.tensors_copied}"],
        ["output", "", res.kind],
    ]
    cols = [Column(c, "right", wrap=not c) for c in ("", "teacher", "student")]
    print_table(cols, rows, title=f"koala compress ({res.family}) -> {res.out_dir}")
    return 0
