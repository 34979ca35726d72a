"""A tiny VAE decoder for the shapes teacher (issue 31, part 1), measured in the shapes world on this machine.

1. Shapes training images (``koala.lab.shapes``) encoded once by the teacher into a ``koala cache`` folder.
2. ``koala vae distill`` on that cache: an AutoencoderTiny decoder for the packaged shapes teacher's VAE.
3. The teacher pipeline samples latents for held-out val prompts (20 Euler steps, cfg 5, one seed per prompt);
   the *same* latents are decoded by the full VAE and by the tiny decoder (each as a diffusers pipeline decodes:
   ``vae.decode(latents / vae.config.scaling_factor)``), both image sets are scored by the shapes scorer, and the
   tiny decodes are compared with the full ones (PSNR, uint8 images).
4. Decode latency of both VAEs at the shapes size (32x32, batch 64, one thread).

Goal: the tiny decoder within 2 points of the full VAE on every scorer metric::

    python benchmarks/bench_tiny_vae_shapes.py --work /tmp/tiny-vae-shapes \
        --out benchmarks/results/tiny-vae-shapes.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch

METRICS = ("color", "shape", "binding", "spatial", "all")


def distill_overrides(cache: str, out: str, steps: int) -> list[str]:
    return [
        f"teacher={os.environ.get('KOALA_SHAPES_TEACHER', '')}",
        f"out={out}",
        "model.decoder_channels=[32,32]",
        "model.decoder_blocks=[2,1]",
        "data.type=cache",
        f"data.path={cache}",
        "train.batch_size=32",
        f"train.max_steps={steps}",
        "train.lr=2e-3",
        "train.lr_schedule=cosine",
        "train.lr_warmup_steps=50",
        f"train.checkpoint_every={min(500, steps)}",
        "train.log_every=50",
        "train.cpu_threads=1",
        "train.progress=false",
    ]


def prepare_data(work: str, teacher: str, num_train: int) -> str:
    from koala.data import build_cache
    from koala.lab.demo import data_source
    from koala.lab.models import IMAGE_SIZE
    from koala.lab.shapes import write_shapes_dataset

    cache = os.path.join(work, "cache")
    if os.path.isfile(os.path.join(cache, "index.json")):
        return cache
    data = write_shapes_dataset(os.path.join(work, "data"), num_train=num_train, num_val=0, size=IMAGE_SIZE)
    build_cache(
        data_source(os.path.join(data, "train")), teacher, cache, resolution=IMAGE_SIZE, batch_size=50, dtype="fp32"
    )
    return cache


@torch.no_grad()
def sample_latents(teacher: str, prompts: list[str], seed: int) -> torch.Tensor:
    """The teacher's final latents (scaled, what the pipeline hands its VAE) for each prompt, seed ``seed + i``."""
    from koala.lab.models import default_sampling, load_shapes_teacher

    pipe = load_shapes_teacher()
    out = []
    for i in range(0, len(prompts), 32):
        chunk = prompts[i : i + 32]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out.append(pipe(chunk, generator=gens, output_type="latent", **default_sampling()).images)
    return torch.cat(out)


@torch.no_grad()
def decode_uint8(vae, latents: torch.Tensor) -> np.ndarray:
    """Images [N, H, W, 3] uint8 as a pipeline decodes ``latents`` with ``vae`` (through its own scaling factor)."""
    img = vae.decode(latents / vae.config.scaling_factor).sample
    return ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def decode_ms(vae, latents: torch.Tensor, repeats: int = 5) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        with torch.no_grad():
            vae.decode(latents / vae.config.scaling_factor)
            for _ in range(repeats):
                t0 = time.perf_counter()
                vae.decode(latents / vae.config.scaling_factor)
                times.append(1000 * (time.perf_counter() - t0))
        return sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(threads)


def evaluate(teacher: str, tiny_dir: str, num_eval: int, seed: int, work: str) -> dict:
    from diffusers import AutoencoderKL, AutoencoderTiny

    from koala.lab.models import IMAGE_SIZE
    from koala.lab.score import score_pairs
    from koala.lab.shapes import generate_scenes

    prompts = [sc.text for sc in generate_scenes(num_eval, "val", seed, IMAGE_SIZE)]
    saved = os.path.join(work, f"latents-{num_eval}-seed{seed}.pt")
    if os.path.isfile(saved):  # the teacher's latents of these prompts, sampled once per work folder
        latents = torch.load(saved, weights_only=True)
    else:
        latents = sample_latents(teacher, prompts, seed)
        torch.save(latents, saved)
    full = AutoencoderKL.from_pretrained(os.path.join(teacher, "vae")).eval()
    tiny = AutoencoderTiny.from_pretrained(tiny_dir).eval()
    imgs = {"full VAE": decode_uint8(full, latents), "tiny decoder": decode_uint8(tiny, latents)}
    scores = {k: score_pairs(list(v), prompts)[0] for k, v in imgs.items()}
    rows = {k: {m: round(100 * s[m], 2) for m in METRICS} for k, s in scores.items()}
    diff = {m: round(rows["tiny decoder"][m] - rows["full VAE"][m], 2) for m in METRICS}
    per_image = [psnr(a, b) for a, b in zip(imgs["tiny decoder"], imgs["full VAE"])]
    return {
        "prompts": num_eval,
        "scores": rows,
        "tiny_minus_full_points": diff,
        "goal_within_2_points": all(abs(d) <= 2 for d in diff.values()),
        "psnr_db": {
            "all_images": round(psnr(imgs["tiny decoder"], imgs["full VAE"]), 2),
            "per_image_median": round(float(np.median(per_image)), 2),
            "per_image_min": round(float(np.min(per_image)), 2),
        },
        "params": {
            "full_decoder": sum(p.numel() for p in full.decoder.parameters())
            + sum(p.numel() for p in full.post_quant_conv.parameters()),
            "tiny_decoder": sum(p.numel() for p in tiny.decoder.parameters()),
        },
        "decode_ms_batch64_1thread": {
            "full VAE": round(decode_ms(full, latents[:64]), 2),
            "tiny decoder": round(decode_ms(tiny, latents[:64]), 2),
        },
    }


