"""`koala quantize`: a student's denoiser with int8 / int4 / fp8 Linear layers (torchao), loadable by generate,
bench and app."""

from __future__ import annotations

import argparse

from .options import add_choice_argument

EPILOG = """\
schemes (torchao; the denoiser's Linear layers: attention, feed-forward, embeddings; convolutions stay fp32):
  int8-weight    int8 weights, one scale per output row; activations in the compute dtype
  int8-dynamic   int8 weights and per-token int8 activations (int8 matmuls)
  int4-weight    int4 weights in groups of 32 (stored one value a byte with torchao 0.18 on CPU)
  fp8            float8 e4m3 weights and dynamic activations: CUDA GPUs of compute capability 8.9+ only
                 (L4, H100, ...); refused on CPU

The output is the same kind of folder as DIR (a pipeline folder, or a U-Net / DiT folder) with the quantized
denoiser in safetensors (config.json records the torchao config); the other components and the layer map are
copied. Drift and CPU latency: benchmarks/results/quantize.md.

examples:
  koala quantize out/koala-700m --scheme int8-dynamic --out out/koala-700m-int8
  koala generate "a photo of a koala" --model out/koala-700m-int8 --out images/
  koala quantize runs/kd/checkpoints/step-0005000/unet --scheme int8-weight --out unet-int8
  koala generate "a koala" --unet unet-int8 --base sdxl-base --out images/
"""


def register(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a student's U-Net / DiT (int8-weight, int8-dynamic, int4-weight, fp8) with torchao",
        description="Quantize the denoiser of a student (a pipeline folder or a U-Net / DiT folder) into OUT; "
        "koala generate, bench and app load the result like any student.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="student pipeline folder (model_index.json) or U-Net / DiT folder (config.json)")
    add_choice_argument(
        p, "--scheme", required=True, choices="koala.inference.quantize.SCHEMES", help="quantization scheme (below)"
    )
    p.add_argument("--out", required=True, help="output folder (same kind as DIR)")
    p.add_argument(
        "--device", default=None, help="where to quantize: cuda, cuda:N or cpu (default: cuda if available)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inference.quantize import quantize_dir

    r = quantize_dir(args.dir, args.scheme, args.out, device=args.device, overwrite=args.overwrite)
    mib = 2**20
    print(
        f"wrote {r.out}: {r.family} denoiser, {r.scheme}; {r.quantized_layers} Linear layers quantized "
        f"({r.linear_params / 1e6:.1f}M of {r.total_params / 1e6:.1f}M parameters); denoiser weights "
        f"{r.bytes_before / mib:.1f} MiB -> {r.bytes_after / mib:.1f} MiB"
    )
    return 0
