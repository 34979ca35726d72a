"""`koala app`: a local web page with the teacher and its students side by side (Gradio)."""

from __future__ import annotations

import argparse
import os

from .options import add_dtype_argument

EPILOG = """\
with no model arguments the page runs offline on the packaged shapes world: the shapes teacher and the
`koala demo` student (from --demo-dir, default ./koala-demo), or a freshly compressed untrained student when
there is none; the shapes scorer's verdict is shown under each image.

examples:
  koala app                                                     # shapes world, http://127.0.0.1:7860
  koala app --model sdxl-base-dir --model koala-700m-dir --dtype fp16
  koala app --model sdxl-base-dir --unet runs/koala-700m/checkpoints/step-0005000/unet --base sdxl-base-dir
"""


def register(sub) -> None:
    p = sub.add_parser(
        "app",
        help="local web page: teacher and students side by side (Gradio; pip install 'koala-diffusion[app]')",
        description="Load a teacher and one or more students once, then generate a prompt with each of them (same "
        "seed, each model's own sampling defaults: a student's recorded ones, else the paper's Euler, 10 steps, cfg "
        "3.5; the page's steps / guidance fields override them) and show the images side by side with U-Net "
        "parameters, latency per image, peak memory and the settings used. Requests wait in a queue, first come "
        "first served (--concurrency, --queue-size). Listens on localhost.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR",
        help="a pipeline directory (teacher or student); repeat for more models",
    )
    p.add_argument(
        "--unet",
        action="append",
        default=[],
        metavar="DIR",
        help="a student U-Net / DiT directory, dropped into --base; repeat for more students",
    )
    p.add_argument(
        "--base",
        action="append",
        default=[],
        metavar="DIR",
        help="the teacher pipeline for --unet: once for all of them, or once per --unet",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="a VAE directory every model decodes with in place of its own (e.g. a tiny AutoencoderTiny from "
        "`koala vae distill`; it must fit the models' latents)",
    )
    p.add_argument("--demo-dir", default="koala-demo", help="where `koala demo` wrote its student (no-argument mode)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add_dtype_argument(p, help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests generated at once (default 1); each model still takes one at a time, so with 2+ a request "
        "uses one model while the next uses another",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="requests that may wait (default 16); one more is refused at once ('This application is currently "
        "busy' on its page)",
    )
    p.set_defaults(func=run)


def specs_from_args(args):
    from ..app import ModelSpec
    from ..errors import KoalaError

    specs = [ModelSpec(os.path.basename(os.path.normpath(m)) or m, model=m) for m in args.model]
    if args.unet:
        if len(args.base) not in (1, len(args.unet)):
            raise KoalaError(
                f"give --base once (for every --unet) or once per --unet ({len(args.unet)} --unet, "
                f"{len(args.base)} --base)",
                option="base",
            )
        bases = args.base * len(args.unet) if len(args.base) == 1 else args.base
        for u, b in zip(args.unet, bases):
            norm = os.path.normpath(u)
            label = os.path.join(os.path.basename(os.path.dirname(norm)), os.path.basename(norm))
            specs.append(ModelSpec(label, unet=u, base=b))
    elif args.base:
        raise KoalaError("--base goes with --unet (a student U-Net to put into that pipeline)", option="base")
    return specs


def run(args) -> int:
    from ..utils.extras import require

    require("gradio", "app", "koala app")
    from ..app.ui import check_queue, default_specs, serve

    check_queue(args.concurrency, args.queue_size)
    specs = specs_from_args(args)
    shapes = not specs
    if shapes:
        specs = default_specs(args.demo_dir)
    if args.vae:
        from dataclasses import replace

        name = os.path.basename(os.path.normpath(args.vae))
        specs = [replace(s, vae=args.vae, label=f"{s.label} + {name}") for s in specs]
    print(f"koala app: http://{args.host}:{args.port} (Ctrl+C stops it)")
    serve(
        specs,
        host=args.host,
        port=args.port,
        share=args.share,
        device=args.device,
        dtype=args.dtype,
        score=shapes,
        block=True,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
    )
    return 0
