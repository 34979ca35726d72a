"""`koala analyze`: parameter / FLOP / latency dissection, cross-layer similarity and SA PCA of a model."""

from __future__ import annotations

import argparse

from .options import add_dtype_argument

EPILOG = """\
MODEL is a preset (koala presets; built on the meta device for params, with random weights for latency) or a
local directory: a pipeline, a U-Net / DiT transformer, or a student written by koala compress / koala distill
(its koala_layer_map.json puts it next to its teacher). similarity and sa-pca generate images, so their MODEL
is a pipeline directory; --student drops a student into it. Each command writes NAME.png and NAME.json to --out.

examples:
  koala analyze params koala-700m --out analysis/          # Fig. 13 / Table 1: KOALA-700M next to SDXL-Base
  koala analyze params dit-m --resolution 512 --out analysis/
  koala analyze latency sdxl-base --resolution 512 --device cuda --dtype fp16 --out analysis/
  koala analyze similarity teacher-pipeline/ --prompt "a red circle" --student runs/x/checkpoints/step-0000600/unet
  koala analyze sa-pca teacher-pipeline/ --prompt "a red circle to the left of a blue square" --timestep 500
"""


def register(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="look inside a teacher or student: params/FLOPs, latency, similarity, SA PCA",
        description="The paper's analysis instruments (Table 1, Figs. 3, 11, 13) for any supported "
        "model: where the parameters, FLOPs and time are, stage by stage; how similar consecutive "
        "transformer layers are (and a student's layers to its teacher's); what the self-attention "
        "outputs encode (PCA).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    def common(q, help_model: str):
        q.add_argument("model", metavar="MODEL", help=help_model)
        q.add_argument("--out", default="analysis", help="output folder for the PNG and JSON (default: analysis)")

    q = kinds.add_parser("params", help="parameters per stage and component, FLOPs per stage (meta device)")
    common(q, "preset or model/pipeline/student directory")
    q.add_argument("--teacher", default=None, help="compare with this model (default: a student's teacher)")
    q.add_argument("--resolution", type=int, default=1024, help="image size for the FLOP count (default 1024)")
    q.set_defaults(func=run_params)

    q = kinds.add_parser("latency", help="median forward time per stage")
    common(q, "preset (random weights) or model directory")
    q.add_argument("--resolution", type=int, default=512, help="image size (default 512)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    add_dtype_argument(q, default="fp32")
    q.add_argument("--repeats", type=int, default=5, help="timed forwards (default 5; one warm-up first)")
    q.set_defaults(func=run_latency)

    for name, func, helptext in (
        ("similarity", run_similarity, "cosine similarity between transformer layers"),
        ("sa-pca", run_pca, "PCA of self-attention outputs per stage, as RGB"),
    ):
        q = kinds.add_parser(name, help=helptext)
        common(q, "pipeline directory")
        q.add_argument(
            "--prompt",
            action="append",
            required=True,
            help="prompt (similarity: repeat for several; they are averaged)",
        )
        q.add_argument("--student", default=None, help="a student U-Net / transformer directory with its layer map")
        q.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
        q.add_argument("--cfg", type=float, default=3.5, help="guidance scale (default 3.5)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cpu")
        if name == "sa-pca":
            q.add_argument(
                "--timestep", type=float, default=500, help="use the sampling step nearest this (default 500)"
            )
        q.set_defaults(func=func)


def _done(res: dict) -> int:
    print(f"wrote {res['files']['png']} and {res['files']['json']}")
    return 0


def run_params(args) -> int:
    from ..analyze import analyze_params

    res = analyze_params(args.model, args.out, teacher=args.teacher, resolution=args.resolution)
    for name, row in res["models"].items():
        per = ", ".join(f"{s} {n / 1e6:.1f}M" for s, n in row["params_per_stage"].items())
        print(f"{name}: {row['total_params']:,} params, {row['total_flops'] / 1e12:.3f} TFLOPs ({per})")
    return _done(res)


def run_latency(args) -> int:
    from ..analyze import analyze_latency

    res = analyze_latency(
        args.model,
        args.out,
        resolution=args.resolution,
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
    )
    print(", ".join(f"{s} {ms:.1f} ms" for s, ms in res["ms"].items()))
    return _done(res)


def run_similarity(args) -> int:
    from ..analyze import analyze_similarity

    res = analyze_similarity(
        args.model,
        args.out,
        args.prompt,
        student=args.student,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        device=args.device,
    )
    for key, g in res["groups"].items():
        m = g["matrix"]
        nxt = [m[i][i + 1] for i in range(len(m) - 1)]
        if nxt:
            print(f"{key}: consecutive layers {min(nxt):.3f}..{max(nxt):.3f}")
    if "student_vs_teacher" in res:
        vals = [p["cosine"] for p in res["student_vs_teacher"].values()]
        print(f"student vs teacher, {len(vals)} mapped layers: mean cosine {sum(vals) / len(vals):.3f}")
    return _done(res)


def run_pca(args) -> int:
    from ..analyze import analyze_sa_pca

    res = analyze_sa_pca(
        args.model,
        args.out,
        args.prompt[0],
        student=args.student,
        timestep=args.timestep,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        device=args.device,
    )
    print(
        f"timestep {res['timestep']:.0f}: "
        + "; ".join(
            f"{row_name} " + ", ".join(f"{s} {v['grid'][0]}x{v['grid'][1]}" for s, v in row.items())
            for row_name, row in res["rows"].items()
        )
    )
    return _done(res)
