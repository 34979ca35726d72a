"""`koala eval shapes` (the shapes world, no learned model), `koala eval clip` (CLIP score, local checkpoint) and
`koala eval run` (generate with several models, score, one table: the paper's Table 5)."""

from __future__ import annotations

import argparse
import json

from .options import (
    STDOUT,
    add_choice_argument,
    add_dtype_argument,
    add_json_argument,
    add_rank_arguments,
    emit_json,
)


def _scorer_args(
    p, dir_help: str = "folder of images with metadata.jsonl or PNG 'prompt' chunks", limit: bool = True
) -> None:
    """What every folder scorer takes: the folder, the device, --limit, and where the JSON / markdown go."""
    p.add_argument("dir", metavar="DIR", help=dir_help)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    if limit:
        p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    add_json_argument(p, "the result (with per-image scores)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the table (markdown)")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate generated images", description="Evaluate generated images.")
    ev = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    _add_shapes_parser(ev)
    _add_clip_parser(ev)
    _add_hpsv2_parser(ev)
    _add_pickscore_parser(ev)
    _add_fid_parser(ev)
    _add_compbench_parser(ev)
    _add_geneval_parsers(ev)
    _add_run_parser(ev)


def _add_shapes_parser(ev) -> None:
    s = ev.add_parser(
        "shapes",
        help="score shapes images for colour, shape, binding and spatial accuracy",
        description="Score a folder of images against their prompts, T2I-CompBench style but with no learned model: "
        "objects are found by nearest-palette-colour segmentation and connected components, shapes by bounding-box "
        "fill ratio and top/bottom asymmetry, relations by centroids. Prompts come from DIR/metadata.jsonl "
        "(file_name + text or prompt) or from each PNG's 'prompt' text chunk. Categories: color (expected colours "
        "present), shape (expected shapes present), binding (the object of each colour has the right shape), "
        "spatial (stated relations hold), all (every fact of the image holds).",
    )
    s.add_argument("dir", metavar="DIR", help="folder of images with metadata.jsonl or PNG 'prompt' chunks")
    add_json_argument(s, "the aggregate scores")
    s.add_argument("--per-image", default=None, metavar="FILE", help="also write per-image scores as JSON lines")
    s.add_argument("--limit", type=int, default=None, help="score only the first N images")
    s.add_argument(
        "--held-out",
        default=None,
        metavar="PAIRS",
        help="also report binding separately for these colour:shape pairs, e.g. red:triangle,blue:circle",
    )
    s.set_defaults(func=run_shapes)


def _add_clip_parser(ev) -> None:
    c = ev.add_parser(
        "clip",
        help="CLIP score of images against their prompts (local transformers CLIP checkpoint)",
        description="CLIP score = 100 * max(cos(image, text), 0) with a CLIP model's projected embeddings (as "
        "torchmetrics' CLIPScore; T2I-CompBench's non-spatial category uses it with CLIP ViT-B/32). Prompts come from "
        "DIR/metadata.jsonl or each PNG's 'prompt' chunk (koala generate writes them). Unreadable images are "
        "skipped and counted.",
    )
    _scorer_args(c)
    c.add_argument(
        "--checkpoint",
        required=True,
        metavar="CLIP_DIR",
        help="local transformers CLIP directory (e.g. a download of openai/clip-vit-base-patch32)",
    )
    c.add_argument("--batch-size", type=int, default=16)
    c.set_defaults(func=run_clip)


def _add_hpsv2_parser(ev) -> None:
    h = ev.add_parser(
        "hpsv2",
        help="HPSv2 human-preference score of images for their prompts (local HPS checkpoint)",
        description="HPSv2 x100 (the paper's Table 5 metric): the cosine of the L2-normalised image and prompt "
        "embeddings of the HPSv2 model (OpenCLIP ViT-H/14 fine-tuned on human preferences), from HPS_v2_compressed.pt "
        "(or HPS_v2.1_compressed.pt), run through transformers (the architecture is read from the checkpoint). "
        "Prompts "
        "come from DIR/metadata.jsonl or each PNG's 'prompt' chunk; a 'style' field in metadata.jsonl gives per-style "
        "means and their average (HPSv2's benchmark styles: anime, concept-art, paintings, photo).",
    )
    _scorer_args(h)
    h.add_argument("--checkpoint", required=True, metavar="FILE", help="HPS_v2_compressed.pt (open_clip state dict)")
    h.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="CLIP tokenizer directory (e.g. an SDXL pipeline directory or its tokenizer/)",
    )
    add_choice_argument(
        h,
        "--act",
        default="gelu",
        choices="koala.eval.hpsv2.ACTS",
        help="MLP activation of the checkpoint's architecture (ViT-H-14: gelu; OpenAI CLIPs: quick_gelu)",
    )
    h.set_defaults(func=run_hpsv2)


