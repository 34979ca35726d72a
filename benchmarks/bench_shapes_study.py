"""The paper's KD ablations, redone in the shapes world with the paper's protocol (issue 12, part 4).

Student: KOALA-1B topology compressed from the packaged shapes teacher (the paper ablates KOALA-1B; it keeps the
mid block, so Table 3b has a MID row). Every run starts from the same compressed student and differs only in the
objective and the training seed. Tables:

  3a   L_task + L_featKD (NO L_outKD), one feature type at every stage: SA, CA, Res, FFN, LF; and task only
  3b   L_task + L_featKD (NO L_outKD), SA at one stage: DW-2, DW-3, MID, UP-1, UP-2
  10c  L_task + L_featKD (NO L_outKD), SA everywhere, the student's transformer layers initialised from AND
       matched to the teacher's bottom / interleaved / top layers (bottom is 3a's SA run: same init, same pairs)
  7    the full objective L_task + L_outKD + L_featKD: BK (LF at every stage) vs ours (SA + LF at DW-1 / UP-3)

Each run saves checkpoints at ``--eval-at`` steps and scores each one with the shapes scorer (colour / shape /
binding / spatial accuracy; the same held-out prompts and sampling noise for every model, Euler 20 steps, cfg 5).
Finished (method, seed, step) scores are appended to a JSON-lines file, so a killed run resumes where it stopped
and several processes can share the seeds (one file each)::

    python benchmarks/bench_shapes_study.py run --seeds 0 1 2 --runs runs/study/a.jsonl
    python benchmarks/bench_shapes_study.py run --seeds 3 4 --runs runs/study/b.jsonl      # the other core
    python benchmarks/bench_shapes_study.py report runs/study/a.jsonl runs/study/b.jsonl \\
        --md benchmarks/results/shapes-study.md --json benchmarks/results/shapes-study.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import time
import zlib

METRICS = ("color", "shape", "binding", "spatial")
NO_OUT = dict(out_kd=False)
TABLES: dict[str, dict[str, dict]] = {
    "3a": {
        "task only": dict(features={}, **NO_OUT),
        "SA": dict(features={"SA": "all"}, **NO_OUT),
        "CA": dict(features={"CA": "all"}, **NO_OUT),
        "Res": dict(features={"Res": "all"}, **NO_OUT),
        "FFN": dict(features={"FFN": "all"}, **NO_OUT),
        "LF": dict(features={"LF": "all"}, **NO_OUT),
    },
    "3b": {f"SA {st}": dict(features={"SA": [st]}, **NO_OUT) for st in ("DW-2", "DW-3", "MID", "UP-1", "UP-2")},
    "10c": {
        "SA-bottom": dict(features={"SA": "all"}, **NO_OUT),  # the compressed student is bottom-initialised
        "SA-interleave": dict(features={"SA": "all"}, kd_selection="interleave", **NO_OUT),
        "SA-up": dict(features={"SA": "all"}, kd_selection="up", **NO_OUT),
    },
    "7": {
        "BK (LF all)": dict(features={"LF": "all"}, out_kd=True),
        "Ours (SA + LF DW-1/UP-3)": dict(features={"SA": "all", "LF": ["first", "last"]}, out_kd=True),
    },
}
# the paper's numbers (HPSv2 for Tables 3 / 10c; HPSv2 and CompBench for Table 7, KOALA-1B rows)
PAPER = {
    "3a": {"task only": 25.53, "SA": 26.74, "CA": 26.11, "Res": 26.27, "FFN": 26.48, "LF": 26.63},
    "3b": {"SA DW-2": 25.32, "SA DW-3": 25.57, "SA MID": 25.66, "SA UP-1": 26.52, "SA UP-2": 26.05},
    "10c": {"SA-bottom": 26.74, "SA-interleave": 26.58, "SA-up": 26.48},
    "7": {"BK (LF all)": "27.01 / 0.3599", "Ours (SA + LF DW-1/UP-3)": "27.15 / 0.3712"},
}
TITLES = {
    "3a": "Table 3a: feature type (L_task + L_featKD, no L_outKD; paper: HPSv2)",
    "3b": "Table 3b: SA at one stage (L_task + L_featKD, no L_outKD; paper: HPSv2)",
    "10c": "Table 10c: which teacher layers initialise and supervise the student's SA (no L_outKD; paper: HPSv2)",
    "7": "Table 7: ours vs BK, full objective L_task + L_outKD + L_featKD (paper: HPSv2 / CompBench, KOALA-1B)",
}


def method_key(spec: dict) -> str:
    """Runs with the same objective share one key (3a's SA run is 10c's SA-bottom run)."""
    return json.dumps(
        {"features": spec["features"], "out_kd": spec["out_kd"], "kd_selection": spec.get("kd_selection")},
        sort_keys=True,
    )


def read_runs(paths: list[str]) -> list[dict]:
    from koala.utils.files import read_jsonl

    return [r for p in paths if os.path.isfile(p) for r in read_jsonl(p)]


def cmd_run(args) -> None:
    import torch

    from koala.families import model_dir
    from koala.lab.demo import (
        PAPER_TRAINING,
        DemoSettings,
        _quiet_libraries,
        distill,
        eval_prompts,
        prepare,
        score_model,
    )

    torch.set_num_threads(args.threads)
    _quiet_libraries()
    base = DemoSettings(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        num_eval=args.num_eval,
        num_train=args.num_train,
        progress=False,
        preset=args.preset,
        threads=args.threads,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        processes=1,
        overwrite=True,
        teacher=args.teacher,
        **PAPER_TRAINING,
    )  # the paper's objective and optimiser, as the study ran
    marker = os.path.join(args.out, "prepared.json")
    if not os.path.isfile(marker):
        teacher_dir, student_init, train_dir = prepare(base)
        with open(marker, "w") as f:
            json.dump({"teacher": teacher_dir, "student_init": student_init, "train": train_dir}, f)
    with open(marker) as f:
        prep = json.load(f)
    teacher_dir, student_init, train_dir = prep["teacher"], prep["student_init"], prep["train"]
    prompts = eval_prompts(base)
    done = {(r["key"], r.get("seed"), r.get("step")) for r in read_runs([args.runs])}
    os.makedirs(os.path.dirname(os.path.abspath(args.runs)), exist_ok=True)

    def record(row: dict) -> None:
        with open(args.runs, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "num_eval", "num_train", "preset")}
    settings["teacher"] = args.teacher or "the packaged shapes teacher"
    for name, unet in (("teacher", None), ("student before KD", model_dir(student_init))):
        if args.reference and (name, None, None) not in done:
            scores, _ = score_model(base, teacher_dir, unet, prompts)
            record({"key": name, "seed": None, "step": None, **scores, "settings": settings})
    wanted = {}
    for table in args.tables:
        for spec in TABLES[table].values():
            wanted.setdefault(method_key(spec), spec)
    every = math.gcd(*args.eval_at)
    for seed, (key, spec) in itertools.product(args.seeds, wanted.items()):
        if all((key, seed, step) in done for step in args.eval_at):
            continue
        spec = dict(spec)
        s = DemoSettings(**{**base.__dict__, "features": spec.pop("features")})
        run_name = f"run-s{seed}-{zlib.crc32(key.encode()):08x}"
        t0 = time.time()
        distill(
            s,
            teacher_dir,
            student_init,
            train_dir,
            run_name=run_name,
            seed=seed,
            extra=[f"train.checkpoint_every={every}", "train.keep_checkpoints=0"],
            **spec,
        )
        train_s = time.time() - t0
        for step in args.eval_at:
            ck = os.path.join(args.out, run_name, "checkpoints", f"step-{step:07d}")
            scores, _ = score_model(s, teacher_dir, os.path.join(ck, "unet"), prompts)
            row = {
                "key": key,
                "seed": seed,
                "step": step,
                **scores,
                "train_s": round(train_s, 1),
                "settings": settings,
            }
            record(row)
            print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
        shutil.rmtree(os.path.join(args.out, run_name), ignore_errors=True)


def _stats(rows: list[dict]) -> dict:
    return {
        m: (statistics.mean(r[m] for r in rows), statistics.pstdev(r[m] for r in rows) if len(rows) > 1 else 0.0)
        for m in METRICS
    }


def _ranks(means: dict[str, float]) -> list[str]:
    return sorted(means, key=lambda k: -means[k])


def kendall_tau(a: dict[str, float], b: dict[str, float]) -> float:
    """Rank agreement of two scorings of the same methods: 1 same order, -1 reversed (ties count 0)."""
    keys = [k for k in a if k in b]
    pairs = list(itertools.combinations(keys, 2))
    if not pairs:
        return float("nan")

    def sign(x):
        return (x > 0) - (x < 0)

    return sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def budget_steps(steps: int, eval_at: list[int] | None = None) -> list[int]:
    """The budget checkpoints a run is scored at: ``eval_at``, or 200, 500 and the final step (those below
    ``steps``); always ending at ``steps``."""
    wanted = eval_at if eval_at else [200, 500]
    return sorted({st for st in wanted if 0 < st < steps} | {steps})


def budget_taus(per_step: dict[int, dict[str, float]], paper: dict[str, float] | None = None) -> dict[str, float]:
    """Kendall tau of the methods' orderings between budgets (each step vs the next, and the first vs the final)
    and, with ``paper``, of each budget's ordering against the paper's. Keys ``"200->500"``, ``"paper@500"``."""
    steps = sorted(st for st in per_step if len(per_step[st]) > 1)
    out = {}
    pairs = list(zip(steps, steps[1:])) + ([(steps[0], steps[-1])] if len(steps) > 2 else [])
    for a, b in pairs:
        out[f"{a}->{b}"] = kendall_tau(per_step[a], per_step[b])
    for st in steps if paper else []:
        out[f"paper@{st}"] = kendall_tau(paper, per_step[st])
    return out


def cmd_report(args) -> None:
    rows = read_runs(args.runs)
    ref = {r["key"]: r for r in rows if r["seed"] is None}
    steps = sorted({r["step"] for r in rows if r["step"] is not None})
    settings = next((r["settings"] for r in rows if "settings" in r), {})
    final = steps[-1]
    out: dict = {"settings": settings, "steps": steps, "reference": ref, "tables": {}}
    md = ["# Shapes-world study of the paper's KD ablations (benchmarks/bench_shapes_study.py)", ""]
    md += [
        f"KOALA-1B-topology student ({settings.get('preset')}) compressed from "
        f"{settings.get('teacher', 'the packaged shapes teacher')}, distilled "
        f"{final} steps at batch {settings.get('batch_size')}, lr {settings.get('lr')} (AdamW, constant, no clipping, "
        f"no weight decay, no EMA: the paper's settings), on {settings.get('num_train')} shapes images. Scored on "
        f"{settings.get('num_eval')} held-out prompts (Euler 20 steps, cfg 5; the same prompts and noise for every "
        "model) with the shapes scorer. Mean ± std (population) over training seeds; accuracies in %.",
        "",
    ]
    if ref:
        md += ["| reference | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        md += [f"| {k} | " + " | ".join(f"{100 * r[m]:.1f}" for m in METRICS) + " |" for k, r in ref.items()]
        md.append("")
    for table in args.tables:
        methods = TABLES[table]
        tout: dict = {}
        notes = out["tables"][table] = {"methods": tout}
        md += [
            f"## {TITLES[table]}",
            "",
            "| method | seeds | "
            + " | ".join(METRICS)
            + "".join(f" | binding @ {st}" for st in steps[:-1])
            + " | paper |",
            "|---|---|" + "---|" * (len(METRICS) + len(steps) - 1) + "---|",
        ]
        per_step: dict[str, dict[int, dict[str, float]]] = {
            m: {st: {} for st in steps} for m in ("binding", "spatial")
        }
        for name, spec in methods.items():
            key = method_key(spec)
            by_step = {st: [r for r in rows if r["key"] == key and r["step"] == st] for st in steps}
            if not by_step[final]:
                continue
            st_final = _stats(by_step[final])
            early = [_stats(by_step[st])["binding"][0] if by_step[st] else None for st in steps[:-1]]
            for st in steps:
                if by_step[st]:
                    for m in per_step:
                        per_step[m][st][name] = _stats(by_step[st])[m][0]
            tout[name] = {
                "seeds": sorted(r["seed"] for r in by_step[final]),
                **{m: {"mean": a, "std": b} for m, (a, b) in st_final.items()},
                "runs": by_step[final],
                "paper": PAPER[table].get(name),
            }
            md.append(
                f"| {name} | {len(by_step[final])} | "
                + " | ".join(f"{100 * a:.1f} ± {100 * b:.1f}" for a, b in st_final.values())
                + "".join(f" | {100 * e:.1f}" if e is not None else " | -" for e in early)
                + f" | {PAPER[table].get(name, '-')} |"
            )
        md.append("")
        if len(tout) > 1:
            paper_nums = {k: v for k, v in PAPER[table].items() if isinstance(v, float) and k in tout}
            if paper_nums:
                md.append("Paper's ordering (HPSv2): " + " > ".join(_ranks(paper_nums)) + ".  ")
            for m in per_step:
                taus = notes[f"kendall_tau_{m}"] = budget_taus(per_step[m], paper_nums)
                md.append(
                    f"Ordering by {m}: "
                    + "; ".join(f"at {st}: " + " > ".join(_ranks(per_step[m][st])) for st in steps if per_step[m][st])
                    + ". Kendall tau "
                    + ", ".join(f"{k} {v:+.2f}" for k, v in taus.items())
                    + ".  "
                )
            sig = []
            for a, b in itertools.combinations(tout, 2):
                if min(len(tout[a]["seeds"]), len(tout[b]["seeds"])) < 2:
                    continue
                for m in METRICS:
                    d = tout[a][m]["mean"] - tout[b][m]["mean"]
                    if abs(d) > 2 * max(tout[a][m]["std"], tout[b][m]["std"]):
                        hi, lo = (a, b) if d > 0 else (b, a)
                        sig.append(f"{hi} > {lo} on {m} ({100 * abs(d):.1f} points)")
            notes["exceeds_2std"] = sig
            notes["ordering_binding"] = _ranks(per_step["binding"][final])
            notes["ordering_spatial"] = _ranks(per_step["spatial"][final])
            md.append(
                "Differences larger than 2 std (the larger of the two methods' stds): "
                + ("; ".join(sig) if sig else "none")
                + "."
            )
            md.append("")
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(md) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and score the runs not yet in --runs")
    r.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument(
        "--eval-at", type=int, nargs="+", default=None, help="budget checkpoints scored (default: 200, 500, end)"
    )
    r.add_argument("--teacher", default=None, help="shapes teacher pipeline dir (default: the packaged one)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=3e-4)
    r.add_argument("--max-grad-norm", type=float, default=0.0, help="0: no clipping (the paper's)")
    r.add_argument("--weight-decay", type=float, default=0.0)
    r.add_argument("--num-eval", type=int, default=96)
    r.add_argument("--num-train", type=int, default=2000)
    r.add_argument("--preset", default="koala-1b")
    r.add_argument("--out", default="runs/shapes-study")
    r.add_argument("--runs", default="runs/shapes-study/runs.jsonl", help="JSON-lines file of finished scores")
    r.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="do not score the teacher and the student before KD (another process does)",
    )
    r.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("report", help="tables (markdown + JSON) from one or more --runs files")
    p.add_argument("runs", nargs="+")
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    p.add_argument("--md", default=None)
    p.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cmd == "run":
        if args.eval_at and max(args.eval_at) > args.steps:
            ap.error("--eval-at: every budget checkpoint must be at most --steps")
        args.eval_at = budget_steps(args.steps, args.eval_at)
        cmd_run(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
