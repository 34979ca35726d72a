"""`koala distill`: train a KOALA student with self-attention knowledge distillation from a YAML recipe."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  koala lab make-tiny runs/tiny-pipeline && koala distill --config tiny   # CPU smoke run
  koala distill --config koala-lightning-700m teacher.pipeline=/models/sdxl \\
      teacher.unet_path=/models/sdxl_lightning_4step_unet.safetensors data.type=webdataset
      data.path='shards/{00000..00099}.tar'
  koala distill --config tiny --resume latest train.max_steps=40
  koala distill --config tiny data.type=folder data.path=images/   # images + metadata.jsonl or sidecar .txt
  koala distill --config koala-lightning-1b data.type=cache data.path=cache/  # from `koala cache` (same pipeline)
  koala distill --config tiny kd.features="{CA: all}"           # Table 3a: distill cross-attention instead
  koala distill --config tiny kd.features="{SA: [UP-1]}"        # Table 3b: a single stage
  koala distill --config tiny kd.layer_selection=interleave     # Table 10c: SA-interleave (init and match)
  koala distill --config tiny --print-config                    # show the resolved config and exit
  koala lab make-tiny runs/tiny-pixart --family pixart && koala distill --config tiny-dit   # PixArt DiT smoke run
  koala distill --config tiny-dit kd.features="{CA: all}"       # Table 8: cross-attention features in a DiT
  accelerate launch --num_processes 4 -m koala.cli distill --config koala-lightning-1b ...
"""


def epilog() -> str:
    """The --help epilog: built only when help is printed (it imports the config schema, which imports torch)."""
    from ..data.config import TYPES
    from ..distill.config import FEATURE_LOSSES, FEATURE_TYPES, LAYER_SELECTIONS, MIXED_PRECISION, OPTIMIZERS
    from ..recipes import shipped_recipes

    return (
        EXAMPLES
        + f"""
recipes: a YAML file path, or a shipped recipe name: {", ".join(shipped_recipes())}
  (./configs/NAME.yaml in the current directory overrides a shipped one). A recipe may start with
  `extends: NAME_OR_PATH` (a shipped name, or a path relative to the recipe) and set only what differs;
  kd.features is replaced as a whole, other sections are merged key by key.

overrides are key=value with dotted keys and YAML values (applied after the recipe), e.g. train.lr=2e-5,
  train.resume=null, kd.features="{{SA: all}}". Unknown keys and wrong types are refused.
  Main keys (schema and defaults in koala/distill/config.py; see them all with `--config tiny --print-config`):
  teacher.pipeline, teacher.unet_path, teacher.family (null = detect; sdxl | sd | pixart), teacher.dtype
  student.path | student.preset (a name or a spec mapping, e.g. {{num_layers: 10}}), student.layer_selection
  ({" | ".join(LAYER_SELECTIONS)})
  kd.features {{TYPE: all | [stages]}} (types {" ".join(FEATURE_TYPES)}; stage names depend on the model family,
        e.g. DW-1..3 MID UP-1..3 for SDXL, DW-1..4 MID UP-1..4 for SD-1.x, B-1..B-n (one per block) for a DiT;
        first / last; ranges A..B), kd.feature_loss ({" | ".join(FEATURE_LOSSES)}),
        kd.layer_selection (null | {" | ".join(LAYER_SELECTIONS)}): null matches each student transformer layer with
        the teacher layer the saved layer map initialised it from (koala_layer_map.json); a value initialises the
        student from those teacher layers and matches it with them (Table 10c); a student.path compressed with
        another --layer-selection is refused
  loss.task / loss.out / loss.feat (lambda weights)
  data.type ({" | ".join(TYPES)}), data.path (synthetic: num_samples, captions, size), and the other koala.data
        keys (caption_column, syncap_column, buckets, min_size, ...; see koala/data/config.py)
  train.output_dir, resolution, batch_size, grad_accum, max_steps, lr, optimizer ({" | ".join(OPTIMIZERS)}),
        mixed_precision ({" | ".join(MIXED_PRECISION)}), caption_dropout, gradient_checkpointing, max_grad_norm,
        ema.enabled, ema.decay, checkpoint_every, resume, allow_world_size_change, collective_timeout (seconds a
        process waits for the others before the run stops naming the stuck rank), log_with (tensorboard | wandb | none)
  validation.every, prompts, seeds, steps, guidance_scale
"""
    )


class _Help(argparse.RawDescriptionHelpFormatter):
    def add_text(self, text):
        super().add_text(epilog() if text is _EPILOG else text)


_EPILOG = object()  # placeholder: _Help puts epilog() there


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a compressed student from its teacher (SDXL or SD-1.x; L_task + L_outKD + L_featKD)",
        description="Train a KOALA student U-Net with the paper's objective: task loss + output KD + feature KD on "
        "self-attention features (SA-bottom) and the last feature of the first encoder / last decoder stage "
        "(DW-1/UP-3 "
        "on SDXL) by default. The teacher's family (SDXL, SD-1.x/2.x) is detected from teacher.pipeline. The "
        "student is compressed from the teacher on the fly (student.preset) or loaded from a `koala compress` output "
        "(student.path). Checkpoints are diffusers U-Nets with koala_layer_map.json under OUTPUT/checkpoints/.",
        epilog=_EPILOG,
        formatter_class=_Help,
    )
    p.add_argument(
        "--config",
        default=None,
        help="recipe YAML file, or a shipped recipe name (e.g. tiny, koala-lightning-700m; listed below)",
    )
    p.add_argument(
        "--resume", default=None, help="'latest' (newest checkpoint in train.output_dir, if any) or a checkpoint dir"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the per-device memory plan (see `koala plan`) and exit "
        "without training; exit status 1 if --device-gib is given and it does not fit",
    )
    from .plan import add_plan_arguments

    add_plan_arguments(p, teacher=False)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=2e-5 train.max_steps=100"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distill.config import load_config
    from ..recipes import dump_recipe

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_recipe(cfg), end="")
        return 0
    if args.plan:
        from .plan import show_plan

        return show_plan(cfg, None, args)
    from ..data.images import SkipCounter
    from ..distill.trainer import train

    summary = train(cfg)
    if summary.get("preempted"):
        from ..utils.signals import PREEMPTED_EXIT

        print(
            f"koala distill [rank {summary['rank']}/{summary['world_size']}]: stopped by {summary['preempted']} "
            f"at step {summary['step']}; checkpoint {summary['checkpoint']}. Continue exactly with --resume latest.",
            flush=True,
        )
        return PREEMPTED_EXIT
    skipped = summary.get("data_skipped") or {}
    data = f"; data: {SkipCounter(skipped).summary()}" if skipped else ""
    cn = f"; student ControlNet {summary['controlnet']}" if summary.get("controlnet") else ""
    print(
        f"koala distill [rank {summary['rank']}/{summary['world_size']}]: finished at step {summary['step']}; "
        f"checkpoint {summary['checkpoint']}{cn}{data}",
        flush=True,
    )
    return 0