def _add_pickscore_parser(ev) -> None:
    k = ev.add_parser(
        "pickscore",
        help="PickScore of images for their prompts (local PickScore checkpoint)",
        description="PickScore (Kirstain et al. 2023): exp(logit_scale) * cos(image, prompt) with the PickScore CLIP "
        "(yuvalkirstain/PickScore_v1, with the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Prompts come from "
        "DIR/metadata.jsonl or each PNG's 'prompt' chunk; unreadable images are skipped and counted.",
    )
    _scorer_args(k)
    k.add_argument("--checkpoint", required=True, metavar="DIR", help="PickScore checkpoint directory")
    k.add_argument("--processor", default=None, metavar="DIR", help="its CLIP processor (default: the checkpoint dir)")
    k.set_defaults(func=run_pickscore)


def _add_fid_parser(ev) -> None:
    f = ev.add_parser(
        "fid",
        help="FID of generated images against a reference folder (local Inception TorchScript)",
        description="Frechet Inception Distance (torchmetrics) between the images of DIR and --reference, with the "
        "standard FID Inception-v3 from a local TorchScript file (inception-2015-12-05.pt, as StyleGAN2-ADA and "
        "clean-fid distribute it). Images are resized to 299x299 with PIL bicubic. Unreadable images are skipped "
        "and counted.",
    )
    _scorer_args(f, "folder of generated images", limit=False)
    f.add_argument("--reference", required=True, metavar="REF_DIR", help="folder of reference images (e.g. COCO val)")
    f.add_argument(
        "--inception", required=True, metavar="FILE", help="FID Inception TorchScript (inception-2015-12-05.pt)"
    )
    f.add_argument("--batch-size", type=int, default=32)
    f.set_defaults(func=run_fid)


def _add_compbench_parser(ev) -> None:
    b = ev.add_parser(
        "compbench",
        help="T2I-CompBench category score (B-VQA, spatial, non-spatial CLIP, 3-in-1) from local checkpoints",
        description="T2I-CompBench: color / shape / texture by B-VQA (BLIP VQA: the product over the prompt's noun "
        "phrases of P(yes) / (P(yes) + P(no))), spatial by the benchmark's box rule on an open-vocabulary detector's "
        "boxes (OWL-ViT / OWLv2 through transformers, where the benchmark uses UniDet), non_spatial by the CLIP "
        "cosine "
        "(ViT-B/32 in the benchmark), complex by the 3-in-1 mix. Prompts come from DIR/metadata.jsonl or PNG 'prompt' "
        "chunks; point koala eval run or koala generate at the benchmark's <category>_val.txt to make the images.",
    )
    _scorer_args(b)
    add_choice_argument(b, "--category", required=True, choices="koala.eval.compbench.CATEGORIES")
    b.add_argument(
        "--vqa", default=None, metavar="DIR", help="BLIP VQA checkpoint (Salesforce/blip-vqa-capfilt-large)"
    )
    b.add_argument("--detector", default=None, metavar="DIR", help="OWL-ViT / OWLv2 checkpoint (spatial, complex)")
    b.add_argument(
        "--detector-threshold", type=float, default=0.1, help="detection confidence threshold (default 0.1)"
    )
    b.add_argument("--clip", default=None, metavar="DIR", help="CLIP checkpoint (openai/clip-vit-base-patch32)")
    b.add_argument(
        "--complex-lists",
        default=None,
        metavar="DIR",
        help="folder with the benchmark's complex_val_spatial.txt and complex_val_action.txt",
    )
    b.set_defaults(func=run_compbench)


