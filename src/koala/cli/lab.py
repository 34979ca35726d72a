"""`koala lab`: the shapes world (synthetic data with known ground truth) and its tiny teacher."""

from __future__ import annotations

import json

from .options import add_choice_argument


def register(sub) -> None:
    p = sub.add_parser(
        "lab",
        help="synthetic shapes data and a tiny CPU-trainable SDXL-topology teacher",
        description="A small world where the whole KOALA method runs on a CPU: images of 1-3 coloured shapes with "
        "captions whose ground truth is known, and a tiny SDXL-architecture teacher trained on them.",
    )
    lab = p.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    _add_make_data_parser(lab)
    _add_train_teacher_parser(lab)
    _add_sample_parser(lab)
    _add_make_tiny_parser(lab)
    _add_train_controlnet_parser(lab)


def _add_make_data_parser(lab) -> None:
    m = lab.add_parser(
        "make-data",
        help="write shapes train/val image folders (PNG + metadata.jsonl)",
        description="Write OUT/train and OUT/val image folders of seeded synthetic scenes: PNGs plus metadata.jsonl "
        "rows {file_name, text, objects, relations}. The same seed gives byte-identical files. The train split never "
        "contains the --held-out colour:shape pairs; val draws from all pairs.",
    )
    m.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    m.add_argument("--num-train", type=int, default=2000, help="training images (default 2000)")
    m.add_argument("--num-val", type=int, default=200, help="validation images (default 200)")
    m.add_argument("--size", type=int, default=64, help="image side in pixels (default 64; the teacher uses 32)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--colors",
        default="red,green,blue,yellow",
        help="comma-separated colours (known: red, green, blue, yellow, purple, orange)",
    )
    m.add_argument(
        "--held-out",
        default="red:triangle,blue:circle",
        help="colour:shape pairs kept out of train, comma-separated ('' for none)",
    )
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.set_defaults(func=run_make_data)


def _add_teacher_loss_args(t) -> None:
    """The word-order losses of the teacher recipe."""
    t.add_argument(
        "--order-weight",
        type=float,
        default=0.1,
        help="weight of the text encoders' word-order loss (hinge on the cosine similarity of a caption and its "
        "swapped-order negatives; default 0.1, 0: off)",
    )
    t.add_argument("--order-margin", type=float, default=0.8, help="cosine margin of the word-order loss (0.8)")
    t.add_argument(
        "--relation-weight",
        type=float,
        default=0.0,
        help="weight of the U-Net's word-order loss: at high noise its error with the caption must be lower than "
        "with a swapped-order negative, by --relation-margin relative to the two (default 0: off)",
    )
    t.add_argument("--relation-margin", type=float, default=0.1, help="relative margin of that loss (0.1)")
    t.add_argument(
        "--relation-t-min",
        type=int,
        default=600,
        help="that loss applies to samples noised at timestep >= this, where the caption decides the layout (600)",
    )


def _add_teacher_schedule_args(t) -> None:
    """The noise schedule the teacher trains and samples with."""
    t.add_argument(
        "--beta-end",
        type=float,
        default=None,
        help="the noise schedule's last beta (default: the pipeline's, SDXL's 0.012); larger leaves less of the "
        "image at the last timestep",
    )
    t.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="what the denoiser predicts (default: the pipeline's, epsilon)",
    )
    t.add_argument(
        "--zero-snr",
        action="store_true",
        help="rescale the betas to zero terminal SNR, so the last timestep is pure noise (needs --prediction-type "
        "v_prediction; use with --timestep-spacing trailing)",
    )
    t.add_argument(
        "--timestep-spacing",
        choices=("leading", "trailing", "linspace"),
        default=None,
        help="sampling timestep spacing saved with the pipeline (default: the pipeline's, leading); trailing "
        "starts sampling at the last timestep",
    )


