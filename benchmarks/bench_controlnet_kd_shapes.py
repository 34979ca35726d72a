"""Issue 29's shapes-world ControlNet table, rows 3-4: the student with the teacher's shapes ControlNet transferred
(no training) and after ControlNet KD, next to rows 1-2 (teacher + ControlNet, student without ControlNet) of
``bench_controlnet_shapes.py``, which scores every row the same way.

Stages, each written under ``--work`` and reused when already there:

1. ``student``: the KOALA-700M student of the packaged shapes teacher, ``koala compress`` + KD as ``koala demo``
   does (its settings, ``--kd-steps`` steps, one process, the images cached); ``--student DIR`` skips this.
2. ``data``: ``--num-train`` shapes training images with their layouts (``<stem>.layout.png``).
3. ``transfer``: ``koala controlnet transfer`` of ``--controlnet`` onto the student (row 3).
4. ``kd``: ``koala distill --config tiny-controlnet`` on the shapes images with ``data.control=layout``,
   ``--cn-steps`` steps (row 4; ``--train-unet`` trains the U-Net with it).
5. the table: ``bench_controlnet_shapes.py`` with the student, row 3's and row 4's ControlNets.

    PYTHONPATH=src python benchmarks/bench_controlnet_kd_shapes.py --controlnet CN_DIR --work /tmp/cnkd-bench
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def kd_student(work: str, steps: int, seed: int = 0) -> str:
    """The KD'ed shapes student as a pipeline folder (``work/student``): the compressed pipeline with its U-Net
    replaced by the one KD trained."""
    from koala.lab.demo import DemoSettings, distill, prepare

    out = os.path.join(work, "student")
    if os.path.isfile(os.path.join(out, "model_index.json")):
        return out
    s = DemoSettings(
        out=os.path.join(work, "demo"), steps=steps, processes=1, teacher_worker=False, overwrite=True, seed=seed
    )
    teacher, init, data = prepare(s)
    unet = distill(s, teacher, init, data)
    _pipeline_with_unet(init, unet, out)
    return out


def _pipeline_with_unet(pipeline: str, unet: str, out: str) -> None:
    """``out``: links to ``pipeline``'s components, with ``unet`` as its U-Net."""
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    for name in os.listdir(pipeline):
        src = os.path.abspath(unet if name == "unet" else os.path.join(pipeline, name))
        os.symlink(src, os.path.join(tmp, name))
    os.replace(tmp, out)


def shapes_data(work: str, num_train: int, seed: int = 0) -> str:
    from koala.lab.models import IMAGE_SIZE
    from koala.lab.shapes import write_shapes_dataset

    out = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(out, "train")):
        write_shapes_dataset(out, num_train=num_train, num_val=0, seed=seed, size=IMAGE_SIZE, progress=False)
    return os.path.join(out, "train")


def transferred(work: str, controlnet: str, student: str) -> str:
    from koala.formats.controlnet import transfer_controlnet

    out = os.path.join(work, "student-cn")
    if not os.path.isdir(out):
        transfer_controlnet(controlnet, student, out)
    return out


