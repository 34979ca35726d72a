"""`koala plan`: per-device memory of a distillation recipe before training (also `koala distill --plan`)."""

from __future__ import annotations

import argparse

EPILOG = """\
The state (student weights, AdamW moments, EMA, frozen teacher, text encoders and VAE) is counted from parameter
counts; the training step (teacher forward with feature hooks, student forward, losses, backward) is run on
PyTorch's meta device and every tensor it allocates is followed, so activations, saved tensors, feature buffers
and gradients are counted at the recipe's resolution, batch, features and gradient checkpointing (attention as
a fused flash/memory-efficient kernel; autocast emulated for train.mixed_precision). Nothing is allocated; a
real-size plan takes seconds on a CPU. Not counted: the CUDA context and allocator fragmentation (--device-gib
keeps 10% for them), torch.compile workspaces, host memory.

Checked against measured peaks: benchmarks/results/h200/README.md (SDXL teacher, KOALA-700M/1B, 1024px x 8).

examples:
  koala plan --config koala-lightning-700m --teacher sdxl-base --device-gib 80 train.batch_size=8
  koala plan --teacher sdxl-base --device-gib 24 train.gradient_checkpointing=true train.mixed_precision=bf16
  koala distill --config my.yaml --plan --device-gib 80      # the recipe's teacher.pipeline
"""


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="how much memory a distillation recipe needs per device, before training",
        description="Estimate the per-device memory of `koala distill` with a recipe: weights, "
        "gradients, optimizer states, EMA, teacher, encoders, and the training step's activations "
        "and feature buffers, and whether it fits a device.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", default=None, help="recipe YAML file or shipped recipe name (default: the schema's defaults)"
    )
    add_plan_arguments(p, teacher=True)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=8")
    p.set_defaults(func=run)


def add_plan_arguments(p, teacher: bool) -> None:
    if teacher:
        p.add_argument(
            "--teacher",
            default=None,
            help="teacher preset (sdxl-base, sd-v1, ...; no weights needed) or pipeline directory; "
            "default: the recipe's teacher.pipeline",
        )
    p.add_argument(
        "--device-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="device memory in GiB (e.g. 80 for an H100/A100-80GB, 24 for a 4090): say whether it fits",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes (with train.shard_optimizer=true each keeps 1/N of the optimizer "
        "states; with train.fsdp=grad_op also of the gradients and EMA, with train.fsdp=full of the "
        "weights too; default 1)",
    )
    p.add_argument("--plan-json", default=None, metavar="FILE", help="write the plan (schema koala-plan/1)")


def show_plan(cfg, teacher, args) -> int:
    import json

    from ..bench.plan import plan_markdown, plan_memory
    from ..utils.files import atomic_write_text

    plan = plan_memory(cfg, teacher=teacher, device_gib=args.device_gib, processes=args.processes)
    print(plan_markdown(plan), end="")
    if args.plan_json:
        atomic_write_text(args.plan_json, json.dumps(plan, indent=1) + "\n")
        print(f"wrote {args.plan_json}")
    return 0 if plan.get("fits", True) else 1


def run(args) -> int:
    from ..distill.config import load_config

    return show_plan(load_config(args.config, list(args.overrides)), args.teacher, args)
