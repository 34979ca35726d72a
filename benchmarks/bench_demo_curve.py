"""The `koala demo` tuning curve: distill the demo's student with given settings, score it every ``--every`` steps.

Each call trains one configuration from the demo's compressed KOALA-700M student (the same data and held-out
prompts as `koala demo`) and prints one JSON line per checkpoint (colour / shape / binding / spatial accuracy) and,
at the end, the whole curve with the training time; ``--json`` keeps it. Settings are DemoSettings fields (their
defaults are the demo's), and any further ``key=value`` is a distillation override::

    python benchmarks/bench_demo_curve.py --name demo --steps 1000 --every 500
    python benchmarks/bench_demo_curve.py --name feat1 --steps 800 --every 400 --loss-feat 1 --json feat1.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

from koala.distill.config import LR_SCHEDULES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="run name (a folder under --base)")
    ap.add_argument("--base", default="runs/demo-curve", help="shared folder: compressed student, data, runs")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--every", type=int, default=200, help="score a checkpoint every this many steps")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES)
    ap.add_argument("--warmup", type=int, default=None, help="learning-rate warmup steps")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--loss-out", type=float, default=None)
    ap.add_argument("--loss-feat", type=float, default=None)
    ap.add_argument("--max-grad-norm", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--features", default=None)
    ap.add_argument("--ema", type=float, default=None, help="EMA decay (scores the EMA weights)")
    ap.add_argument(
        "--processes",
        type=int,
        default=None,
        help="data-parallel training processes (default: koala demo's rule; 1 with the teacher worker on 2 cores)",
    )
    ap.add_argument("--num-train", type=int, default=None, help="shapes training images (a new --base for each)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per training process (0: the demo's rule)")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="distillation seed (noise, timesteps, data order); the held-out prompts stay the demo's",
    )
    ap.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="train on the image folder, encoding every batch (koala demo encodes the images once)",
    )
    ap.add_argument(
        "--teacher-worker",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the teacher in a second process (koala demo's default: on with 2 or more cores)",
    )
    ap.add_argument("--no-fused", dest="fused", action="store_false", help="torch's foreach AdamW, not the fused one")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="distillation key=value overrides")
    a = ap.parse_args()

    import torch

    from koala.lab.demo import (
        DemoSettings,
        _quiet_libraries,
        distill,
        encode_training_data,
        eval_prompts,
        model_subdir,
        prepare,
        score_model,
    )
    from koala.lab.models import shapes_teacher_dir

    torch.set_num_threads(1)
    _quiet_libraries()
    given = {
        k: v
        for k, v in (
            ("lr", a.lr),
            ("batch_size", a.batch_size),
            ("loss_out", a.loss_out),
            ("loss_feat", a.loss_feat),
            ("max_grad_norm", a.max_grad_norm),
            ("weight_decay", a.weight_decay),
            ("features", a.features),
            ("ema", a.ema),
            ("lr_schedule", a.lr_schedule),
            ("warmup", a.warmup),
            ("num_train", a.num_train),
            ("teacher_worker", a.teacher_worker),
        )
        if v is not None
    }
    s = DemoSettings(
        out=a.base,
        steps=a.steps,
        progress=False,
        processes=a.processes,
        threads=a.threads,
        cache=a.cache,
        fused_optimizer=a.fused,
        **given,
    )
    teacher = s.teacher or shapes_teacher_dir()
    marker = os.path.join(a.base, "prepared.json")
    if not os.path.isfile(marker):
        prepare(DemoSettings(out=a.base, overwrite=True, progress=False, cache=False, num_train=s.num_train))
        with open(marker, "w") as f:
            json.dump({"student_init": "student-init", "train": "data/train"}, f)
    with open(marker) as f:
        prep = json.load(f)
    if a.cache and "cache" not in prep:  # the same images, encoded once as `koala demo` does
        encode_training_data(s, teacher, os.path.join(a.base, prep["train"]), os.path.join(a.base, "cache"))
        prep["cache"] = "cache"
        with open(marker, "w") as f:
            json.dump(prep, f)
    t0 = time.time()
    data = os.path.join(a.base, prep["cache" if a.cache else "train"])
    distill(
        s,
        teacher,
        os.path.join(a.base, prep["student_init"]),
        data,
        run_name=f"run-{a.name}",
        seed=a.seed,
        extra=[*a.overrides, f"train.checkpoint_every={a.every}", "train.keep_checkpoints=0"],
    )
    res = {
        "name": a.name,
        "settings": {k: v for k, v in s.__dict__.items() if k not in ("out", "progress")},
        "train_seed": a.seed,
        "overrides": a.overrides,
        "train_s": round(time.time() - t0, 1),
        "curve": [],
    }
    prompts = eval_prompts(s)
    for ck in sorted(glob.glob(os.path.join(a.base, f"run-{a.name}", "checkpoints", "step-*"))):
        scores, _ = score_model(s, teacher, model_subdir(ck, ema=s.ema > 0), prompts)
        res["curve"].append({"step": int(ck.rsplit("-", 1)[1]), **scores})
        print(json.dumps(res["curve"][-1]), flush=True)
    print(json.dumps(res), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