def _add_geneval_parsers(ev) -> None:
    g = ev.add_parser(
        "geneval",
        help="GenEval score per tag and overall (Mask2Former + CLIP ViT-L/14, local checkpoints)",
        description="GenEval (Ghosh et al. 2023) over the benchmark's image folder: DIR/00000/metadata.jsonl (the "
        "prompt's line of evaluation_metadata.jsonl) and DIR/00000/samples/00000.png ... (4 per prompt). Objects are "
        "found by a Mask2Former COCO-instance detector (transformers' port of the benchmark's mmdet one), kept above "
        "the benchmark's confidence (0.3; 0.9 for counting prompts); counts, the position rule (margin 0.1) and CLIP "
        "colours of the masked, cropped objects decide whether each image is correct. Score per tag: the fraction "
        "of correct images; overall: the mean over tags. Resumable: per-image results go to --results as they come "
        "and are reused.",
    )
    _scorer_args(g, "the benchmark's image folder (one numbered folder per prompt)", limit=False)
    g.add_argument(
        "--detector",
        required=True,
        metavar="DIR",
        help="Mask2Former COCO-instance checkpoint (facebook/mask2former-swin-small-coco-instance)",
    )
    g.add_argument(
        "--clip", required=True, metavar="DIR", help="CLIP ViT-L/14 checkpoint (openai/clip-vit-large-patch14)"
    )
    g.add_argument("--images-per-prompt", type=int, default=4, help="images each prompt folder must hold (default 4)")
    g.add_argument("--limit", type=int, default=None, help="score only the first N prompt folders")
    g.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="per-image results, JSON lines (default DIR/koala_geneval.jsonl)",
    )
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=run_geneval)
    w = ev.add_parser(
        "geneval-prompts",
        help="write GenEval's prompt set (evaluation_metadata.jsonl, generation_prompts.txt)",
        description="Write GenEval's 553 prompts from the benchmark's templates and COCO object list, drawn with "
        "its seeded generator (seed 43, 100 per tag, deduplicated): OUT/evaluation_metadata.jsonl and "
        "OUT/generation_prompts.txt, as the benchmark's prompts/ folder holds them.",
    )
    w.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if it exists)")
    w.add_argument("--seed", type=int, default=43, help="generator seed (default 43, the benchmark's)")
    w.add_argument("--per-tag", type=int, default=100, help="prompts drawn per tag before deduplication (default 100)")
    w.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    w.set_defaults(func=run_geneval_prompts)


