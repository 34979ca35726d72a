"""`koala bench`: latency, peak memory, params and FLOPs per component (paper Tables 1/6, Fig. 7)."""

from __future__ import annotations

import argparse

EPILOG = """\
models: preset names of any family (sdxl: sdxl-base, bk-sdxl, koala-1b, koala-700m, ssd-1b, segmind-vega; sd:
sd-v1, bk-sdm-base, bk-sdm-small, bk-sdm-tiny; see `koala presets`) are built at real size with random weights
(no download: allocated on meta, then filled with N(0, 0.02)); the text encoders (SDXL: CLIP ViT-L + OpenCLIP
bigG; SD-1.x: CLIP ViT-L) and the VAE are the real architectures too. 'tiny-<preset>' gives test-size versions.
A path to a pipeline directory benchmarks its real weights.

components: on CUDA the default is text,unet,vae (per component and end to end); on CPU the default is unet
only, since a real-size run on a few cores takes minutes. Models are measured interleaved (A,B,A,B...)
and medians are reported.

examples:
  koala bench --models sdxl-base,koala-1b,koala-700m --resolution 1024 --steps 10 --device cuda --dtype fp16 \\
      --json bench.json --plot bench.png --markdown bench.md
  koala bench --models sdxl-base,koala-700m --components unet --resolution 512 --steps 1 --device cpu --dtype fp32
"""


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="time text encoders, U-Net and VAE of presets or pipelines; memory, params, FLOPs",
        description="Benchmark models of any supported family component by component (text encoders, U-Net per step "
        "and in total, VAE decode) and end to end, with warm-up, interleaved repeats and medians, peak memory "
        "(CUDA max allocated, or CPU peak RSS), parameters and FLOPs. Prints a markdown table like the paper's "
        "Tables 1/6 and can write JSON and a Fig. 7-style plot.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="sdxl-base,koala-1b,koala-700m",
                   help="comma-separated presets, tiny-<preset>, or pipeline directories; the first is the "
                   "reference for speed-up ratios (default: sdxl-base,koala-1b,koala-700m)")
    p.add_argument("--resolution", type=int, default=1024, help="square image size in pixels (default 1024)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per run (default 10, the paper's)")
    p.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    p.add_argument("--cfg", type=float, default=3.5,
                   help="guidance scale; > 1 doubles the U-Net batch as in the pipeline (default 3.5)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="weight/activation dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--components", default=None,
                   help="comma-separated subset of text,unet,vae (default: all on cuda, unet on cpu)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model before measuring (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; each round runs every model once (default 3)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="keep only one model in memory: rebuild it every round (for machines that cannot hold "
                   "all models at once; adds build time but not to the measurements)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full result (schema koala-bench/1)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the markdown table")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a latency/memory bar chart (PNG)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..bench import BenchSettings, markdown_table, plot, run_bench, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    comps = args.components or ("text,unet,vae" if device.startswith("cuda") else "unet")
    settings = BenchSettings(
        models=[m.strip() for m in args.models.split(",") if m.strip()], resolution=args.resolution,
        steps=args.steps, batch=args.batch, cfg=args.cfg, device=device, dtype=dtype,
        components=[c.strip() for c in comps.split(",") if c.strip()], warmup=args.warmup, repeats=args.repeats,
        keep_loaded=not args.one_at_a_time,
    )
    result = run_bench(settings)
    table = markdown_table(result)
    print()
    print(table)
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
        print(f"wrote {args.markdown}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return 0
