"""`koala bench`: latency, peak memory, params and FLOPs per component (paper Tables 1/6, Fig. 7)."""

from __future__ import annotations

import argparse
import functools

from .options import STDOUT, add_dtype_argument, add_json_argument, emit_json, human_stream

EPILOG = """\
models: preset names of any family (sdxl: sdxl-base, bk-sdxl, koala-1b, koala-700m, ssd-1b, segmind-vega; sd:
sd-v1, bk-sdm-base, bk-sdm-small, bk-sdm-tiny; pixart: pixart-sigma-xl, dit-m; see `koala presets`) are built at
real size with random weights (no download: allocated on meta, then filled with N(0, 0.02)); the text encoders
(SDXL: CLIP ViT-L + OpenCLIP bigG; SD-1.x: CLIP ViT-L; PixArt: the T5-XXL encoder, 4.8B parameters, reported as its
own component: leave `text` out of --components to skip it) and the VAE are the real architectures too.
'tiny-<preset>' gives test-size versions. A path to a pipeline directory benchmarks its real weights.
The `unet` component is the denoiser, whatever its kind (U-Net, or a DiT transformer for PixArt).

components: on CUDA the default is text,unet,vae (per component and end to end); on CPU the default is unet
only, since a real-size run on a few cores takes minutes. Models are measured interleaved (A,B,A,B...)
and medians are reported.

examples:
  koala bench --models sdxl-base,koala-1b,koala-700m --resolution 1024 --steps 10 --device cuda --dtype fp16 \\
      --json bench.json --plot bench.png --markdown bench.md
  koala bench --models sdxl-base,koala-700m --components unet --resolution 512 --steps 1 --device cpu --dtype fp32
  koala bench --models pixart-sigma-xl,dit-m --resolution 512 --components unet,vae --device cuda
"""


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time text encoders, denoiser (U-Net / DiT) and VAE of presets or pipelines; memory, params, FLOPs",
        description="Benchmark models of any supported family component by component (text encoders, denoiser "
        "per step and in total, VAE decode) and end to end, with warm-up, interleaved repeats and medians, peak "
        "memory (CUDA max allocated, or CPU peak RSS), parameters and FLOPs. Prints a markdown table like the paper's "
        "Tables 1/6 and can write JSON and a Fig. 7-style plot.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        default="sdxl-base,koala-1b,koala-700m",
        help="comma-separated presets, tiny-<preset>, or pipeline directories; the first is the "
        "reference for speed-up ratios (default: sdxl-base,koala-1b,koala-700m)",
    )
    p.add_argument("--resolution", type=int, default=1024, help="square image size in pixels (default 1024)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps per run (default: each model's recorded sampling; paper: 10, also for presets)",
    )
    p.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="guidance scale; > 1 doubles the denoiser batch as in the pipeline (default: each model's recorded "
        "sampling; paper: 3.5)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    add_dtype_argument(p, help="weight/activation dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument(
        "--components",
        default=None,
        help="comma-separated subset of text,unet,vae; unet = the denoiser (default: all on cuda, unet on cpu)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model before measuring (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; each round runs every model once (default 3)")
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="keep only one model in memory: rebuild it every round (for machines that cannot hold "
        "all models at once; adds build time but not to the measurements)",
    )
    p.add_argument("--channels-last", action="store_true", help="U-Net in channels_last memory format")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net (the warm-up runs absorb compilation; give --warmup >= 1)",
    )
    p.add_argument("--compile-vae", action="store_true", help="torch.compile the VAE decoder too")
    p.add_argument("--compile-text", action="store_true", help="torch.compile the text encoders too")
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (reduce-overhead: CUDA graphs; max-autotune: slow to compile)",
    )
    p.add_argument(
        "--vae-tiling", action="store_true", help="decode the VAE in tiles (less memory at high resolution)"
    )
    _add_vae_argument(p)
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="CUDA only: cap this process's GPU memory, e.g. 8 to check that a model runs on an 8 GB card",
    )
    add_json_argument(p, "the full result (schema koala-bench/1)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the markdown table")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a latency/memory bar chart (PNG)")
    p.set_defaults(func=run)
    modes = p.add_subparsers(dest="bench_mode", metavar="[train]", required=False)
    register_train(modes)


def _add_vae_argument(p) -> None:
    p.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="time this VAE (e.g. a tiny AutoencoderTiny from koala vae distill) in place of each model's; needs "
        "the vae component",
    )