def controlnet_kd(work: str, controlnet: str, student: str, train_dir: str, a, train_unet: bool) -> str:
    """The student ControlNet after ControlNet KD (``controlnet/`` of the run's last checkpoint); reused when the
    run is there."""
    from koala.distill import load_config, train
    from koala.lab.models import IMAGE_SIZE, shapes_teacher_dir

    run = os.path.join(work, "kd-unet" if train_unet else "kd")
    done = os.path.join(run, "checkpoints", f"step-{a.cn_steps:07d}", "controlnet")
    if os.path.isdir(done):
        return done
    overrides = [
        f"teacher.pipeline={shapes_teacher_dir()}",
        "teacher.dtype=fp32",
        f"student.path={os.path.join(student, 'unet')}",
        f"controlnet.teacher={controlnet}",
        f"controlnet.train_unet={str(train_unet).lower()}",
        "data.type=folder",
        f"data.path={train_dir}",
        "data.random_flip=false",
        "data.center_crop=true",
        "data.control=layout",
        f"train.resolution={IMAGE_SIZE}",
        f"train.batch_size={a.batch_size}",
        "train.grad_accum=1",
        f"train.max_steps={a.cn_steps}",
        f"train.lr={a.lr}",
        "train.lr_schedule=cosine",
        f"train.lr_warmup_steps={min(20, a.cn_steps // 10)}",
        "loss.task=1.0",
        "train.caption_dropout=0.1",
        f"train.checkpoint_every={a.cn_steps}",
        "train.keep_checkpoints=1",
        "train.log_every=25",
        f"train.output_dir={run}",
        f"train.cpu_threads={a.threads}",
        f"train.seed={a.seed}",
    ]
    summary = train(load_config("tiny-controlnet", overrides + list(a.override)))
    return summary["controlnet"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controlnet", required=True, help="the teacher's shapes ControlNet (koala lab train-controlnet)")
    p.add_argument("--work", required=True, help="folder for the student, data and runs (reused when there)")
    p.add_argument("--student", default=None, help="a student pipeline dir (default: KD as koala demo, --kd-steps)")
    p.add_argument("--kd-steps", type=int, default=400, help="KD steps of the default student")
    p.add_argument("--num-train", type=int, default=2000, help="shapes training images for ControlNet KD")
    p.add_argument("--cn-steps", type=int, default=200, help="ControlNet KD steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine, warmup)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=("controlnet", "unet"),
        default=["controlnet", "unet"],
        help="row 4 per variant: controlnet = only the ControlNet trains; unet = the student U-Net trains with it",
    )
    p.add_argument("--override", nargs="*", default=[], help="more key=value for the ControlNet KD run")
    p.add_argument("--num", type=int, default=64, help="val scenes scored per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-after", choices=("student", "kd"), default=None, help="stop after this stage")
    p.add_argument("--out", default=os.path.join(HERE, "results", "controlnet-shapes"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    student = a.student or kd_student(a.work, a.kd_steps, a.seed)
    print(f"student {student} ({time.time() - t0:.0f} s)", flush=True)
    if a.stop_after == "student":
        return
    train_dir = shapes_data(a.work, a.num_train, a.seed)
    row3 = transferred(a.work, a.controlnet, student)
    kd = {}
    for v in a.variants:
        t1 = time.time()
        kd[v] = controlnet_kd(a.work, a.controlnet, student, train_dir, a, train_unet=v == "unet")
        print(f"ControlNet KD ({v}): {kd[v]} ({time.time() - t1:.0f} s)", flush=True)
    if a.stop_after == "kd":
        return
    table(a, student, row3, kd, time.time() - t0)


def table(a, student: str, row3: str, kd: dict[str, str], t_prep: float) -> None:
    """Rows 1-4 scored as bench_controlnet_shapes.py scores them (same scenes, seeds and sampler)."""
    sys.path.insert(0, HERE)
    import bench_controlnet_shapes as b
    from koala.lab.models import shapes_teacher_dir

    t0 = time.time()
    teacher, cn = b.load_pipe(shapes_teacher_dir()), b.load_controlnet(a.controlnet)
    rows = [b.measure("teacher + ControlNet", teacher, cn, a.num, a.seed)]
    rows.append(b.measure("teacher without ControlNet (context)", teacher, None, a.num, a.seed))
    pipe = b.load_pipe(student)
    rows.append(b.measure("student without ControlNet", pipe, None, a.num, a.seed))
    rows.append(
        b.measure("student + transferred ControlNet, no training", pipe, b.load_controlnet(row3), a.num, a.seed)
    )
    names = {"controlnet": "ControlNet trained", "unet": "ControlNet and U-Net trained"}
    for v, cn_dir in kd.items():
        kd_pipe = b.load_pipe(_kd_pipeline(a.work, student, os.path.dirname(cn_dir))) if v == "unet" else pipe
        name = f"student + ControlNet after ControlNet KD ({names[v]}, {a.cn_steps} steps)"
        rows.append(b.measure(name, kd_pipe, b.load_controlnet(cn_dir), a.num, a.seed))
    b.write(rows, argparse.Namespace(**{**vars(a), "student": student}), t_prep + time.time() - t0, a.out)


def _kd_pipeline(work: str, student: str, checkpoint: str) -> str:
    """The student pipeline with the U-Net ControlNet KD trained (``controlnet.train_unet=true``)."""
    out = os.path.join(work, "kd-unet-student")
    if not os.path.isdir(out):
        _pipeline_with_unet(student, os.path.join(checkpoint, "unet"), out)
    return out


if __name__ == "__main__":
    main()
