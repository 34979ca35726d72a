"""`koala data stats` (Table 4's columns for a data source) and `koala cache` (precompute latents + text states)."""

from __future__ import annotations

import argparse
import os

from ..errors import KoalaError
from .options import (
    STDOUT,
    add_choice_argument,
    add_dtype_argument,
    add_json_argument,
    add_rank_arguments,
    emit_json,
)

SOURCE_HELP = (
    "data source: an image folder (sidecar .txt or metadata.jsonl/.csv with file_name), a .parquet/.csv "
    "file (or folder/glob of them) with an image-path column, webdataset shards ('shards/{00000..00099}.tar'), "
    "a datasets folder saved with save_to_disk, or (stats only) a koala cache folder"
)


def _source_args(p) -> None:
    p.add_argument("source", help=SOURCE_HELP)
    g = p.add_argument_group("source options (override --config)")
    g.add_argument(
        "--config",
        help="a training recipe (shipped name like tiny, or YAML path; its 'data' section) "
        "or a YAML/JSON file with a data config",
    )
    g.add_argument(
        "--type",
        choices=["folder", "parquet", "csv", "webdataset", "hf_disk", "cache"],
        help="source type (default: guessed from SOURCE)",
    )
    g.add_argument(
        "--caption-column",
        nargs="+",
        help="caption field(s); the first non-empty one is used "
        "(default: text, caption, prompt, TEXT, alt, txt, alt_txt, alt_text)",
    )
    g.add_argument(
        "--syncap-column",
        nargs="+",
        help="field(s) with the synthetic (LMM) caption; the first "
        "non-empty one is used (LAION-POP: cogvlm_caption llava_caption; the LAION-POP recipes set them)",
    )
    add_choice_argument(
        g,
        "--syncap",
        choices="koala.data.captions.SYNCAP_MODES",
        help="append: original + ', ' + synthetic (KOALA, default when --syncap-column is set); "
        "replace: synthetic only; original: ignore it",
    )
    g.add_argument(
        "--syncap-file",
        help="synthetic captions written by `koala data syncap`, joined to the source by "
        "sample key (the syncap mode then defaults to append)",
    )
    g.add_argument(
        "--nsfw-model", help="local image classifier (App. E): images it flags are skipped, counted as nsfw"
    )
    g.add_argument("--nsfw-label", help="the classifier's class to filter on (default nsfw)")
    g.add_argument(
        "--nsfw-threshold", type=float, help="skip when that class's probability exceeds this (default 0.5)"
    )
    g.add_argument("--image-column", help="parquet/csv/hf_disk column with image paths (default: guessed)")
    g.add_argument("--image-root", help="folder that relative image paths start from (default: the table's folder)")
    g.add_argument("--split", help="hf_disk: split of a DatasetDict (default train)")
    g.add_argument(
        "--min-size",
        type=int,
        help="skip images whose short side is below this (e.g. 1024); img2dataset shards: the size before "
        "download-time resizing (the json's original_width / original_height), as for the original_size "
        "micro-condition",
    )
    g.add_argument("--max-aspect", type=float, help="skip images whose long/short side ratio exceeds this")


def _data_cfg(args) -> dict:
    cfg: dict = {}
    if args.config:
        from ..recipes import read_recipe

        loaded = read_recipe(args.config)  # a recipe name or YAML path; `extends` is honoured
        # SOURCE decides the path and the type (guessed, or --type)
        cfg = {k: v for k, v in dict(loaded.get("data", loaded)).items() if k not in ("type", "path")}
    cfg["path"] = args.source
    if args.syncap_column:
        cfg["syncap_column"] = args.syncap_column if len(args.syncap_column) > 1 else args.syncap_column[0]
    for key in (
        "type",
        "syncap",
        "syncap_file",
        "nsfw_model",
        "nsfw_label",
        "nsfw_threshold",
        "image_column",
        "image_root",
        "split",
        "min_size",
        "max_aspect",
    ):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if args.caption_column:
        cfg["caption_column"] = args.caption_column if len(args.caption_column) > 1 else args.caption_column[0]
    for key in ("center_crop", "buckets"):
        if getattr(args, key, False):
            cfg[key] = True
    if getattr(args, "no_flip", False):
        cfg["random_flip"] = False
    return cfg


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect training data", description="Inspect training data sources.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    _add_stats_parser(dsub)
    _add_syncap_parser(dsub)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    _add_cache_parser(sub)