TRAIN_EPILOG = """\
teacher: a preset of any family (sdxl-base, sd-v1, ...; `koala presets`) is built at real size with random weights
and compressed in memory to student.preset (default koala-700m); batches are pre-encoded random latents and
conditioning, as a data.type=cache run feeds them. 'tiny-<preset>' gives test-size models. A pipeline directory
loads its real weights and trains on the recipe's data (encoding included in the data phase).

Phases (device-synchronised one by one): data_encode, teacher_forward, student_forward (+ losses), backward,
log_sync, optimizer (clip + AdamW + zero_grad), ema. MFU = (teacher fwd + 3 x student fwd FLOPs per sample) x
samples/s / peak; the peak is the GPU's dense bf16/fp16 data-sheet figure (H100/H200/A100/L40S/4090/...), or a
measured matrix product on CPU and unknown devices, or --peak-tflops.

The trainer's fast paths are config switches, measured here exactly as `koala distill` runs them:
  train.mixed_precision=bf16   student autocast with fp32 master weights    teacher.dtype=bf16|fp16 (no grad)
  train.fused_optimizer=true   fused AdamW                                   train.channels_last=true
  train.attention=flash|efficient|cudnn|math   force one SDPA backend       train.gradient_checkpointing=true
  train.compile=student|teacher|both   torch.compile (feature hooks are traced into the graph)
  train.optimizer=adamw8bit    8-bit AdamW (bitsandbytes)

examples:
  koala bench train --teacher sdxl-base --resolution 1024 --batch 8 --device cuda train.mixed_precision=bf16 \\
      teacher.dtype=bf16 --json train-700m.json
  koala bench train --teacher tiny-sdxl-base --resolution 64 --batch 2 --device cpu --steps 3
"""


def register_train(modes) -> None:
    t = modes.add_parser(
        "train",
        help="time the real KD training step phase by phase: samples/s, peak memory, MFU",
        description="Benchmark one real KOALA distillation step (the trainer's Distiller: teacher forward with "
        "feature hooks, student forward, losses, backward, AdamW, EMA) at any size, resolution, batch and "
        "precision, phase by phase.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--teacher",
        default="sdxl-base",
        help="teacher preset (random real-size weights), tiny-<preset>, or a pipeline directory "
        "(default sdxl-base); the student is student.preset (default koala-700m)",
    )
    t.add_argument(
        "--config",
        default=None,
        help="recipe name or YAML file for kd/loss/train settings "
        "(default: the schema's defaults, i.e. the paper's recipe)",
    )
    t.add_argument("--resolution", type=int, default=1024, help="image size in pixels (default 1024)")
    t.add_argument("--batch", type=int, default=1, help="samples per step on the device (default 1)")
    t.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; compile happens here)")
    t.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    t.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for MFU (default: data sheet for known GPUs, else measured)",
    )
    add_json_argument(t, "the full result (schema koala-bench-train/1)")
    t.add_argument("--markdown", default=None, metavar="FILE", help="write the one-row markdown table")
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides as for `koala distill`, e.g. train.mixed_precision=bf16 student.preset=koala-1b",
    )
    t.set_defaults(func=run_train)


def run_train(args) -> int:
    import torch

    from ..bench.train import TrainBenchSettings, run_train_bench, train_markdown
    from ..utils.files import atomic_write_text

    settings = TrainBenchSettings(
        teacher=args.teacher,
        config=args.config,
        overrides=list(args.overrides),
        resolution=args.resolution,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        peak_tflops=args.peak_tflops,
        threads=args.threads,
    )
    say = functools.partial(print, file=human_stream(args))  # progress and notes: stderr under a bare --json
    result = run_train_bench(settings, log=say)
    table = train_markdown([result])
    if args.json != STDOUT:  # a bare --json prints the result instead
        ph = result["times_ms"]["phases_median"]
        print()
        print("phases (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
        print(
            f"FLOPs/sample {result['flops']['per_sample'] / 1e12:.3f} T, achieved "
            f"{result['flops']['achieved_tflops']:.2f} "
            f"TFLOP/s of {result['flops']['peak_tflops']:.1f} ({result['flops']['peak_source']})"
        )
        print(table)
    if path := emit_json(args.json, result):
        say(f"wrote {path}")
    if args.markdown:
        atomic_write_text(args.markdown, table)
        say(f"wrote {args.markdown}")
    return 0


def run(args) -> int:
    import torch

    from ..bench import BenchSettings, bench_markdown, plot, run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    comps = args.components or ("text,unet,vae" if device.startswith("cuda") else "unet")
    settings = BenchSettings(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        resolution=args.resolution,
        steps=args.steps,
        batch=args.batch,
        cfg=args.cfg,
        device=device,
        dtype=dtype,
        components=[c.strip() for c in comps.split(",") if c.strip()],
        warmup=args.warmup,
        repeats=args.repeats,
        keep_loaded=not args.one_at_a_time,
        channels_last=args.channels_last,
        compile=args.compile,
        compile_vae=args.compile_vae,
        compile_text=args.compile_text,
        compile_mode=args.compile_mode,
        vae_tiling=args.vae_tiling,
        memory_cap_gib=args.memory_cap_gib,
        vae=args.vae,
    )
    say = functools.partial(print, file=human_stream(args))  # progress and notes: stderr under a bare --json
    result = run_bench(settings, log=say)
    table = bench_markdown(result)
    if args.json != STDOUT:  # a bare --json prints the result instead
        print()
        print(table)
    if path := emit_json(args.json, result, indent=2):
        say(f"wrote {path}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
        say(f"wrote {args.markdown}")
    if args.plot:
        say(f"wrote {plot(result, args.plot)}")
    return 0
