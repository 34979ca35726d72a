"""`koala lora transfer`: an SDXL LoRA mapped onto a KOALA student through its layer map."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "lora",
        help="use SDXL LoRAs with KOALA students",
        description="LoRA tools. `koala generate --lora FILE[:SCALE]` applies a LoRA when generating.",
    )
    lo = p.add_subparsers(dest="lora_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    t = lo.add_parser(
        "transfer",
        help="map an SDXL LoRA onto a KOALA student (koala_layer_map.json)",
        description="Read an SDXL LoRA (diffusers/PEFT lora_A/lora_B, older diffusers lora.down/lora.up, or kohya "
        "lora_unet_*/lora_te1_*/lora_te2_*), check it fits the student's teacher, and write it for the student: every "
        "student module initialised from a teacher module gets that module's LoRA; LoRA modules of removed blocks "
        "and transformer layers are dropped and counted per stage; text-encoder entries carry over. alpha/rank is "
        "folded into B. The output loads with diffusers' load_lora_weights (and koala generate --lora).",
    )
    t.add_argument("lora", metavar="SDXL_LORA", help="the teacher's LoRA (.safetensors)")
    t.add_argument("--student", required=True, help="student pipeline or U-Net directory (with koala_layer_map.json)")
    t.add_argument("--out", required=True, help="output LoRA file (.safetensors)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    t.set_defaults(func=run_transfer)


def run_transfer(args) -> int:
    from ..formats.lora import transfer_lora

    report = transfer_lora(args.lora, args.student, args.out, overwrite=args.overwrite)
    print(report.summary())
    return 0
