"""Issue 28 item 3 in the shapes world: does a few-step LoRA move from the teacher to the student?

From a `koala demo` run (its KD student and training cache), train two LCM-LoRAs with `koala distill`
(``fewstep.lora_rank``):

1. on the shapes teacher itself (the "student" is the teacher compressed with its own spec, so it equals the
   teacher; step teacher = the teacher), then moved onto the KD student with `koala lora transfer`;
2. on the KD student (step teacher = the KD student itself).

Each is scored with LCMScheduler at 4 / 2 / 1 steps, cfg 1, on the demo's held-out prompts (binding accuracy),
next to the teacher with its own LoRA::

    python benchmarks/bench_lcm_lora_route.py --demo runs/demo --steps 300 --lr 1e-3 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

# the shapes teacher's own U-Net spec: compressing with it keeps every block, so the "student" is the teacher
TEACHER_SPEC = "{encoder_layers: [2, 2, 2], down_depth: [0, 2, 10], up_depth: [10, 2, 0], mid_block: true}"


def train_lora(demo: str, name: str, extra: list[str], steps: int, lr: float, rank: int) -> tuple[str, float]:
    from koala.distill import load_config
    from koala.distill.trainer import train
    from koala.lab.models import IMAGE_SIZE, shapes_teacher_dir

    common = [
        f"teacher.pipeline={shapes_teacher_dir()}",
        "teacher.dtype=fp32",
        "data.type=cache",
        f"data.path={demo}/cache",
        f"train.resolution={IMAGE_SIZE}",
        "train.batch_size=16",
        f"train.max_steps={steps}",
        f"train.lr={lr}",
        "train.weight_decay=0",
        "train.max_grad_norm=0",
        "train.ema.enabled=false",
        "train.progress=false",
        f"train.checkpoint_every={steps}",
        "train.keep_checkpoints=1",
        "validation.every=0",
        "train.caption_dropout=0",
        "train.log_every=50",
        "fewstep.method=lcm",
        f"fewstep.lora_rank={rank}",
        "loss.task=0",
        "loss.out=0",
        "loss.feat=0",
        "kd.features={}",
        f"train.output_dir={demo}/lora-{name}",
    ]
    shutil.rmtree(f"{demo}/lora-{name}", ignore_errors=True)  # this script's own run folder: start it fresh
    t0 = time.time()
    out = train(load_config(None, common + extra))
    return os.path.join(out["checkpoint"], "pytorch_lora_weights.safetensors"), time.time() - t0


def binding(unet_dir: str, lora: str, steps: int, prompts: list[str]) -> float:
    import numpy as np

    from koala.inference import generate, load_pipeline
    from koala.lab.models import IMAGE_SIZE, shapes_teacher_dir
    from koala.lab.score import score_pairs

    loaded = load_pipeline(
        unet=unet_dir, base=shapes_teacher_dir(), device="cpu", dtype="fp32", scheduler="lcm", lora=[lora]
    )
    res = generate(
        loaded,
        prompts,
        steps=steps,
        cfg=1.0,
        seed=0,
        batch_size=16,
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        progress=False,
        log=lambda *_: None,
    )
    agg, _ = score_pairs([np.asarray(im.convert("RGB")) for im in res.images], prompts)
    return round(float(agg["binding"]), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a `koala demo` output folder (its KD checkpoint and cache)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default="lcm-lora-route.jsonl", help="file the JSON line is appended to")
    args = ap.parse_args()

    from koala.distill.checkpoint import list_checkpoints
    from koala.formats.lora import transfer_lora
    from koala.lab import demo as D
    from koala.lab.models import shapes_teacher_dir

    demo = os.path.abspath(args.demo)
    kd = D.model_subdir(list_checkpoints(os.path.join(demo, "distill"))[-1][1])
    D._quiet_libraries()
    prompts = D.eval_prompts(D.DemoSettings(out=demo))
    hp = (args.steps, args.lr, args.rank)
    teacher_lora, t1 = train_lora(demo, "teacher", [f"student.preset={TEACHER_SPEC}", "fewstep.teacher=teacher"], *hp)
    moved = os.path.join(demo, "lora-moved.safetensors")
    report = transfer_lora(teacher_lora, kd, moved, overwrite=True)
    student_lora, t2 = train_lora(demo, "student", [f"student.path={kd}", "fewstep.teacher=student"], *hp)
    row = {"steps": args.steps, "lr": args.lr, "rank": args.rank, "train_s": [round(t1), round(t2)]}
    row["transfer"] = {"kept": report.kept, "dropped": report.dropped}
    teacher_unet = os.path.join(shapes_teacher_dir(), "unet")
    for n in (4, 2, 1):
        row[f"teacher + its LoRA, {n}"] = binding(teacher_unet, teacher_lora, n, prompts)
        row[f"KD student + LoRA moved from the teacher, {n}"] = binding(kd, moved, n, prompts)
        row[f"KD student + LoRA distilled on it, {n}"] = binding(kd, student_lora, n, prompts)
    print(json.dumps(row, indent=1))
    with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
