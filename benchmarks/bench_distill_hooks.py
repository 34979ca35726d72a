"""Cost of feature KD hooks: training-step time with featKD (paper default: SA-bottom + LF at DW-1/UP-3)
versus outKD only, on a random mid-size SDXL-topology U-Net on CPU. Goal: hooks + featKD cost <= 5%.

    python benchmarks/bench_distill_hooks.py [--channels 32 64 128] [--size 32] [--steps 10] [--threads 1]

A step = teacher forward (no grad) + student forward + loss + backward + AdamW step, same inputs both ways.
The two variants are interleaved step by step so machine load affects both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from koala.arch import compress_unet
from koala.distill import FeatureRecorder, feature_pairs, kd_losses
from koala.distill.config import DEFAULTS
from koala.lab.tiny import tiny_unet


def inputs(unet, batch, size):
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(sample=torch.randn(batch, 4, size, size), timestep=torch.randint(0, 1000, (batch,)),
                encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim),
                added_cond_kwargs={"text_embeds": torch.randn(batch, pooled),
                                   "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * batch)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, nargs=3, default=[32, 64, 128])
    ap.add_argument("--size", type=int, default=32, help="latent side")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="koala-700m")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher = tiny_unet(0, channels=tuple(args.channels)).eval().requires_grad_(False)
    student, lmap = compress_unet(teacher, args.preset)
    student.train()
    pairs = feature_pairs(lmap, student, teacher, DEFAULTS["kd"]["features"])
    s_rec = FeatureRecorder(student, [p.student for p in pairs], "student")
    t_rec = FeatureRecorder(teacher, [p.teacher for p in pairs], "teacher")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    x = inputs(teacher, args.batch, args.size)
    weights = {"task": 1.0, "out": 1.0, "feat": 1.0}

    def step(with_features: bool) -> float:
        t0 = time.perf_counter()
        if with_features:
            with torch.no_grad(), t_rec.capture():
                t_out = teacher(**x).sample
            with s_rec.capture():
                s_out = student(**x).sample
            losses = kd_losses(s_out, x["sample"], t_out, pairs, s_rec.pop(), t_rec.pop(), weights)
        else:
            with torch.no_grad():
                t_out = teacher(**x).sample
            s_out = student(**x).sample
            losses = kd_losses(s_out, x["sample"], t_out, [], {}, {}, weights)
        losses.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        step(True), step(False)
    times = {True: [], False: []}
    for _ in range(args.steps):
        for mode in (False, True):
            times[mode].append(step(mode))
    base, feat = statistics.median(times[False]), statistics.median(times[True])
    n_t = sum(p.numel() for p in teacher.parameters()) / 1e6
    n_s = sum(p.numel() for p in student.parameters()) / 1e6
    print(f"teacher {n_t:.2f}M params, student ({args.preset}) {n_s:.2f}M, latents {args.batch}x4x{args.size}x{args.size}, "
          f"{args.threads} thread(s), {len(pairs)} feature pairs")
    print(f"outKD only          : {1000 * base:8.1f} ms/step (median of {args.steps})")
    print(f"outKD + featKD hooks: {1000 * feat:8.1f} ms/step")
    print(f"overhead            : {100 * (feat / base - 1):+.1f}%  (goal <= 5%)")


if __name__ == "__main__":
    main()