def _add_train_teacher_parser(lab) -> None:
    t = lab.add_parser(
        "train-teacher",
        help="train the tiny shapes teacher (VAE, then U-Net / DiT + text encoders) on CPU",
        description="Train a tiny SDXL-topology pipeline on 32x32 shapes images: first the VAE (reconstruction), then "
        "the U-Net and both CLIP text encoders with the diffusion loss under SDXL's noise schedule and conditioning. "
        "--family pixart trains a PixArt-topology teacher instead (a 12-block DiT and its T5 encoder; --vae-from "
        "reuses a trained shapes VAE). Writes a pipeline directory that the family's diffusers pipeline loads, "
        "checkpointing every --save-every steps (EMA weights) and printing val scores from `koala eval shapes`' "
        "scorer. The recipe: relation-balanced generated scenes, and a word-order loss that makes the text encoders "
        "tell a caption from the same words in another order (subject and object swapped, colours swapped). Each "
        "checkpoint also saves the training state (OUT/train_state: weights, AdamW, EMA, RNG, data), so --resume "
        "continues a stopped run bit-exactly.",
    )
    t.add_argument(
        "--out",
        required=True,
        help="output pipeline directory, replaced atomically at each checkpoint; an existing directory that "
        "is not a koala teacher is refused unless --overwrite",
    )
    t.add_argument(
        "--data", default=None, help="image folder (metadata.jsonl) to train on; default: generate in memory"
    )
    t.add_argument("--num-train", type=int, default=40000, help="generated training images (default 40000)")
    t.add_argument(
        "--unbalanced",
        action="store_true",
        help="generate the default shapes scenes (relations stated 70%% of the time, as `koala lab make-data`) "
        "instead of relation-balanced ones",
    )
    t.add_argument("--num-val", type=int, default=64, help="val prompts scored at each checkpoint (default 64)")
    t.add_argument("--vae-steps", type=int, default=600)
    t.add_argument("--steps", type=int, default=16000, help="U-Net training steps (default 16000)")
    _add_teacher_loss_args(t)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=200, help="linear LR warmup steps before the cosine decay (200)")
    _add_teacher_schedule_args(t)
    t.add_argument("--save-every", type=int, default=500, help="checkpoint + score every N steps (0: only at the end)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes, then save")
    t.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps in this run, then save (resumable)"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out (its recipe; only --max-minutes, --stop-after, --save-every and "
        "--threads apply), bit-exactly as if it had not stopped (same --threads)",
    )
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    t.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16, half the size)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--family", default="sdxl", metavar="NAME", help="teacher topology: sdxl (default) or pixart")
    t.add_argument(
        "--vae-from",
        default=None,
        metavar="DIR",
        help="take the VAE of this trained shapes pipeline (e.g. the packaged teacher) and skip VAE training",
    )
    t.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="fine-tune: start every component (U-Net, text encoders, VAE) from this trained shapes pipeline of "
        "the same family, e.g. the packaged teacher; VAE training is skipped",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    t.set_defaults(func=run_train_teacher)


def _add_sample_parser(lab) -> None:
    s = lab.add_parser(
        "sample",
        help="generate images for the shapes val prompts (for `koala eval shapes`)",
        description="Generate one image per shapes prompt (scenes 0..N-1 of a split) with a shapes pipeline, default "
        "sampler (Euler, 20 steps, guidance 5, 32x32). Writes PNGs with a 'prompt' text chunk and metadata.jsonl; "
        "score them with `koala eval shapes OUT`.",
    )
    s.add_argument("--pipeline", default=None, help="pipeline directory (default: the packaged shapes teacher)")
    s.add_argument("--out", required=True, help="output image folder")
    s.add_argument("--num", type=int, default=200, help="number of prompts/images (default 200)")
    add_choice_argument(s, "--split", default="val", choices="koala.lab.shapes.SPLITS")
    s.add_argument("--seed", type=int, default=0, help="scene seed and sampling seed (default 0)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 5)")
    s.set_defaults(func=run_sample)


def _add_make_tiny_parser(lab) -> None:
    k = lab.add_parser(
        "make-tiny",
        help="write a tiny random-weight pipeline (SDXL, SD-1.x or PixArt topology) for tests and smoke runs",
        description="Write a tiny pipeline with random weights to OUT: --family sdxl gives a "
        "StableDiffusionXLPipeline (two CLIP text encoders, text_time conditioning, transformer depths [1, 2, 10]), "
        "--family sd a StableDiffusionPipeline with SD-1.x's four-stage U-Net and one CLIP text encoder, "
        "--family pixart a PixArtSigmaPipeline (T5 encoder with attention mask, 6-block DiT with adaLN-single and "
        "learned sigma). 32x32 images, CPU, seconds. Written atomically; an existing OUT is refused unless "
        "--overwrite.",
    )
    k.add_argument("out", metavar="OUT", help="output pipeline directory")
    k.add_argument(
        "--family",
        default="sdxl",
        metavar="NAME",
        help="pipeline topology: a model family of koala.families, sdxl, sd or pixart (default sdxl)",
    )
    k.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    k.set_defaults(func=run_make_tiny)