class _RunHelp(argparse.HelpFormatter):
    """`koala eval run`'s help, with {SCORERS} in --scorers' help filled from eval.run.SCORERS when help is printed
    (importing it loads torch, which building the parser must not)."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        return text.replace("{SCORERS}", _scorer_names()) if "{SCORERS}" in text else text


def _scorer_names() -> str:
    """eval.run.SCORERS with each family folded into one entry: compbench-color|shape|..."""
    from ..eval.run import SCORERS

    families: dict[str, list[str]] = {}
    for name in SCORERS:
        family, _, member = name.partition("-")
        families.setdefault(family, []).append(member)
    return ", ".join(f if members == [""] else f"{f}-{'|'.join(members)}" for f, members in families.items())


def _add_run_parser(ev) -> None:
    r = ev.add_parser(
        "run",
        help="the paper's Table 5 in one command: generate with every model, score, write a table",
        description="Generate every prompt x seed with every model under its own sampling defaults (a student's "
        "recorded ones, koala_layer_map.json meta.sampling; else the paper's: Euler, 10 steps, cfg 3.5, trailing "
        "spacing for students of turbo / lightning teachers, from their layer map), score the images "
        "with each scorer and write OUT/results.md, OUT/results.json and OUT/results.png (score vs latency): per "
        "model denoiser params, median latency per image, peak memory and the scores (per style when the prompt set "
        "has styles). Resumable: images and scores already in OUT are reused (keyed by model, prompt, seed and "
        "sampler settings), so a killed run continues where it stopped.",
        epilog="example: koala eval run --model teacher=sdxl-base --model koala=out/koala-700m --prompts hps_prompts/ "
        "--scorers clip --clip clip-vit-base-patch32 --seeds 0 --out eval-table5",
        formatter_class=_RunHelp,
    )
    _add_run_input_args(r)
    _add_run_scorer_args(r)
    _add_run_parallel_args(r)
    r.add_argument(
        "--seeds", default="0", help="comma-separated seeds, each prompt generated once per seed (default 0)"
    )
    r.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: each model's recorded sampling; paper: 10)"
    )
    r.add_argument(
        "--cfg", type=float, default=None, help="guidance scale (default: each model's recorded sampling; paper: 3.5)"
    )
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add_dtype_argument(r)
    r.add_argument("--out", required=True, help="output folder (reused to resume)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run_run)


def _add_run_parallel_args(r) -> None:
    """Several processes: the split and the merge."""
    add_rank_arguments(
        r,
        ": it generates and scores images k with k %% world-size == rank of every model's prompts x seeds, into "
        "its own part files in OUT. Under accelerate launch / torchrun the processes wait for each other and rank "
        "0 writes the results; started on their own, each writes its part and stops, and a --merge run writes the "
        "results",
        merge_help="write OUT/results.* from the parts every rank wrote (the same arguments otherwise); generates "
        "nothing: a missing image is refused, naming it",
    )


def _add_run_input_args(r) -> None:
    """The models and the prompt sets."""
    r.add_argument(
        "--model", action="append", default=[], metavar="NAME=DIR", help="a pipeline directory (repeatable)"
    )
    r.add_argument(
        "--unet",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a student U-Net / DiT directory to drop into --base (repeatable)",
    )
    r.add_argument("--base", default=None, help="teacher pipeline directory for every --unet")
    r.add_argument(
        "--prompts",
        default=None,
        metavar="FILE|DIR",
        help="the prompt set --scorers score: a text file (one prompt per line) or a directory of STYLE.txt "
        "files (e.g. HPSv2's anime.txt, concept-art.txt, paintings.txt, photo.txt)",
    )
    r.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="SCORER=FILE|DIR",
        help="one more prompt set with the scorer that scores it (repeatable), e.g. hpsv2=hps_prompts/ "
        "compbench-color=color_val.txt compbench-spatial=spatial_val.txt: Table 5 in one run; "
        "geneval=evaluation_metadata.jsonl (GenEval's prompts; needs --geneval-detector and --geneval-clip, and "
        "--seeds 0,1,2,3 for its 4 images per prompt)",
    )
    r.add_argument("--limit", type=int, default=None, help="the first N prompts (per style for a directory)")


def _add_run_scorer_args(r) -> None:
    """The scorers and their checkpoints."""
    r.add_argument("--scorers", default="shapes", help="comma-separated: {SCORERS} (default shapes)")
    r.add_argument("--clip", default=None, metavar="CLIP_DIR", help="local transformers CLIP checkpoint (scorer clip)")
    r.add_argument("--hps-checkpoint", default=None, metavar="FILE", help="HPS_v2_compressed.pt (scorer hpsv2)")
    r.add_argument(
        "--hps-tokenizer",
        default=None,
        metavar="DIR",
        help="CLIP tokenizer directory for HPSv2 (e.g. an SDXL pipeline or its tokenizer/)",
    )
    r.add_argument(
        "--pickscore", default=None, metavar="DIR", help="PickScore checkpoint (yuvalkirstain/PickScore_v1)"
    )
    r.add_argument(
        "--pickscore-processor",
        default=None,
        metavar="DIR",
        help="its CLIP processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K; default: the checkpoint dir)",
    )
    r.add_argument(
        "--vqa", default=None, metavar="DIR", help="BLIP VQA checkpoint (compbench-color/shape/texture/complex)"
    )
    r.add_argument(
        "--detector", default=None, metavar="DIR", help="OWL-ViT / OWLv2 checkpoint (compbench-spatial/complex)"
    )
    r.add_argument(
        "--complex-lists",
        default=None,
        metavar="DIR",
        help="T2I-CompBench's complex_val_spatial.txt / complex_val_action.txt folder (compbench-complex)",
    )
    r.add_argument(
        "--geneval-detector",
        default=None,
        metavar="DIR",
        help="Mask2Former COCO-instance checkpoint (--benchmark geneval=...)",
    )
    r.add_argument(
        "--geneval-clip", default=None, metavar="DIR", help="CLIP ViT-L/14 checkpoint (--benchmark geneval=...)"
    )
    r.add_argument(
        "--fid-reference",
        default=None,
        metavar="DIR",
        help="also report FID of each model's images against this folder (needs --inception)",
    )
    r.add_argument(
        "--inception", default=None, metavar="FILE", help="FID Inception TorchScript (inception-2015-12-05.pt)"
    )


def _compbench(args):
    names = [s.strip() for s in args.scorers.split(",")] + [b.partition("=")[0] for b in args.benchmark]
    if not any(n.startswith("compbench-") for n in names):
        return None
    from ..eval.compbench import CompBench

    return CompBench(
        vqa=args.vqa,
        detector=args.detector,
        clip=args.clip,
        complex_lists=args.complex_lists,
        device=args.device if (args.device or "").startswith("cuda") else "cpu",
    )


def _benchmark(spec: str, args, scorers_for, device: str) -> tuple:
    """``--benchmark SCORER=FILE|DIR`` -> (name, prompts, scorers); GenEval's metadata file gets its own scorer."""
    from ..errors import KoalaError
    from ..eval.run import geneval_benchmark, read_prompt_set

    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise KoalaError(f"--benchmark {spec!r}: give SCORER=FILE|DIR", option="benchmark")
    if name == "geneval":
        return geneval_benchmark(path, args.geneval_detector, args.geneval_clip, device, args.limit)
    return (name, read_prompt_set(path, args.limit), scorers_for([name]))


