"""`koala eval shapes` (the shapes world, no learned model) and `koala eval clip` (CLIP score, local checkpoint)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate generated images", description="Evaluate generated images.")
    ev = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    s = ev.add_parser(
        "shapes", help="score shapes images for colour, shape, binding and spatial accuracy",
        description="Score a folder of images against their prompts, T2I-CompBench style but with no learned model: "
        "objects are found by nearest-palette-colour segmentation and connected components, shapes by bounding-box "
        "fill ratio and top/bottom asymmetry, relations by centroids. Prompts come from DIR/metadata.jsonl "
        "(file_name + text or prompt) or from each PNG's 'prompt' text chunk. Categories: color (expected colours "
        "present), shape (expected shapes present), binding (the object of each colour has the right shape), "
        "spatial (stated relations hold), all (every fact of the image holds).",
    )
    s.add_argument("dir", metavar="DIR", help="folder of images with metadata.jsonl or PNG 'prompt' chunks")
    s.add_argument("--json", action="store_true", help="print the aggregate scores as JSON instead of a table")
    s.add_argument("--per-image", default=None, metavar="FILE", help="also write per-image scores as JSON lines")
    s.add_argument("--limit", type=int, default=None, help="score only the first N images")
    s.add_argument("--held-out", default=None, metavar="PAIRS",
                   help="also report binding separately for these colour:shape pairs, e.g. red:triangle,blue:circle")
    s.set_defaults(func=run_shapes)
    c = ev.add_parser(
        "clip", help="CLIP score of images against their prompts (local transformers CLIP checkpoint)",
        description="CLIP score = 100 * max(cos(image, text), 0) with a CLIP model's projected embeddings (as "
        "torchmetrics' CLIPScore; T2I-CompBench's non-spatial category uses it with CLIP ViT-B/32). Prompts come from "
        "DIR/metadata.jsonl or each PNG's 'prompt' chunk (koala generate writes them). Unreadable images are "
        "skipped and counted.",
    )
    c.add_argument("dir", metavar="DIR", help="folder of images with metadata.jsonl or PNG 'prompt' chunks")
    c.add_argument("--checkpoint", required=True, metavar="CLIP_DIR",
                   help="local transformers CLIP directory (e.g. a download of openai/clip-vit-base-patch32)")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--limit", type=int, default=None, help="score only the first N images")
    c.add_argument("--json", default=None, metavar="FILE", help="write the result with per-image scores")
    c.add_argument("--markdown", default=None, metavar="FILE", help="write the one-row table")
    c.set_defaults(func=run_clip)


def run_clip(args) -> int:
    from ..eval.clip_score import markdown, score_folder
    from ..utils import atomic_write_text

    res = score_folder(args.dir, args.checkpoint, device=args.device, batch_size=args.batch_size, limit=args.limit)
    table = markdown(res)
    print(table, end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=1))
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0


def run_shapes(args) -> int:
    from ..lab.score import CATEGORIES, held_out_breakdown, score_folder
    from ..lab.shapes import parse_pairs

    agg, per = score_folder(args.dir, args.limit)
    if args.held_out:
        agg.update(held_out_breakdown(per, parse_pairs(args.held_out)))
    if args.per_image:
        with open(args.per_image, "w") as f:
            for row in per:
                f.write(json.dumps(row) + "\n")
    if args.json:
        print(json.dumps(agg))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"koala eval shapes {args.dir} ({agg['n_images']} images)")
    t.add_column("category")
    t.add_column("accuracy", justify="right")
    t.add_column("images", justify="right")
    for c in CATEGORIES:
        v = agg[c]
        t.add_row(c, "-" if v is None else f"{100 * v:.1f}%", str(agg[f"n_{c}"]))
    if args.held_out:
        for k in ("held_out", "seen"):
            v = agg[f"binding_{k}_objects"]
            t.add_row(f"binding ({k.replace('_', '-')} pairs)", "-" if v is None else f"{100 * v:.1f}%",
                      f"{agg[f'n_{k}_objects']} obj")
    Console().print(t)
    return 0
