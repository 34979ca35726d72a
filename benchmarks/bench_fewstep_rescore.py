"""Score saved denoisers at 4 / 2 / 1 steps on more prompts than the demo: the low-noise comparison behind
benchmarks/results/fewstep-shapes.md (the KD student with Euler at cfg 5, the few-step students with their recorded
sampler at cfg 1; each image from its own generator seeded 1000 + its index)::

    python benchmarks/bench_fewstep_rescore.py --num 320 kd=runs/demo/distill/checkpoints/step-0000950/unet \\
        G=runs/demo/fs-G/checkpoints/step-0000300/unet

``NAME=DIR``: a name starting with ``kd`` is sampled like the KD student; the others as few-step students;
``NAME=teacher`` is the shapes teacher itself (Euler, cfg 5; e.g. ``teacher=teacher kd=DIR --steps 20``). One
JSON line per model and step count.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=DENOISER_DIR")
    ap.add_argument("--num", type=int, default=320, help="val prompts (the demo's generator, seed 0)")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 2, 1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from koala.inference import load_pipeline
    from koala.lab import demo as D
    from koala.lab.models import IMAGE_SIZE, shapes_teacher_dir
    from koala.lab.score import score_pairs

    torch.set_num_threads(args.threads)
    D._quiet_libraries()
    prompts = D.eval_prompts(D.DemoSettings(out=os.devnull, num_eval=args.num))
    for spec in args.models:
        name, path = spec.split("=", 1)
        kd = name.startswith("kd") or path == "teacher"
        where = {"model": shapes_teacher_dir()} if path == "teacher" else {"unet": path, "base": shapes_teacher_dir()}
        pipe = load_pipeline(**where, device="cpu", dtype="fp32", scheduler="euler" if kd else None).pipe
        pipe.set_progress_bar_config(disable=True)
        for steps in args.steps:
            images = []
            for i in range(0, len(prompts), 32):
                chunk = range(i, min(i + 32, len(prompts)))
                images += pipe(
                    prompts[i : i + 32],
                    num_inference_steps=steps,
                    guidance_scale=5.0 if kd else 1.0,
                    generator=[torch.Generator().manual_seed(1000 + j) for j in chunk],
                    width=IMAGE_SIZE,
                    height=IMAGE_SIZE,
                ).images
            agg, _ = score_pairs(D._images_np(images), prompts)
            row = {"name": name, "steps": steps, "n": args.num}
            print(json.dumps({**row, **{k: round(float(agg[k]), 4) for k in ("binding", "color", "shape")}}))


if __name__ == "__main__":
    main()
