"""Issue 29's shapes-world ControlNet table: control adherence (layout IoU) and binding per setup.

Each row is ``measure(name, pipe, controlnet_or_None)``: one image per shapes val scene (its caption as prompt;
with a ControlNet, its layout as control image, scale 1), the teacher's sampler (Euler, 20 steps, guidance 5,
32 x 32), the same seeds in every row, scored by :func:`koala.lab.control.score_control`. Rows 3-4 of the issue
(student + transferred ControlNet; after ControlNet KD) are added by passing ``--student-controlnet`` (and
``--kd-student`` / ``--kd-controlnet``) or by calling :func:`measure` with those models.

    PYTHONPATH=src python benchmarks/bench_controlnet_shapes.py --controlnet CN_DIR [--student DIR] [--num 64]

``--student``: a student pipeline directory; default: ``koala compress`` of the packaged teacher to koala-700m
(the first step of ``koala demo``; no distillation), written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("iou", "fg_iou", "binding", "color", "shape", "spatial", "all")


def load_pipe(path: str):
    """A shapes pipeline directory (teacher or compressed student) as its diffusers pipeline, fp32 on CPU."""
    from koala.families import family_of

    pipe = family_of(path).pipeline_class_of(path).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_controlnet(path: str | None):
    """A ControlNet directory (diffusers' ``ControlNetModel``, or koala's ``KoalaControlNetModel`` for a student
    without a mid block: :func:`koala.inference.load_controlnet`), or None."""
    if not path:
        return None
    from koala.inference.controlnet import load_controlnet as load

    return load(path, dtype=torch.float32)


def measure(name: str, pipe, controlnet, num: int, seed: int = 0) -> dict:
    """One table row: ``pipe`` (+ ``controlnet`` fed the layouts) on val scenes ``0..num-1``."""
    from koala.lab.control import score_control

    t0 = time.time()
    scores = score_control(pipe, controlnet, num=num, seed=seed, progress=False)
    row = {"setup": name, **{k: round(scores[k], 4) for k in COLUMNS if scores.get(k) is not None}}
    row.update(n_images=scores["n_images"], n_objects=scores["n_objects"], seconds=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    return row


def default_student(tmp: str) -> str:
    from koala.compress import compress
    from koala.lab.models import shapes_teacher_dir

    out = os.path.join(tmp, "student")
    compress(shapes_teacher_dir(), "koala-700m", out)
    return out


def rows(args, tmp: str) -> list[dict]:
    from koala.lab.models import shapes_teacher_dir

    teacher = load_pipe(shapes_teacher_dir())
    cn = load_controlnet(args.controlnet)
    out = [measure("teacher + ControlNet", teacher, cn, args.num, args.seed)]
    out.append(measure("teacher without ControlNet (context)", teacher, None, args.num, args.seed))
    student = load_pipe(args.student or default_student(tmp))
    out.append(measure("student without ControlNet", student, None, args.num, args.seed))
    if args.student_controlnet:
        out.append(
            measure(
                "student + transferred ControlNet, no training",
                student,
                load_controlnet(args.student_controlnet),
                args.num,
                args.seed,
            )
        )
    if args.kd_controlnet:
        kd = load_pipe(args.kd_student) if args.kd_student else student
        out.append(
            measure(
                "student + ControlNet after ControlNet KD",
                kd,
                load_controlnet(args.kd_controlnet),
                args.num,
                args.seed,
            )
        )
    return out


def write(rows_: list[dict], args, wall: float, out: str) -> None:
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU, torch {torch.__version__}"
    meta = {
        "machine": machine,
        "command": " ".join(["python", *sys.argv]),
        "num": args.num,
        "seed": args.seed,
        "controlnet": args.controlnet,
        "student": args.student or "koala compress (koala-700m), no KD",
        "wall_seconds": round(wall, 1),
        "load_average": os.getloadavg(),
        "rows": rows_,
    }
    with open(out + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    ref = rows_[0]["iou"]
    lines = [
        "| setup | IoU | fg IoU | binding | spatial | all | IoU vs teacher + ControlNet |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_:
        lines.append(
            f"| {r['setup']} | {r['iou']:.3f} | {r['fg_iou']:.3f} | {r['binding']:.3f} | "
            f"{r.get('spatial', float('nan')):.3f} | {r['all']:.3f} | {100 * (r['iou'] - ref):+.1f} points |"
        )
    with open(out + ".table.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controlnet", required=True, help="the teacher's shapes ControlNet (koala lab train-controlnet)")
    p.add_argument("--student", default=None, help="student pipeline dir (default: koala compress, koala-700m)")
    p.add_argument("--student-controlnet", default=None, help="row 3: the student's transferred ControlNet")
    p.add_argument(
        "--kd-student", default=None, help="row 4: student pipeline after ControlNet KD (default --student)"
    )
    p.add_argument("--kd-controlnet", default=None, help="row 4: the student's ControlNet after ControlNet KD")
    p.add_argument("--num", type=int, default=64, help="val scenes (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "controlnet-shapes"), help="OUT.json, OUT.table.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = rows(args, tmp)
    write(res, args, time.time() - t0, args.out)


if __name__ == "__main__":
    main()
