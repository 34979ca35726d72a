"""Research table in the shapes world: which distillation objective recovers a KOALA-700M student best?

Superseded for the U-Net ablations by ``bench_shapes_study.py``, which follows the paper's protocol (no L_outKD in
the Table 3 / 10c ablations, KOALA-1B, 5 seeds). This script keeps the first table (``--table table10``: out-KD on
in every row, as recorded in results/shapes-kd.md) and the DiT Table 8 (``--table table8``), with the training
settings those tables were measured with (lr 1e-4, clipping at 1, weight decay 0.01, one process).

At an equal budget (same steps, batch, lr, data) and for several seeds, distill the compressed shapes
teacher with:
  task-only   L_task                                   (Table 10a "SD-loss" baseline)
  BK          L_task + L_outKD + LF at every stage      (BK-SDM, Table 7)
  SA-KD       L_task + L_outKD + SA-bottom + LF DW-1/UP-3  (KOALA's final recipe, Table 10d)
  SA-bottom   L_task + L_outKD + SA matched to the teacher's bottom layers (Table 10c)
  SA-up       L_task + L_outKD + SA matched to the teacher's top layers    (Table 10c)
then score each student with the shapes scorer (colour / shape / binding / spatial) and report mean ± std.

``--table table8`` runs the paper's Table 8 on a PixArt-topology shapes teacher (``koala lab train-teacher
--family pixart``) instead: the student keeps the bottom half of the DiT's blocks (``--preset``), trained with
L_task + L_outKD + featKD at every block on SA / CA / FFN / LF (BK's block output), plus out-KD only.

    python benchmarks/bench_shapes_kd.py --steps 150 --seeds 0 1 2 --out runs/shapes-kd --json
    benchmarks/results/shapes-kd.json
    python benchmarks/bench_shapes_kd.py --table table8 --teacher runs/shapes-dit-teacher --preset '{"num_layers": 6}'
    \
        --steps 300 --seeds 0 1 2 --out runs/shapes-dit --json benchmarks/results/shapes-dit-table8.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from koala.families import model_dir
from koala.lab.demo import PAPER_TRAINING, DemoSettings, distill, eval_prompts, prepare, score_model

METHODS = {
    "task-only": dict(features="none", out_kd=False),
    "BK (LF all)": dict(features="LF-all", out_kd=True),
    "SA-KD (ours)": dict(features="SA+LF", out_kd=True),
    "SA-bottom": dict(features="SA", out_kd=True, kd_selection="bottom"),
    "SA-up": dict(features="SA", out_kd=True, kd_selection="up"),
}
# Table 8 (DiT): the full objective, featKD at every block on one feature type
METHODS_DIT = {
    "SA": dict(features="SA", out_kd=True),
    "CA": dict(features="CA", out_kd=True),
    "FFN": dict(features="FFN", out_kd=True),
    "LF (BK)": dict(features="LF-all", out_kd=True),
    "out-KD only": dict(features="none", out_kd=True),
}
TABLES = {"table10": METHODS, "table8": METHODS_DIT}
METRICS = ("color", "shape", "binding", "spatial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-eval", type=int, default=64)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument(
        "--table",
        default="table10",
        choices=list(TABLES),
        help="table10: the U-Net objectives (default); table8: feature types of a DiT teacher",
    )
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the table's methods (default: all)")
    ap.add_argument("--teacher", default=None, help="shapes teacher pipeline dir (default: the packaged one)")
    ap.add_argument("--preset", default="koala-700m", help="student preset or JSON spec (default koala-700m)")
    ap.add_argument("--out", default="runs/shapes-kd")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    methods = TABLES[args.table]
    args.methods = args.methods or list(methods)
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        ap.error(f"--methods {unknown}: choose from {list(methods)}")
    base = DemoSettings(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        num_eval=args.num_eval,
        num_train=args.num_train,
        overwrite=True,
        progress=False,
        teacher=args.teacher,
        threads=args.threads,
        preset=args.preset,
        lr=1e-4,
        max_grad_norm=1.0,
        weight_decay=0.01,
        processes=1,
        **PAPER_TRAINING,
    )
    teacher_dir, student_init, train_dir = prepare(base)
    prompts = eval_prompts(base)
    teacher_scores, _ = score_model(base, teacher_dir, None, prompts)
    init_scores, _ = score_model(base, teacher_dir, model_dir(student_init), prompts)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            spec = dict(methods[method])
            s = DemoSettings(**{**base.__dict__, "features": spec.pop("features")})
            unet_dir = distill(
                s, teacher_dir, student_init, train_dir, run_name=f"{method.split()[0]}-s{seed}", seed=seed, **spec
            )
            scores, _ = score_model(s, teacher_dir, unet_dir, prompts)
            runs[method].append(scores)
            print(json.dumps({"method": method, "seed": seed, **scores}), flush=True)

    table = {"settings": vars(args), "teacher": teacher_scores, "student_before_kd": init_scores, "methods": {}}
    print(f"\n| method | {' | '.join(METRICS)} |\n|---|{'---|' * len(METRICS)}")
    print(f"| teacher | {' | '.join(f'{100 * teacher_scores[m]:.1f}' for m in METRICS)} |")
    print(f"| student before KD | {' | '.join(f'{100 * init_scores[m]:.1f}' for m in METRICS)} |")
    for method, rows in runs.items():
        stats = {m: (statistics.mean(r[m] for r in rows), statistics.pstdev(r[m] for r in rows)) for m in METRICS}
        table["methods"][method] = {"runs": rows, **{m: {"mean": a, "std": b} for m, (a, b) in stats.items()}}
        print(f"| {method} | {' | '.join(f'{100 * a:.1f} ± {100 * b:.1f}' for a, b in stats.values())} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