def _add_train_controlnet_parser(lab) -> None:
    c = lab.add_parser(
        "train-controlnet",
        help="train a layout ControlNet for the shapes teacher on CPU",
        description="Train a diffusers ControlNetModel (ControlNetModel.from_unet of the teacher's U-Net) on shapes "
        "scenes conditioned on their layout images (each shape's mask in its colour on black, <stem>.layout.png), "
        "with the teacher frozen; epsilon loss through the teacher's U-Net with the ControlNet's residuals. OUT "
        "loads with ControlNetModel.from_pretrained and runs in StableDiffusionXLControlNetPipeline with the teacher. "
        "A checkpoint replaces OUT every save_every steps; running the same command again resumes bit-exactly "
        "(raise steps=N to train further). Settings are key=value overrides, e.g. steps=200 batch_size=8 "
        "ema_decay=0.99 max_minutes=10 threads=2.",
    )
    c.add_argument(
        "--teacher", default=None, metavar="DIR", help="shapes teacher pipeline (default: the packaged one)"
    )
    c.add_argument("--out", required=True, metavar="DIR", help="output ControlNet directory (resumed if it is a run)")
    c.add_argument("--overwrite", action="store_true", help="start over in an existing OUT instead of resuming")
    c.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="num_train (2000), seed (0), steps (500), batch_size (16), lr (1e-3), warmup (10), cond_dropout (0.1), "
        "snr_gamma (5), ema_decay (null), conditioning_channels ([16, 32]), save_every (20), max_minutes, threads",
    )
    c.set_defaults(func=run_train_controlnet)


def run_train_controlnet(args) -> int:
    from ..lab.controlnet import config_from_overrides, train_controlnet

    cfg = config_from_overrides(args.overrides, out=args.out, teacher=args.teacher, overwrite=args.overwrite)
    print(json.dumps(train_controlnet(cfg)))
    return 0


def run_make_data(args) -> int:
    import os

    from ..lab.shapes import parse_pairs, write_shapes_dataset
    from ..utils.files import atomic_output_dir

    colors = [c.strip() for c in args.colors.split(",") if c.strip()]
    held = parse_pairs(args.held_out)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_shapes_dataset(tmp, args.num_train, args.num_val, args.seed, args.size, colors, held)
    print(f"wrote {args.num_train} train + {args.num_val} val images to {os.path.abspath(args.out)}")
    return 0


def run_train_teacher(args) -> int:
    from ..lab.train_teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(
        out=args.out,
        data=args.data,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        vae_steps=args.vae_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        save_every=args.save_every,
        max_minutes=args.max_minutes,
        stop_after=args.stop_after,
        resume=args.resume,
        balanced=not args.unbalanced,
        order_weight=args.order_weight,
        order_margin=args.order_margin,
        relation_weight=args.relation_weight,
        relation_margin=args.relation_margin,
        relation_t_min=args.relation_t_min,
        warmup=args.warmup,
        init_from=args.init_from,
        beta_end=args.beta_end,
        timestep_spacing=args.timestep_spacing,
        prediction_type=args.prediction_type,
        zero_snr=args.zero_snr,
        threads=args.threads,
        half=not args.fp32,
        overwrite=args.overwrite,
        family=args.family,
        vae_from=args.vae_from,
    )
    res = train_teacher(cfg)
    print(json.dumps(res))
    return 0


def run_make_tiny(args) -> int:
    import os

    from ..testing.images import WORDS
    from ..testing.tiny import save_tiny_pipeline
    from ..utils.files import atomic_output_dir

    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        save_tiny_pipeline(tmp, seed=args.seed, words=WORDS, family=args.family)
    print(f"wrote a tiny random {args.family} pipeline to {os.path.abspath(args.out)}")
    return 0


def run_sample(args) -> int:
    from ..lab.models import shapes_teacher_dir
    from ..lab.train_teacher import sample_folder

    src = args.pipeline or shapes_teacher_dir()
    out = sample_folder(src, args.out, args.num, args.seed, split=args.split, steps=args.steps, guidance=args.guidance)
    print(f"wrote {args.num} images to {out}; score them with: koala eval shapes {out}")
    return 0
