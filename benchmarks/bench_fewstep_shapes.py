"""Few-step students in the shapes world (issue 28): `koala demo --few-step` over several seeds, and the plain demo
once for the time ratio, on this machine in one sitting.

For each seed the demo compresses the shapes teacher, distills it with SA-KD, runs the step stage from the KD
student and scores every row on the same held-out prompts: the teacher (20 Euler steps, cfg 5), the KD student at
20 / 4 / 2 / 1 steps (what a user gets by asking it for fewer steps) and the few-step student at 4 / 2 / 1 steps
of its recorded sampler (cfg 1). The script prints and writes (``--out``, markdown next to it) the binding accuracy
per row and seed, the mean and the spread, the goals (at 4 steps: >= 10 points over the KD student, within 20 of
the teacher) and the minutes of both demos (wall clock, and CPU time of the demo and its processes: a steadier
ratio on a machine other work shares)::

    python benchmarks/bench_fewstep_shapes.py --seeds 0 1 2 --out benchmarks/results/fewstep-shapes.json

``--reuse`` takes a seed's finished run from ``--base`` instead of running it again, so the seeds can run in
separate sittings (the time ratio then compares the plain demo with the few-step run of the first seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished child processes."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def run_seed(seed: int, base: str, few_step: bool, reuse: bool = False, **kw) -> dict:
    from koala.lab.demo import DemoSettings, run_demo

    out = os.path.join(base, f"{'few' if few_step else 'plain'}-seed{seed}")
    done = os.path.join(out, "bench-run.json")
    if reuse and os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    s = DemoSettings(out=out, seed=seed, few_step=few_step, overwrite=True, progress=False, **kw)
    t0, c0 = time.time(), _cpu_s()
    res = run_demo(s, log=lambda *_: None)
    res.update(wall_s=round(time.time() - t0, 1), cpu_s=round(_cpu_s() - c0, 1), finished=time.strftime("%F %T"))
    with open(done, "w") as f:
        json.dump(res, f, indent=1)
    return res


def table(results: list[dict]) -> tuple[list[str], dict]:
    """Markdown lines: binding per row (model) and seed, mean and spread; and the means by row name."""
    names = [r["model"] for r in results[0]["rows"]]
    seeds = [r["settings"]["seed"] for r in results]
    lines = [
        "| row | stage | steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |",
        "|---|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    means = {}
    for i, name in enumerate(names):
        vals = [100 * r["rows"][i]["binding"] for r in results]
        row = results[0]["rows"][i]
        means[name] = statistics.mean(vals)
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        cells = " | ".join(f"{v:.1f}" for v in vals)
        lines.append(
            f"| {name} | {row['stage']} | {row['sample_steps']} | {cells} | {means[name]:.1f} | ±{spread:.1f} |"
        )
    return lines, means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base", default="runs/fewstep-shapes", help="folder for the demo runs")
    ap.add_argument("--out", default="benchmarks/results/fewstep-shapes.json")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain demo (no time ratio)")
    ap.add_argument("--reuse", action="store_true", help="take finished runs from --base instead of rerunning them")
    args = ap.parse_args()

    few = [run_seed(seed, args.base, True, args.reuse) for seed in args.seeds]
    plain = None if args.no_plain else run_seed(args.seeds[0], args.base, False, args.reuse)
    lines, means = table(few)
    kd4, few4 = means["student, after KD, 4 steps"], means["few-step student, 4 steps"]
    teacher = means["teacher"]
    s = few[0]["settings"]
    head = [
        "# Few-step students in the shapes world (`koala demo --few-step`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Command: "
        f"`python benchmarks/bench_fewstep_shapes.py --seeds {' '.join(map(str, args.seeds))}`. Step stage: "
        f"{s['fewstep_method']}, {s['fewstep_steps']} steps, lr {s['fewstep_lr']:g}, step teacher "
        f"{s['fewstep_teacher']}, guidance {s['fewstep_guidance']:g}. Binding accuracy (%) on {s['num_eval']} "
        "held-out prompts per row; the teacher and KD rows are Euler at cfg 5, the few-step rows the student's "
        "recorded sampler (LCMScheduler) at cfg 1.",
        "",
        *lines,
        "",
        f"- At 4 steps: few-step student {few4:.1f} vs KD student {kd4:.1f} ({few4 - kd4:+.1f} points; goal >= +10) "
        f"and the teacher {teacher:.1f} ({few4 - teacher:+.1f}; goal within 20).",
    ]
    if plain is not None:
        ratio = few[0]["wall_s"] / plain["wall_s"]
        cpu = few[0]["cpu_s"] / plain["cpu_s"] if "cpu_s" in plain and "cpu_s" in few[0] else float("nan")
        head.append(
            f"- Time, seed {args.seeds[0]}: `koala demo --few-step` {few[0]['wall_s'] / 60:.1f} min, "
            f"`koala demo` {plain['wall_s'] / 60:.1f} min: ratio {ratio:.2f} (goal <= 2); CPU time ratio "
            f"{cpu:.2f} (finished {few[0].get('finished', '?')} and {plain.get('finished', '?')})."
        )
    text = "\n".join(head) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"few_step": few, "plain": plain, "means": means}, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