def _add_stats_parser(dsub) -> None:
    s = dsub.add_parser(
        "stats",
        help="images, average resolution, caption length, skipped samples",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Decode every sample as training would (same filters and caption choice) and "
        "print KOALA Table 4's columns: number of usable images, average resolution (h x w), average "
        "caption length in words; plus how many captions exceed CLIP's 77-token window and every "
        "skipped sample counted by reason (truncated, corrupt, too_small, no_caption, ...).",
    )
    _source_args(s)
    s.add_argument(
        "--tokenizer",
        help="CLIP tokenizer folder (or pipeline folder with tokenizer/) for exact token "
        "counts; without it, tokens are estimated from words",
    )
    s.add_argument("--limit", type=int, help="read at most this many records")
    add_json_argument(s, "the statistics")
    s.set_defaults(func=run_stats)


def _add_syncap_parser(dsub) -> None:
    y = dsub.add_parser(
        "syncap",
        help="write synthetic captions with a local vision-language model (synCap)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Caption every image of a data source with a local vision-language model through "
        "transformers (LLaVA-1.5 family, as KOALA's synCap: 'Describe this image in detail.'), batched, "
        "with progress. Writes OUT as JSON lines {key, syncap}; re-running resumes (captioned keys are "
        "skipped). Use the captions with data config syncap_file: OUT (or --syncap-file OUT) and a synCap "
        "mode: append (original + ', ' + synthetic, the paper's choice), replace, original. Several processes "
        "(accelerate launch, or --rank/--world-size) caption disjoint samples into parts beside OUT; the merge "
        "writes OUT as one process would.",
    )
    _source_args(y)
    y.add_argument(
        "--vlm", default=None, help="local image-text-to-text model directory (e.g. llava-hf/llava-1.5-7b-hf)"
    )
    y.add_argument("--out", required=True, help="captions file (JSON lines; appended to, so a rerun resumes)")
    y.add_argument("--prompt", default="Describe this image in detail.", help="the instruction given with each image")
    y.add_argument("--batch-size", type=int, default=4)
    y.add_argument("--max-new-tokens", type=int, default=160)
    y.add_argument("--limit", type=int, help="caption at most this many records")
    y.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_dtype_argument(y, help="default: fp16 on cuda, fp32 on cpu")
    y.add_argument("--no-progress", action="store_true")
    add_rank_arguments(
        y,
        ": it captions samples k with k %% world-size == rank into its own part beside --out. Under accelerate "
        "launch / torchrun the processes wait for each other and rank 0 merges the parts into --out; started on "
        "their own, each writes its part and a --merge run (or a one-process run) merges",
        merge_help="only merge every rank's part into --out (the captions in source order, as one process writes "
        "them); loads no model; a sample no part has is refused, naming it",
    )
    y.set_defaults(func=run_syncap)


def _add_cache_parser(sub) -> None:
    c = sub.add_parser(
        "cache",
        help="precompute VAE latents and text-encoder states into sharded safetensors",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Precompute, for each sample, the VAE latent of the crop training would use "
        "(latent_dist.sample() or .mean, times vae.config.scaling_factor) and the text conditioning of "
        "the pipeline's family (SDXL: both text encoders' penultimate hidden states, the pooled "
        "embedding and the time ids; SD-1.x: the text encoder's last hidden state), into "
        "OUT/shards/NNNNN.safetensors with OUT/index.json. Re-running resumes (finished shards are "
        "skipped). Several processes (--rank/--world-size, or accelerate launch) write disjoint shards. "
        "Train from it with data config {type: cache, path: OUT}.",
    )
    _source_args(c)
    c.add_argument(
        "--pipeline",
        required=True,
        help="pipeline folder (SDXL or SD-1.x, with model_index.json; its family is "
        "detected from unet/, its vae/, text_encoder*/ and tokenizer*/ are used)",
    )
    c.add_argument("--out", required=True, help="cache folder (created; re-run to resume)")
    c.add_argument("--resolution", type=int, default=1024, help="1024 (Lightning) or 512 (Turbo)")
    c.add_argument("--center-crop", action="store_true", help="centre crop instead of random crop")
    c.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    c.add_argument("--buckets", action="store_true", help="aspect-ratio buckets around resolution^2 (step 64)")
    c.add_argument("--batch-size", type=int, default=8, help="encoder batch size")
    c.add_argument(
        "--shard-size", type=int, default=256, help="source rows per shard (webdataset: one tar = one shard)"
    )
    add_choice_argument(
        c,
        "--latent",
        choices="koala.data.cache.LATENTS",
        default="sample",
        help="store latent_dist.sample() (diffusers' SDXL scripts) or its mean",
    )
    add_dtype_argument(c, default="fp16", help="storage dtype of latents/embeds")
    add_dtype_argument(
        c,
        "--vae-dtype",
        default="fp32",
        help="VAE compute dtype (fp16 only with an fp16-safe VAE such as sdxl-vae-fp16-fix)",
    )
    c.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    c.add_argument(
        "--seed", type=int, default=0, help="crop/flip/latent-sampling seed (same as the trainer's data seed)"
    )
    add_rank_arguments(c, ": it writes shards k with k %% world-size == rank")
    c.set_defaults(func=run_cache)