def run_run(args) -> int:
    from ..errors import KoalaError
    from ..eval.run import EvalModel, EvalSettings, make_scorers, parse_model, read_prompt_set, run_eval

    models = [EvalModel(n, model=p) for n, p in map(parse_model, args.model)]
    if args.unet and not args.base:
        raise KoalaError(
            "--unet needs --base (the teacher pipeline supplying text encoders, VAE, scheduler)", option="base"
        )
    models += [EvalModel(n, unet=p, base=args.base) for n, p in (parse_model(u, "unet") for u in args.unet)]
    if not models:
        raise KoalaError("no model: give --model NAME=DIR and/or --unet NAME=DIR --base DIR", option="model")
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise KoalaError(f"--seeds {args.seeds!r}: comma-separated integers", option="seeds") from None
    if not args.prompts and not args.benchmark:
        raise KoalaError("no prompts: give --prompts FILE|DIR and/or --benchmark SCORER=FILE|DIR", option="prompts")
    if args.merge and args.world_size > 1:
        raise KoalaError("--merge runs in one process: leave out --world-size / the launcher", option="merge")
    from ..utils.parts import rank_device

    args.device = rank_device(args.device, args.world_size)
    device = args.device if (args.device or "").startswith("cuda") else "cpu"
    bench = _compbench(args)

    def scorers_for(names):
        return make_scorers(
            names,
            args.clip,
            device,
            hps_checkpoint=args.hps_checkpoint,
            hps_tokenizer=args.hps_tokenizer,
            compbench=bench,
            pickscore=args.pickscore,
            pickscore_processor=args.pickscore_processor,
        )

    prompts = read_prompt_set(args.prompts, args.limit) if args.prompts else []
    scorers = scorers_for([x.strip() for x in args.scorers.split(",") if x.strip()]) if args.prompts else []
    benchmarks = [_benchmark(b, args, scorers_for, device) for b in args.benchmark]
    settings = EvalSettings(
        steps=args.steps,
        cfg=args.cfg,
        seeds=seeds or (0,),
        width=args.width,
        height=args.height,
        device=args.device,
        dtype=args.dtype,
    )
    if bool(args.fid_reference) != bool(args.inception):
        raise KoalaError("FID needs both --fid-reference DIR and --inception FILE", option="fid_reference")
    res = run_eval(
        models,
        prompts,
        scorers,
        args.out,
        settings,
        progress=not args.no_progress,
        fid_reference=args.fid_reference,
        inception=args.inception,
        benchmarks=benchmarks,
        rank=args.rank,
        world_size=args.world_size,
        merge=args.merge,
    )
    if "part" in res:
        print(f"koala eval run: rank {args.rank} of {args.world_size} wrote its share to {args.out}")
        return 0
    import os

    from ..eval.run import markdown

    print(markdown(res), end="")
    plot = ", results.png" if os.path.isfile(os.path.join(args.out, "results.png")) else ""
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json{plot}")
    return 0


def run_hpsv2(args) -> int:
    from ..eval.hpsv2 import score_folder
    from ..utils.console import markdown_table

    res = score_folder(args.dir, args.checkpoint, args.tokenizer, device=args.device, limit=args.limit, act=args.act)
    rows = [[st, f"{v['hpsv2']:.2f}", v["n_images"]] for st, v in res["styles"].items()]
    rows.append(["average", f"{res['hpsv2']:.2f}", f"{res['n_images']}{_skips(res['skipped'])}"])
    return _emit(args, markdown_table(["style", "HPSv2", "images"], rows), res)


