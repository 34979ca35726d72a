"""`koala controlnet transfer`: a teacher's ControlNet moved onto a KOALA / BK-SDM student through its layer map."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "controlnet",
        help="use the teacher's ControlNets with students",
        description="ControlNet tools. `koala generate --controlnet DIR --control-image IMAGE` samples with one.",
    )
    cn = p.add_subparsers(dest="controlnet_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    t = cn.add_parser(
        "transfer",
        help="map a teacher ControlNet onto a student (koala_layer_map.json)",
        description="Read the teacher's diffusers ControlNet folder (SDXL or SD-1.x), check that it is a "
        "ControlNet of the student's teacher (family, sizes, every tensor's shape), and write the student's "
        "ControlNet: its encoder keeps the blocks and transformer layers the student keeps, copied from the teacher "
        "ControlNet at the mapped locations; each student residual gets the zero convolution of the teacher residual "
        "it maps to; the mid block is copied when the student has one, else the mid residual is a new zero "
        "convolution. The output folder loads with diffusers (ControlNetModel, or for a student without a mid block "
        "KoalaControlNetModel through AutoModel.from_pretrained(DIR, trust_remote_code=True)) and runs in the "
        "family's ControlNet pipeline with the student. It carries a model card and koala_controlnet.json (what it "
        "was made from); its weights keep the teacher ControlNet's dtype. PixArt is refused: diffusers has no "
        "PixArt ControlNet.",
    )
    t.add_argument("controlnet", metavar="TEACHER_CONTROLNET", help="the teacher's ControlNet folder (diffusers)")
    t.add_argument("--student", required=True, help="student pipeline or U-Net directory (with koala_layer_map.json)")
    t.add_argument("--out", required=True, help="output folder (written atomically)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    t.set_defaults(func=run_transfer)


def run_transfer(args) -> int:
    from ..errors import KoalaError
    from ..formats.controlnet import transfer_controlnet

    try:
        result = transfer_controlnet(args.controlnet, args.student, args.out, overwrite=args.overwrite)
    except KoalaError as err:
        if getattr(err, "option", None) == "controlnet":  # here the positional TEACHER_CONTROLNET, not a --flag
            err.option = None
        raise
    print(result.summary())
    return 0
