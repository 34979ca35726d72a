"""`koala vae distill`: train a tiny VAE decoder (diffusers AutoencoderTiny, TAESD architecture) for a teacher."""

from __future__ import annotations

import argparse

EPILOG = """\
The tiny VAE learns to reproduce the teacher VAE's decodes of the denoiser's (scaled) latents: images from
data.* are encoded by the teacher (or latents come from a `koala cache` folder, data.type=cache), the teacher
decodes them, and the AutoencoderTiny's decode is trained to match (loss.l1 * L1 + loss.l2 * MSE on pixels).
model.encoder=true also trains the tiny encoder (MSE to the teacher's scaled latents). Latent channels and the
downsampling factor come from the teacher; a tiny VAE of another latent size (model.init) is refused.

OUT ends up an AutoencoderTiny directory (AutoencoderTiny.from_pretrained(OUT); `koala generate --vae OUT`,
`koala bench --vae OUT`, `koala app --vae OUT`) with a model card; checkpoints go to OUT/checkpoints/ and
--resume latest continues a stopped run exactly.

recipes: tiny-vae (CPU smoke, about a minute), sdxl-tiny-vae (SDXL's VAE; settings and sources in the file).
keys (defaults in koala/distill/vae/config.py; see them with --print-config):
  model.decoder_channels, model.decoder_blocks (one per stage; as many stages as the teacher VAE),
  model.encoder, model.encoder_channels, model.encoder_blocks, model.act_fn, model.init
  loss.l1, loss.l2, loss.latent
  data.type, data.path, ... (koala.data keys, as for `koala distill`)
  train.resolution, batch_size, max_steps, lr, lr_schedule, lr_warmup_steps, weight_decay, max_grad_norm,
  latent (sample | mean), teacher_dtype, device, seed, checkpoint_every, keep_checkpoints, resume, cpu_threads

examples:
  koala lab make-tiny runs/tiny-pipeline && koala vae distill --config tiny-vae
  koala vae distill --teacher /models/sdxl-base --out runs/sdxl-tiny-vae --config sdxl-tiny-vae \\
      data.type=folder data.path=images/
  koala vae distill --config tiny-vae --resume latest
  koala generate "a red circle" --model runs/tiny-pipeline --vae runs/tiny-vae
"""


def register(sub) -> None:
    p = sub.add_parser("vae", help="tiny VAE decoders: `koala vae distill`")
    modes = p.add_subparsers(dest="vae_mode", metavar="distill", required=True)
    d = modes.add_parser(
        "distill",
        help="train a tiny VAE (AutoencoderTiny / TAESD) to reproduce a teacher VAE's decodes",
        description="Distill a teacher pipeline's VAE (AutoencoderKL) into a diffusers AutoencoderTiny: the "
        "decoder always, the encoder optionally.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--teacher", default=None, help="teacher pipeline directory (its vae/) or AutoencoderKL directory")
    d.add_argument("--out", default=None, help="output AutoencoderTiny directory (also holds the run's checkpoints)")
    d.add_argument("--config", default=None, help="recipe name or YAML file (tiny-vae, sdxl-tiny-vae)")
    d.add_argument("--resume", default=None, help="'latest' (newest checkpoint under --out) or a checkpoint folder")
    d.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=200")
    d.set_defaults(func=run)


def run(args) -> int:
    from ..distill.vae import distill_vae, load_vae_config
    from ..recipes import dump_recipe

    overrides = list(args.overrides)
    for key, value in (("teacher", args.teacher), ("out", args.out), ("train.resume", args.resume)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_vae_config(args.config, overrides)
    if args.print_config:
        print(dump_recipe(cfg), end="")
        return 0
    summary = distill_vae(cfg)
    if summary["preempted"]:
        from ..utils.signals import PREEMPTED_EXIT

        print(
            f"koala vae distill: stopped by {summary['preempted']} at step {summary['step']}; continue with "
            "--resume latest"
        )
        return PREEMPTED_EXIT
    print(f"koala vae distill: finished at step {summary['step']}; wrote {summary['out']}")
    return 0
