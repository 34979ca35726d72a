"""`koala adapter transfer`: a teacher's IP-Adapter (or T2I-Adapter) made to fit a KOALA student."""

from __future__ import annotations

import argparse

KINDS = ("ip-adapter", "t2i-adapter")

EPILOG = """\
ip-adapter: FILE is the teacher's IP-Adapter (.safetensors: image_proj.* and ip_adapter.N.to_k_ip / to_v_ip, the
layout diffusers' load_ip_adapter reads). Each student cross-attention layer gets the to_k_ip / to_v_ip of the
teacher layer it was initialised from (koala_layer_map.json), renumbered for the student's attention processors;
layers of removed blocks are dropped and counted per stage; the image projection is copied. --out is a file.
t2i-adapter: FILE is the teacher's T2IAdapter directory (config.json + weights). Its features are added at each
encoder stage's output, not per layer: a student that keeps every stage at the teacher's widths takes it unchanged
(a student without a mid block ignores the mid feature). It is checked and copied; --out is a directory.

examples:
  koala adapter transfer --kind ip-adapter ip-adapter_sdxl.safetensors --student out/koala-700m --out ipa.safetensors
  koala generate "a koala" --model out/koala-700m --ip-adapter ipa.safetensors --ip-image ref.png \\
      --image-encoder sdxl_models/image_encoder
"""


def register(sub) -> None:
    p = sub.add_parser(
        "adapter",
        help="use SDXL IP-Adapters / T2I-Adapters with KOALA students",
        description="Adapter tools. `koala generate --ip-adapter FILE --ip-image IMG` applies an IP-Adapter.",
    )
    ad = p.add_subparsers(dest="adapter_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    t = ad.add_parser(
        "transfer",
        help="map a teacher's IP-Adapter (or check a T2I-Adapter) onto a KOALA student (koala_layer_map.json)",
        description="Read the teacher's adapter, check it fits the student's teacher, and write it for the student. "
        "The output loads with diffusers (load_ip_adapter; T2IAdapter.from_pretrained) and koala generate "
        "--ip-adapter.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("adapter", metavar="FILE", help="the teacher's adapter (IP-Adapter .safetensors, T2I-Adapter dir)")
    t.add_argument("--kind", required=True, choices=KINDS, help="what FILE is")
    t.add_argument("--student", required=True, help="student pipeline or U-Net directory (with koala_layer_map.json)")
    t.add_argument("--out", required=True, help="output: a .safetensors file (ip-adapter) or a directory (t2i)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t.set_defaults(func=run_transfer)


def run_transfer(args) -> int:
    from ..formats.ip_adapter import transfer_ip_adapter

    if args.kind == "ip-adapter":
        report = transfer_ip_adapter(args.adapter, args.student, args.out, overwrite=args.overwrite)
    else:
        from ..formats.t2i_adapter import transfer_t2i_adapter

        report = transfer_t2i_adapter(args.adapter, args.student, args.out, overwrite=args.overwrite)
    print(report.summary())
    return 0
