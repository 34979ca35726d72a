"""One step-stage setting in the shapes world, from an existing `koala demo` run's KD student: train it, score it at
4 / 2 / 1 steps of its recorded sampler (cfg 1) on the demo's held-out prompts, print and append one JSON line.

The sweep in benchmarks/results/fewstep-shapes.md ran this on one core per run (``--threads 1``), from
``koala demo --out runs/demo`` (seed 0); ``--baseline`` scores the KD student itself (Euler, cfg 5) at 20 / 4 / 2 / 1::

    python benchmarks/bench_fewstep_sweep.py --demo runs/demo --baseline
    python benchmarks/bench_fewstep_sweep.py --demo runs/demo --name G fewstep.teacher=teacher fewstep.guidance_scale=3
    python benchmarks/bench_fewstep_sweep.py --demo runs/demo --name I --steps 150 fewstep.method=dmd \\
        fewstep.teacher=teacher fewstep.fake_updates=2 fewstep.guidance_scale=5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a `koala demo` output folder (its KD checkpoint and cache)")
    ap.add_argument("--name", default="run", help="run name (a folder fs-NAME in --demo)")
    ap.add_argument("--steps", type=int, default=300, help="step-stage optimizer steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", action="store_true", help="score the KD student instead of training")
    ap.add_argument("--json", default="fewstep-sweep.jsonl", help="file the JSON line is appended to")
    ap.add_argument("overrides", nargs="*", help="distill overrides (fewstep.*, loss.*, ...)")
    args = ap.parse_args()

    import torch

    from koala.distill.checkpoint import list_checkpoints
    from koala.lab import demo as D
    from koala.lab.models import shapes_teacher_dir

    ckpt = list_checkpoints(os.path.join(os.path.abspath(args.demo), "distill"))[-1][1]
    kd = D.model_subdir(ckpt)
    s = D.DemoSettings(
        out=args.demo,
        steps=args.steps,
        lr=args.lr,
        warmup=0,
        lr_schedule="constant",
        teacher_worker=False,
        processes=1,
        progress=False,
        threads=args.threads,
    )
    D._quiet_libraries()
    prompts = D.eval_prompts(s)
    row, t0 = {"name": "KD-baseline" if args.baseline else args.name, "overrides": args.overrides}, time.time()
    if args.baseline:
        model, counts, cfg = kd, (20, 4, 2, 1), s.guidance
    else:
        overrides = [
            "fewstep.method=lcm",
            "loss.task=0",
            "loss.out=0",
            "loss.feat=0",
            "train.caption_dropout=0.0",
            "kd.features={}",
            *args.overrides,
        ]
        model = D.distill(
            s, shapes_teacher_dir(), kd, os.path.join(args.demo, "cache"), run_name=f"fs-{args.name}", extra=overrides
        )
        row.update(steps=args.steps, lr=args.lr, train_s=round(time.time() - t0, 1))
        counts, cfg = (4, 2, 1), 1.0
    torch.set_num_threads(os.cpu_count() or 1)
    for n in counts:
        scores, _ = D.score_model(
            dataclasses.replace(s, sample_steps=n, guidance=cfg), shapes_teacher_dir(), model, prompts
        )
        row[f"binding_{n}"] = scores["binding"]
    print(json.dumps(row))
    with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
