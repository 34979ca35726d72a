"""`koala demo`: compress, distill, generate and score in the embedded shapes world (offline, CPU)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from ..lab.features import FEATURES

    p = sub.add_parser(
        "demo",
        help="run the whole KOALA method offline on CPU in the embedded shapes world (~10 min on 2 cores)",
        description="Compress the packaged shapes teacher (SDXL topology) to KOALA-700M, distill it with "
        "self-attention KD, generate a teacher-vs-student grid and print params, U-Net latency and the shapes "
        "scorer's colour/shape/binding/spatial accuracy for the teacher and the student before and after KD.",
    )
    p.add_argument("--out", default="koala-demo", help="output directory (default: koala-demo)")
    p.add_argument("--fast", action="store_true", help="seconds-long smoke run (tiny budgets; numbers meaningless)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default 950; --fast: 4)")
    p.add_argument(
        "--features",
        default="SA+LF",
        choices=list(FEATURES),
        help="feature KD: SA+LF (paper: SA-bottom + LF at DW-1/UP-3), one feature type at every stage "
        "(SA, CA, FFN, Res), LF-all (BK), none",
    )
    p.add_argument("--preset", default="koala-700m", help="student preset (default koala-700m)")
    p.add_argument(
        "--num-eval", type=int, default=None, help="val prompts scored per model (default 64; 256 with --few-step)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=None, help="a shapes teacher pipeline directory (default: the packaged one)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: each training process gets its share of the cores, scoring all of them)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="data-parallel training processes, each taking its "
        "share of every batch (default: as many as the cores hold, up to 2: a core each, two with the "
        "teacher worker; so 1 on a 2-core machine)",
    )
    p.add_argument(
        "--teacher-worker",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the teacher's forwards in a second process, a micro-batch ahead of the student "
        "(train.teacher_worker; default: on with 2 or more CPU cores)",
    )
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        default=None,
        help="encode the training images at every step instead of once up front",
    )
    p.add_argument(
        "--few-step",
        action="store_true",
        help="after KD, distill the student for few-step sampling (latent consistency distillation, the teacher as "
        "the step teacher) and add rows: the KD student and the few-step student at 4, 2 and 1 steps; scores 256 "
        "val prompts per model unless --num-eval says otherwise",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lab.demo import DemoSettings, print_results, run_demo

    kw = {
        k: v
        for k, v in (
            ("out", args.out),
            ("steps", args.steps),
            ("features", args.features),
            ("preset", args.preset),
            ("num_eval", args.num_eval),
            ("seed", args.seed),
            ("teacher", args.teacher),
            ("threads", args.threads),
            ("processes", args.processes),
            ("cache", args.cache),
            ("teacher_worker", args.teacher_worker),
            ("overwrite", args.overwrite),
            ("few_step", args.few_step or None),
        )
        if v is not None
    }
    settings = DemoSettings.fast(**kw) if args.fast else DemoSettings(**kw)
    result = run_demo(settings)
    print_results(result)
    rows = "teacher, student before KD, student after KD" + (
        ", KD student and few-step student at few steps" if settings.few_step else ""
    )
    few = f", few-step student at {result['few_step_student']}" if result.get("few_step_student") else ""
    print(
        f"outputs in {settings.out}/: grid.png (rows: {rows}), results.json, student U-Net at "
        f"{result['student']}{few} ({result['minutes']} min)"
    )
    return 0
