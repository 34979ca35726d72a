"""Cost of feature KD: the real training step with featKD (paper default: SA all + LF at DW-1/UP-3, loss.feat=1)
versus outKD only (kd.features={}, loss.feat=0), through ``Distiller.micro_step``. Goal: hooks + featKD <= 5%.

    python benchmarks/bench_distill_hooks.py [--channels 64,128,128] [--text-dim 64] [--resolution 64]
        [--batch 2] [--steps 20] [--threads 1] [--data cache|raw] [--device cpu|cuda]

Both variants are two ``Distiller`` s built from the same `tiny` recipe config (same pipeline, same seed, same
compressed student) except ``kd.features`` / ``loss.feat``. One timed step is what the trainer does per
optimizer step with grad_accum 1: ``kd_item`` (encode, noise, teacher forward under feature capture) and
``micro_step`` (student forward, losses, the finite-loss check, backward), ``losses.scalars(d.pairs)`` (the
per-pair logging sync), grad-norm clipping, AdamW step, zero_grad, EMA update. Both variants see the same batches
and per-sample generators. The pipeline is `koala.testing.tiny`'s random SDXL topology scaled up (``--channels``,
``--text-dim``) so the U-Net dominates the step. ``--data cache`` (default) feeds pre-encoded latents/embeddings like a
``data.type=cache`` run, so VAE/text encoding does not dilute the overhead; ``--data raw`` encodes each step.
Rounds alternate the order (A B, B A, ...) so drifting machine load affects both alike; medians are reported.
Writes ``benchmarks/results/distill-hooks.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

WORDS = ["a", "red", "blue", "circle", "square", "photo", "of"]


def channels(text: str) -> tuple[int, ...]:
    out = tuple(int(c) for c in text.split(","))
    if len(out) != 3:
        raise argparse.ArgumentTypeError("--channels takes three comma-separated SDXL stage widths, e.g. 64,128,128")
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def build(args, pipe_dir: str, out_dir: str, featkd: bool, acc):
    from koala.distill import load_config
    from koala.distill.step import Distiller

    feats = (
        ["kd.features={SA: all, LF: [DW-1, UP-3]}", "loss.feat=1.0"] if featkd else ["kd.features={}", "loss.feat=0"]
    )
    cfg = load_config(
        "tiny",
        [
            f"teacher.pipeline={pipe_dir}",
            f"train.output_dir={out_dir}",
            f"train.resolution={args.resolution}",
            f"train.batch_size={args.batch}",
            "train.grad_accum=1",
            f"train.cpu_threads={args.threads}",
            "train.progress=false",
            "validation.every=0",
            "train.log_with=none",
            *feats,
        ],
    )
    return cfg, Distiller(cfg, acc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=channels, default=(64, 128, 128), help="U-Net block_out_channels")
    ap.add_argument("--text-dim", type=int, default=64, help="CLIP width (the U-Net sees 2x as cross-attention dim)")
    ap.add_argument("--resolution", type=int, default=64, help="pixels (the tiny VAE halves it: latents res/2)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", choices=("cache", "raw"), default="cache")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distill-hooks.json")
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from koala.data import make_dataloader
    from koala.distill.models import encode_batch
    from koala.distill.step import sample_generators
    from koala.testing.tiny import RANDOM, save_tiny_pipeline

    spec = dataclasses.replace(
        RANDOM,
        channels=args.channels,
        text_dim=args.text_dim,
        projection_dim=args.text_dim,
        intermediate_size=4 * args.text_dim,
        image_size=args.resolution,
    )
    acc = Accelerator(cpu=args.device == "cpu")
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = save_tiny_pipeline(os.path.join(tmp, "pipe"), spec, seed=0, words=WORDS)
        variants = {}
        for name, featkd in (("outkd", False), ("featkd", True)):
            variants[name] = build(args, pipe, os.path.join(tmp, name), featkd, acc)
        cfg, ref = variants["outkd"]
        torch.set_num_threads(args.threads)
        n_batches = 4
        loader = iter(
            make_dataloader(
                cfg.data,
                batch_size=args.batch,
                resolution=args.resolution,
                seed=cfg.train.seed,
                pipeline_dir=pipe,
            )
        )
        batches = [next(loader) for _ in range(n_batches)]
        if args.data == "cache":  # what koala.data's cache stores: scaled latents + conditioning, no encoding per step
            cached = []
            for i, b in enumerate(batches):
                gens = sample_generators(cfg.train.seed, i, 0, args.batch, 1)
                lat, cond = encode_batch(b, ref.frozen, "cpu", gens)
                cached.append({"latents": lat, **cond, "captions": b["captions"]})
            batches = cached

        def step(name: str, i: int) -> float:
            cfg, d = variants[name]
            gens = sample_generators(cfg.train.seed, i, 0, args.batch, 1)
            sync()
            t0 = time.perf_counter()
            losses = d.micro_step(d.kd_item(batches[i % n_batches], gens), step=i + 1)
            losses.scalars(d.pairs)
            d.update()
            sync()
            return time.perf_counter() - t0

        for i in range(args.warmup):
            for name in ("outkd", "featkd"):
                step(name, i)
        times: dict[str, list[float]] = {"outkd": [], "featkd": []}
        for i in range(args.warmup, args.warmup + args.steps):
            order = ("outkd", "featkd") if i % 2 == 0 else ("featkd", "outkd")
            for name in order:
                times[name].append(step(name, i))
        for _, d in variants.values():
            d.close()

    base, feat = statistics.median(times["outkd"]), statistics.median(times["featkd"])
    overhead = 100 * (feat / base - 1)
    d = variants["featkd"][1]
    n_t = sum(p.numel() for p in d.teacher.parameters()) / 1e6
    n_s = sum(p.numel() for p in d.plain_student.parameters()) / 1e6
    lat = args.resolution // 2
    pairs = [p.name for p in d.pairs]
    device = torch.cuda.get_device_name(0) if acc.device.type == "cuda" else cpu_name()
    print(
        f"teacher U-Net {n_t:.2f}M params, student (koala-700m) {n_s:.2f}M, channels "
        f"{','.join(map(str, args.channels))}, "
        f"latents {args.batch}x4x{lat}x{lat}, data {args.data}, {acc.device.type} {args.threads} thread(s), "
        f"{len(pairs)} feature pairs"
    )
    print(f"outKD only          : {1000 * base:8.1f} ms/step (median of {args.steps})")
    print(f"outKD + featKD hooks: {1000 * feat:8.1f} ms/step")
    print(
        f"overhead            : {overhead:+.1f}%  (goal <= 5%); on the fastest steps "
        f"{100 * (min(times['featkd']) / min(times['outkd']) - 1):+.1f}%"
    )
    print()
    print(
        "| step (Distiller.kd_item + micro_step + scalars + clip + AdamW + EMA) "
        "| outKD only ms | + featKD ms | overhead |"
    )
    print("|---|---|---|---|")
    print(
        f"| {args.device}, {args.threads} thr, ch {','.join(map(str, args.channels))}, latents "
        f"{args.batch}x4x{lat}x{lat}, {len(pairs)} pairs | {1000 * base:.1f} | {1000 * feat:.1f} | {overhead:+.1f}% |"
    )
    result = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "device": acc.device.type,
        "device_name": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "unet_channels": list(args.channels),
        "text_dim": args.text_dim,
        "resolution": args.resolution,
        "latents": [args.batch, 4, lat, lat],
        "data": args.data,
        "teacher_params_m": round(n_t, 3),
        "student_params_m": round(n_s, 3),
        "feature_pairs": pairs,
        "step_includes": [
            "Distiller.kd_item (encode, noise, teacher forward)",
            "Distiller.micro_step (student forward, losses, finite check, backward)",
            "Losses.scalars(d.pairs)",
            "clip_grad_norm",
            "AdamW step",
            "zero_grad",
            "EMA step",
        ],
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "outkd_ms_median": round(1000 * base, 2),
        "featkd_ms_median": round(1000 * feat, 2),
        "overhead_pct": round(overhead, 2),
        "outkd_ms_min": round(1000 * min(times["outkd"]), 2),
        "featkd_ms_min": round(1000 * min(times["featkd"]), 2),
        "overhead_pct_min": round(100 * (min(times["featkd"]) / min(times["outkd"]) - 1), 2),
        "goal_pct": 5.0,
        "meets_goal": overhead <= 5.0,
        "outkd_ms": [round(1000 * t, 2) for t in times["outkd"]],
        "featkd_ms": [round(1000 * t, 2) for t in times["featkd"]],
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