def run_syncap(args) -> int:
    from ..data.syncap import caption_source, merge_captions
    from ..utils.devices import parse_device, parse_dtype

    if args.merge:
        m = merge_captions(_data_cfg(args), args.out, args.limit)
        print(f"syncap: merged {m['parts']} part(s) into {m['out']}: {m['captions']} captions, {m['skipped']} skipped")
        return 0
    if not args.vlm:
        raise KoalaError(
            "give --vlm DIR (a local image-text-to-text model); only --merge runs without one", option="vlm"
        )
    from ..utils.parts import rank_device

    device = str(parse_device(rank_device(args.device, args.world_size)))
    dtype = parse_dtype(args.dtype) or (parse_dtype("fp16") if device.startswith("cuda") else None)
    res = caption_source(
        _data_cfg(args),
        args.vlm,
        args.out,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        device=device,
        dtype=dtype,
        progress=not args.no_progress,
        rank=args.rank,
        world_size=args.world_size,
    )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(res["skip_reasons"].items()))
    who = f" (rank {args.rank} of {args.world_size})" if args.world_size > 1 else ""
    print(
        f"syncap{who}: {res['captioned']} captioned now, {res['already']} already in {res['out']}, "
        f"{res['skipped']} skipped" + (f" ({reasons})" if reasons else "")
    )
    if res.get("merged"):
        m = res["merged"]
        print(f"syncap: merged {m['parts']} part(s) into {m['out']}: {m['captions']} captions, {m['skipped']} skipped")
    return 0


def run_stats(args) -> int:
    from ..data import data_stats

    tok = None
    if args.tokenizer:
        from transformers import CLIPTokenizer

        if not os.path.isdir(args.tokenizer):
            raise KoalaError(
                f"--tokenizer {args.tokenizer}: not a local directory (a tokenizer folder or a pipeline dir)"
            )

        sub = "tokenizer" if os.path.isdir(os.path.join(args.tokenizer, "tokenizer")) else None
        try:
            tok = (
                CLIPTokenizer.from_pretrained(args.tokenizer, subfolder=sub)
                if sub
                else CLIPTokenizer.from_pretrained(args.tokenizer)
            )
        except (OSError, ValueError) as err:
            raise KoalaError(f"{args.tokenizer}: cannot load a CLIP tokenizer ({err})") from err
    st = data_stats(_data_cfg(args), tokenizer=tok, limit=args.limit, progress=args.json != STDOUT)
    emit_json(args.json, st)
    if args.json == STDOUT:
        return 0
    from ..utils.console import Column, print_table

    cols = [Column("#Imgs", "right")]
    if "avg_resolution" in st:
        cols += [
            Column("AR (h x w)", "right"),
            Column("ACL (words)", "right"),
            Column("> 77 tokens", "right", wrap=True),
        ]
    cols.append(Column("skipped", wrap=True))
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(st["skipped"].items())) or "0"
    if "avg_resolution" in st:
        h, w = st["avg_resolution"]
        row = [
            f"{st['images']:,}",
            f"{h:.0f} x {w:.0f}",
            f"{st['avg_caption_words']:.1f}",
            f"{st['captions_over_77_tokens']:,} ({st['captions_over_77_tokens_pct']}%, {st['token_count_method']})",
            skipped,
        ]
    else:
        row = [f"{st['images']:,}", skipped]
    print_table(cols, [row], title=f"{st['source']} ({st['type']})")
    return 0


def run_cache(args) -> int:
    from ..data import build_cache

    device = args.device
    if device is None:
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    else:
        from ..utils.devices import parse_device

        device = str(parse_device(device))
    index = build_cache(
        _data_cfg(args),
        args.pipeline,
        args.out,
        resolution=args.resolution,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        latent=args.latent,
        dtype=args.dtype,
        seed=args.seed,
        rank=args.rank,
        world_size=args.world_size,
        device=device,
        vae_dtype=args.vae_dtype,
    )
    if index.get("stopped_by"):
        from ..utils.signals import PREEMPTED_EXIT

        print(
            f"koala cache: stopped by {index['stopped_by']}; finished shards are kept. Run the same command again "
            "to resume."
        )
        return PREEMPTED_EXIT
    return 0