def markdown(res: dict) -> str:
    e = res["eval"]
    lines = [
        "# Tiny VAE decoder in the shapes world (issue 31, part 1)",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`",
        "",
        f"Training: `{res['distill_command']}` ({res['steps']} steps of batch 32 on {res['num_train']} cached shapes "
        f"images; {res['train_minutes']:.1f} min in this process; training loss (L1 + MSE) of its first step "
        f"{res['loss_first']:.4f}, of the last {res['loss_last']:.4f}).",
        "",
        *([res["notes"], ""] if res.get("notes") else []),
        f"The same teacher latents ({e['prompts']} held-out val prompts, 20 Euler steps, cfg 5) decoded by both VAEs "
        "and scored by the shapes scorer (percent):",
        "",
        "| decoder | params | " + " | ".join(METRICS) + " | decode ms (batch 64, 1 thread) |",
        "|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    for name, key in (("full VAE", "full_decoder"), ("tiny decoder", "tiny_decoder")):
        cells = " | ".join(f"{e['scores'][name][m]:.2f}" for m in METRICS)
        lines.append(f"| {name} | {e['params'][key]:,} | {cells} | {e['decode_ms_batch64_1thread'][name]:.1f} |")
    diff = " | ".join(f"{e['tiny_minus_full_points'][m]:+.2f}" for m in METRICS)
    lines += [
        f"| tiny - full (points) | | {diff} | |",
        "",
        f"PSNR of the tiny decodes against the full decodes (uint8): {e['psnr_db']['all_images']:.2f} dB over all "
        f"images (per image: median {e['psnr_db']['per_image_median']:.2f}, min {e['psnr_db']['per_image_min']:.2f}).",
        "",
        "Goal (within 2 points on every metric): "
        + (
            "met."
            if e["goal_within_2_points"]
            else "missed: "
            + ", ".join(f"{m} {d:+.2f}" for m, d in e["tiny_minus_full_points"].items() if abs(d) > 2)
            + " points."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/tiny-vae-shapes")
    ap.add_argument("--out", default="benchmarks/results/tiny-vae-shapes.json")
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--num-eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", default=None, metavar="DIR", help="only score this AutoencoderTiny folder")
    ap.add_argument("--resume", action="store_true", help="continue a stopped training run in --work (exactly)")
    args = ap.parse_args()
    if args.eval_only:
        from koala.lab.models import shapes_teacher_dir

        print(
            json.dumps(evaluate(shapes_teacher_dir(), args.eval_only, args.num_eval, args.seed, args.work), indent=1)
        )
        return
    from koala.distill.vae import distill_vae, load_vae_config
    from koala.lab.models import shapes_teacher_dir

    torch.set_num_threads(1)
    teacher = shapes_teacher_dir()
    os.environ["KOALA_SHAPES_TEACHER"] = teacher
    os.makedirs(args.work, exist_ok=True)
    cache = prepare_data(args.work, teacher, args.num_train)
    tiny_dir = os.path.join(args.work, "tiny-vae")
    overrides = distill_overrides(cache, tiny_dir, args.steps) + (["train.resume=latest"] if args.resume else [])
    t0 = time.time()
    summary = (
        distill_vae(load_vae_config(None, overrides))
        if not os.path.isfile(os.path.join(tiny_dir, "config.json"))
        else {"losses": [float("nan")]}
    )
    train_min = (time.time() - t0) / 60
    res = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU; torch {torch.__version__}",
        "command": "python benchmarks/bench_tiny_vae_shapes.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "distill_command": "koala vae distill --teacher SHAPES_TEACHER "
        + " ".join(o for o in overrides if not o.startswith("teacher=")),
        "num_train": args.num_train,
        "steps": args.steps,
        "train_minutes": round(train_min, 2),
        "loss_first": summary["losses"][0],
        "loss_last": summary["losses"][-1],
        "eval": evaluate(teacher, tiny_dir, args.num_eval, args.seed, args.work),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
