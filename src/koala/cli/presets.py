"""`koala presets`: the preset table of every family (params and FLOPs computed on the meta device)."""

from __future__ import annotations

from .options import STDOUT, add_json_argument, emit_json


def register(sub) -> None:
    p = sub.add_parser(
        "presets",
        help="list the denoiser presets (U-Net / DiT) with parameter and FLOP counts",
        description="List the denoiser presets of every family (sdxl: SDXL-Base, BK-SDXL, KOALA-1B, "
        "KOALA-700M, SSD-1B, Segmind-Vega; sd: SD-v1, BK-SDM-Base/Small/Tiny; pixart: PixArt-Σ DiT-XL, "
        "DiT-M) with exact parameter counts and TFLOPs of one denoiser forward at batch 1, computed on "
        "the meta device (no weights, no memory). Students are derived from each family's reference "
        "teacher (SDXL-Base-1.0, SD-v1.5, PixArt-Sigma-XL-2-512-MS).",
    )
    add_json_argument(p, "the preset list")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting (faster)")
    p.set_defaults(func=run)


def _fmt(v) -> str:
    if isinstance(v, list):
        return ("|" if any(isinstance(x, list) for x in v) else ",").join(_fmt(x) for x in v)
    return str(v)


def _row(r: dict) -> list[str]:
    """One preset's cells: a U-Net fills the depth columns, a DiT its block count."""
    if "encoder_layers" in r:
        depth = (
            _fmt(r["encoder_layers"]),
            _fmt(r["transformer_depth"]),
            _fmt(r["decoder_transformer_depth"]),
            "yes" if r["mid_block"] else "no",
            "-",
        )
    else:
        depth = ("-", "-", "-", "-", str(r["layers"]))
    return [
        r["name"],
        r["family"],
        f"{r['params'] / 1e6:,.1f}M",
        f"{r['paper_params'] / 1e6:,.0f}M" if r["paper_params"] else "-",
        str(r.get("tflops_1024", "-")),
        str(r.get("tflops_512", "-")),
        *depth,
    ]


def run(args) -> int:
    from ..families import all_preset_stats

    rows = all_preset_stats(flops=not args.no_flops)
    emit_json(args.json, rows)
    if args.json == STDOUT:
        return 0
    from ..utils.console import Column, print_table

    struct = 2  # the depth columns go first in a narrow terminal, then the paper's count and the 512² FLOPs
    cols = [
        Column("preset"),
        Column("family"),
        Column("params", "right"),
        Column("paper", "right", drop=1),
        Column("TFLOPs 1024²", "right"),
        Column("TFLOPs 512²", "right", drop=1),
        *(Column(c, "right", drop=struct) for c in ("enc", "Tx DW", "Tx UP", "mid", "DiT blocks")),
    ]
    table = [_row(r) for r in rows]
    print_table(cols, table, title="Denoiser presets (teachers: SDXL-Base-1.0, SD-v1.5, PixArt-Σ-XL-2-512)")
    return 0