def _skips(skipped) -> str:
    n = sum(len(v) for v in skipped.values()) if isinstance(skipped, dict) else len(skipped)
    return f", {n} unreadable skipped" if n else ""


def _emit(args, table: str, res: dict) -> int:
    """Print the markdown table (or, for a bare --json, the result); write the result with per-image rows (--json
    FILE) and the table (--markdown)."""
    from ..utils.files import atomic_write_text

    table = table.rstrip("\n") + "\n"
    if args.json != STDOUT:  # a bare --json prints the result instead
        print(table, end="")
    emit_json(args.json, res)
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0


def run_compbench(args) -> int:
    from ..eval.compbench import CompBench, score_folder
    from ..utils.console import markdown_table

    bench = CompBench(
        vqa=args.vqa,
        detector=args.detector,
        clip=args.clip,
        device=args.device,
        complex_lists=args.complex_lists,
        detector_threshold=args.detector_threshold,
    )
    for kind in bench.needs(args.category):  # every checkpoint this category needs, before any work
        bench._get(kind)
    res = score_folder(args.dir, args.category, bench, args.limit)
    row = [args.dir, args.category, f"{res['score']:.4f}", f"{res['n_images']}{_skips(res['skipped'])}"]
    return _emit(args, markdown_table(["folder", "T2I-CompBench category", "score", "images"], [row]), res)


def run_geneval(args) -> int:
    from ..eval.geneval_models import GenEval, markdown, score_folder

    bench = GenEval(args.detector, args.clip, device=args.device)
    res = score_folder(
        args.dir, bench, args.results, args.images_per_prompt, args.limit, progress=not args.no_progress
    )
    return _emit(args, markdown(res), res)


def run_geneval_prompts(args) -> int:
    from ..eval.geneval import write_prompts

    res = write_prompts(args.out, args.seed, args.per_tag, args.overwrite)
    tags = ", ".join(f"{t} {n}" for t, n in res["tags"].items())
    print(f"wrote {res['n']} prompts ({tags}) to {args.out}/evaluation_metadata.jsonl and generation_prompts.txt")
    return 0


def run_pickscore(args) -> int:
    from ..eval.clip_score import pickscore_folder
    from ..utils.console import markdown_table

    res = pickscore_folder(args.dir, args.checkpoint, args.processor, device=args.device, limit=args.limit)
    row = [args.dir, f"{res['pickscore']:.3f}", f"{res['n_images']}{_skips(res['skipped'])}"]
    return _emit(args, markdown_table(["folder", "PickScore", "images"], [row]), res)


def run_fid(args) -> int:
    from ..eval.fid import fid
    from ..utils.console import markdown_table

    res = fid(args.dir, args.reference, args.inception, device=args.device, batch_size=args.batch_size)
    n = f"{res['n_generated']} vs {res['n_reference']}{_skips(res['skipped'])}"
    row = [args.dir, args.reference, f"{res['fid']:.3f}", n]
    return _emit(args, markdown_table(["generated", "reference", "FID", "images"], [row]), res)


def run_clip(args) -> int:
    from ..eval.clip_score import markdown, score_folder

    res = score_folder(args.dir, args.checkpoint, device=args.device, batch_size=args.batch_size, limit=args.limit)
    return _emit(args, markdown(res), res)


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
    emit_json(args.json, agg, indent=None)
    if args.json == STDOUT:
        return 0
    from ..utils.console import Column, print_table

    rows = []
    for c in CATEGORIES:
        v = agg[c]
        rows.append([c, "-" if v is None else f"{100 * v:.1f}%", str(agg[f"n_{c}"])])
    if args.held_out:
        for k in ("held_out", "seen"):
            v = agg[f"binding_{k}_objects"]
            rows.append(
                [
                    f"binding ({k.replace('_', '-')} pairs)",
                    "-" if v is None else f"{100 * v:.1f}%",
                    f"{agg[f'n_{k}_objects']} obj",
                ]
            )
    gen = agg.get("geneval") or {}
    for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"):
        if t in gen:  # GenEval's tags on the same images (koala.lab.geneval_tags)
            v, n = gen[t], gen.get(f"n_{t}")
            rows.append([f"GenEval {t}", "-" if v is None else f"{100 * v:.1f}%", "" if n is None else str(n)])
    cols = [Column("category", wrap=True), Column("accuracy", "right"), Column("images", "right")]
    print_table(cols, rows, title=f"koala eval shapes {args.dir} ({agg['n_images']} images)")
    return 0
