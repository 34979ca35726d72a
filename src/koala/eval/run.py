"""``koala eval run``: the paper's Table 5 in one command: generate with every model under its own sampling
defaults (a student's recorded ones, else the paper's: Euler, 10 steps, cfg 3.5), score with every scorer, and
write one table (markdown), JSON and a plot.

Resumable: an image is keyed by model, prompt, seed and sampler settings; its PNG (with ``koala generate``'s
metadata) and a line in ``OUT/images/MODEL/index.jsonl`` are written as soon as it exists, and each scorer's
per-image scores go to ``OUT/scores/MODEL/SCORER.jsonl``. A killed run started again with the same arguments
generates and scores only what is missing.

Past one device: process ``rank`` of ``world_size`` (``accelerate launch`` / ``torchrun``, or ``--rank`` /
``--world-size``) generates and scores every model's images ``k`` with ``k % world_size == rank`` (k: the position in
the prompts x seeds list, the order one process makes them in) and appends to its own part files beside the
single-process ones (``index.rankR-of-W.jsonl``, ``SCORER.rankR-of-W.jsonl``; readers take the union, so any world
size resumes any other's work), then writes what it measured to ``OUT/parts/rankR-of-W.json``. Processes launched
together meet at a barrier and rank 0 merges; processes started on their own stop, and ``run_eval(merge=True)``
(``koala eval run ... --merge``) merges: it generates nothing (a missing image is refused, naming it), scores what is
not scored yet, and writes the ``results.*`` one process would have written (latency: the median over all ranks'
images made in the run; peak memory: the largest rank's).

Prompt sets: a text file (one prompt per line; style "all") or a directory of ``STYLE.txt`` files (HPSv2's
benchmark prompts are one file per style: anime, concept-art, paintings, photo). Scorers: ``shapes`` (the shapes
world's colour / shape / binding / spatial accuracy), ``clip`` (CLIP score with a local checkpoint) and ``hpsv2``
(HPSv2 x100 with the local HPS checkpoint; per style and the mean over styles, as the paper's Table 5).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

from ..errors import KoalaError
from ..utils.console import markdown_table
from ..utils.files import atomic_write_text
from ..utils.writes import writing
from .folder import open_rgb

SCHEMA = "koala-eval-run/1"
_KEPT = "the images and scores made so far are kept (the same command resumes from them)"
SCORERS = (
    "shapes",
    "clip",
    "hpsv2",
    "pickscore",
    "compbench-color",
    "compbench-shape",
    "compbench-texture",
    "compbench-spatial",
    "compbench-non_spatial",
    "compbench-complex",
)
SHAPES_KEYS = ("color", "shape", "binding", "spatial")


@dataclass
class EvalModel:
    """A model to evaluate: a pipeline directory (``model``) or a student denoiser dir + its teacher pipeline."""

    name: str
    model: str | None = None
    unet: str | None = None
    base: str | None = None

    def source(self) -> str:
        return (
            os.path.abspath(self.model) if self.model else f"{os.path.abspath(self.unet)}+{os.path.abspath(self.base)}"
        )


@dataclass
class Prompt:
    style: str
    index: int
    text: str


@dataclass
class EvalSettings:
    steps: int | None = None  # None: each model's sampling defaults (the paper's, App. A.3: Euler, 10 steps, cfg 3.5)
    cfg: float | None = None
    seeds: tuple[int, ...] = (0,)
    width: int | None = None
    height: int | None = None
    device: str | None = None
    dtype: str | None = None
    scheduler: str | None = None  # None: each model's own (koala.inference.pipeline.SCHEDULERS key otherwise)


@dataclass
class ModelRow:
    name: str
    source: str
    params: int = 0  # the denoiser's parameters
    latency_s: float | None = None  # median seconds per image over the images generated in this run
    peak_gib: float | None = None
    memory_kind: str = ""
    n_images: int = 0
    generated_now: int = 0
    scores: dict = field(default_factory=dict)  # scorer -> {"all": mean, style: mean, ...} or shapes categories
    sampling: dict = field(default_factory=dict)  # scheduler, steps, cfg (and timesteps) the images were made with


def parse_model(value: str, what: str = "model") -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (name: the folder's name)."""
    name, sep, path = value.partition("=")
    if not sep:
        name, path = os.path.basename(os.path.normpath(value)), value
    if not name or not path:
        raise KoalaError(f"--{what} {value!r}: give NAME=PATH or PATH", option=what)
    return name, path


def read_prompt_set(path: str, limit: int | None = None) -> list[Prompt]:
    """Prompts from a text file (style 'all') or a directory of STYLE.txt files; '#' lines and blanks skipped."""

    def lines(f):
        with open(f, encoding="utf-8") as fh:
            return [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]

    if os.path.isfile(path):
        out = [Prompt("all", i, t) for i, t in enumerate(lines(path))]
    elif os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise KoalaError(
                f"prompt set {path}: a directory needs one STYLE.txt file per style (e.g. anime.txt)", option="prompts"
            )
        out = []
        for f in files:
            out += [Prompt(f[:-4], i, t) for i, t in enumerate(lines(os.path.join(path, f))[:limit])]
        limit = None
    else:
        raise KoalaError(f"prompt set {path}: no such file or directory", option="prompts")
    out = out[:limit] if limit else out
    if not out:
        raise KoalaError(f"prompt set {path}: no prompts", option="prompts")
    return out


def model_settings(model: EvalModel, s: EvalSettings) -> tuple[EvalSettings, list[int] | None]:
    """``s`` with what it leaves open (None steps, cfg, scheduler) taken from ``model``'s sampling defaults (a
    student's record, else the paper's), and the recorded timesteps it samples with (None when none are used)."""
    from ..families.sampling import sampling_defaults_of
    from ..inference.pipeline import scheduler_label

    d = sampling_defaults_of(model.unet or model.model)
    resolved = replace(
        s,
        steps=d.steps if s.steps is None else s.steps,
        cfg=d.guidance_scale if s.cfg is None else s.cfg,
        scheduler=s.scheduler or scheduler_label(d.scheduler),
    )
    return resolved, (d.timesteps if s.steps is None else None)


def image_key(model: EvalModel, prompt: Prompt, seed: int, s: EvalSettings, timesteps: list[int] | None = None) -> str:
    """The key of one image: model, prompt, seed and the sampler settings (``s`` as resolved by
    :func:`model_settings`; ``timesteps`` when recorded ones are used)."""
    fields = [model.source(), prompt.style, prompt.text, seed, s.steps, s.cfg, s.scheduler, s.width, s.height, s.dtype]
    blob = json.dumps(fields + ([list(timesteps)] if timesteps else []), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _read_jsonl(path: str) -> dict[str, dict]:
    """key -> row of an index or score file and of every rank's part of it; a line cut by a kill is skipped (its
    image is made / scored again)."""
    from ..utils.files import read_jsonl
    from ..utils.parts import part_paths

    return {r["key"]: r for p in part_paths(path) for r in read_jsonl(p) if "key" in r}


def _append(path: str, row: dict) -> None:
    from ..utils.files import append_lines

    with writing(os.path.basename(path), os.path.dirname(path), _KEPT):
        append_lines(path, [json.dumps(row)])


def generate_images(
    model: EvalModel,
    prompts: list[Prompt],
    s: EvalSettings,
    out_dir: str,
    row: ModelRow,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    make: bool = True,
    times: list[float] | None = None,
) -> list[dict]:
    """Generate what is missing of process ``rank``'s share (of ``world_size``) for one model; returns the index
    rows of the share's images (in prompt/seed order). ``s``: the run's settings (None steps / cfg / scheduler: the
    model's sampling defaults). ``make=False`` (a merge) refuses a missing image instead; ``times`` gets the seconds
    of each image made."""
    import torch

    from ..bench.memory import PeakMemory
    from ..families import denoiser_of
    from ..inference import generate, load_pipeline
    from ..inference.generate import png_info
    from ..utils.parts import part_path, share

    folder = os.path.join(out_dir, "images", model.name)
    os.makedirs(folder, exist_ok=True)
    index_path = os.path.join(folder, "index.jsonl")
    done = _read_jsonl(index_path)
    index_path = part_path(index_path, rank, world_size)
    resolved, timesteps = model_settings(model, s)
    row.sampling = {"scheduler": resolved.scheduler, "steps": resolved.steps, "cfg": resolved.cfg}
    if timesteps:
        row.sampling["timesteps"] = list(timesteps)
    jobs = [(p, seed, image_key(model, p, seed, resolved, timesteps)) for p in prompts for seed in s.seeds]
    jobs = share(jobs, rank, world_size)
    todo = [j for j in jobs if j[2] not in done or not os.path.isfile(os.path.join(folder, done[j[2]]["file"]))]
    if todo and not make:
        _refuse_missing(model, todo, len(jobs))
    loaded = None
    if todo:
        loaded = load_pipeline(
            model.model, unet=model.unet, base=model.base, device=s.device, dtype=s.dtype, scheduler=s.scheduler
        )
        row.params = sum(p.numel() for p in denoiser_of(loaded.pipe).parameters())
        times = [] if times is None else times
        from ..utils.console import progress_bar

        gen_kw = dict(steps=s.steps, cfg=s.cfg, width=s.width, height=s.height, progress=False, log=lambda *_: None)
        with PeakMemory(loaded.device) as mem:
            for p, seed, key in progress_bar(todo, desc=f"generate {model.name}", disable=not progress, unit="img"):
                t0 = time.perf_counter()
                res = generate(loaded, p.text, seed=seed, **gen_kw)
                times.append(time.perf_counter() - t0)
                img, params = res.images[0], res.params[0]
                name = f"{p.style}-{p.index:05d}-s{seed}-{key}.png"
                _save_png(img, png_info(params), folder, name)
                entry = {
                    "key": key,
                    "file": name,
                    "style": p.style,
                    "index": p.index,
                    "prompt": p.text,
                    "seed": seed,
                    "seconds": times[-1],
                }
                _append(index_path, entry)
                done[key] = entry
        row.generated_now = len(todo)
        row.latency_s = statistics.median(times)
        row.peak_gib = mem.peak / 2**30
        row.memory_kind = "CUDA max allocated" if mem.kind.startswith("cuda") else "process peak RSS"
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return [done[k] for _, _, k in jobs]


def _refuse_missing(model: EvalModel, todo: list, n_jobs: int) -> None:
    p, seed, _ = todo[0]
    raise KoalaError(
        f"merge: {len(todo)} of {n_jobs} images of model {model.name} are missing (the first: {p.style} "
        f"prompt {p.index} {p.text!r}, seed {seed}); a rank has not finished its share: run it again (it "
        "resumes), then merge",
        option="merge",
    )


def _save_png(img, pnginfo, folder: str, name: str) -> None:
    """``folder/name`` written whole or not at all."""
    tmp = os.path.join(folder, f".tmp-{name}")
    with writing(f"image {name}", folder, _KEPT):
        try:
            img.save(tmp, pnginfo=pnginfo)
            os.replace(tmp, os.path.join(folder, name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class _Scorer:
    name = ""

    def per_image(self, paths: list[str], prompts: list[str]) -> list[dict]:
        raise NotImplementedError

    def aggregate(self, rows: list[dict], styles: list[str]) -> dict:
        raise NotImplementedError


class ShapesScorer(_Scorer):
    name = "shapes"

    def per_image(self, paths, prompts):
        from ..lab.geneval_tags import geneval_tags
        from ..lab.score import load_rgb, parse_prompt, score_image

        rows = []
        for p, t in zip(paths, prompts):
            full = score_image(load_rgb(p), t)
            row = {k: v for k, v in full.items() if k in SHAPES_KEYS + ("all",)}
            row["geneval"] = geneval_tags(parse_prompt(t), full["detected"])
            rows.append(row)
        return rows

    def aggregate(self, rows, styles):
        """The shapes categories, then GenEval's tags where they apply (``geneval_TAG``, ``geneval_overall``; rows
        scored before the tags existed are left out of them)."""
        from ..lab.geneval_tags import TAGS
        from ..lab.score import aggregate

        agg = aggregate(rows)
        out = {k: agg.get(k) for k in SHAPES_KEYS + ("all",)}
        tags = agg.get("geneval") or {}
        out.update({f"geneval_{t}": tags[t] for t in TAGS + ("overall",) if tags.get(t) is not None})
        return out


class _ImageScorer(_Scorer):
    """A scorer with a learned model: one number per (image, prompt), stored under ``key``; aggregated as the mean
    per style plus the mean over styles."""

    key = ""

    def score(self, images: list, prompts: list[str]) -> list[float]:
        raise NotImplementedError

    def per_image(self, paths, prompts):
        return [{self.key: v} for v in self.score(open_rgb(paths), prompts)]

    def aggregate(self, rows, styles):
        return _style_means(rows, styles, self.key)


class ClipScorer(_ImageScorer):
    name, key = "clip", "clip_score"

    def __init__(self, checkpoint: str, device: str = "cpu", processor: str | None = None):
        from .clip_score import load_clip

        self.model, self.processor = load_clip(checkpoint, device, processor)

    def score(self, images, prompts):
        from .clip_score import clip_scores

        return clip_scores(images, prompts, self.model, self.processor)


class PickScoreScorer(ClipScorer):
    name, key = "pickscore", "pickscore"

    def score(self, images, prompts):
        from .clip_score import pick_scores

        return pick_scores(images, prompts, self.model, self.processor)


class HPSv2Scorer(_ImageScorer):
    name, key = "hpsv2", "hpsv2"

    def __init__(self, checkpoint: str, tokenizer: str, device: str = "cpu"):
        from .hpsv2 import HPSv2

        self.hps = HPSv2(checkpoint, tokenizer, device)

    def score(self, images, prompts):
        return self.hps.scores(images, prompts)


class CompBenchScorer(_ImageScorer):
    key = "score"

    def __init__(self, category: str, bench):
        self.name, self.category, self.bench = f"compbench-{category}", category, bench
        for kind in bench.needs(category):  # every checkpoint the category needs, before any generation
            bench._get(kind)

    def score(self, images, prompts):
        return self.bench.score(self.category, images, prompts)

    def aggregate(self, rows, styles):  # the benchmark's number: the mean over all images
        return {"score": sum(r["score"] for r in rows) / len(rows)}


def _style_means(rows: list[dict], styles: list[str], key: str) -> dict:
    out = {}
    for st in sorted(set(styles)):
        vals = [r[key] for r, s_ in zip(rows, styles) if s_ == st]
        out[st] = sum(vals) / len(vals)
    if len(out) > 1:
        out["average"] = sum(out.values()) / len(out)  # HPSv2's benchmark average: the mean over styles
    else:
        out = {"average": next(iter(out.values()))}
    return out


def make_scorers(
    names: list[str],
    clip_checkpoint: str | None = None,
    device: str = "cpu",
    hps_checkpoint: str | None = None,
    hps_tokenizer: str | None = None,
    compbench=None,
    pickscore: str | None = None,
    pickscore_processor: str | None = None,
) -> list[_Scorer]:
    """Scorers by name; ``compbench``: a :class:`koala.eval.compbench.CompBench` for the compbench-* scorers."""
    out: list[_Scorer] = []
    for n in names:
        if n.startswith("compbench-"):
            from .compbench import CATEGORIES, CompBench

            if n[len("compbench-") :] not in CATEGORIES:
                raise KoalaError(f"unknown scorer {n!r}; choose from {', '.join(SCORERS)}", option="scorers")
            out.append(
                CompBenchScorer(n[len("compbench-") :], compbench or CompBench(clip=clip_checkpoint, device=device))
            )
            continue
        if n == "shapes":
            out.append(ShapesScorer())
        elif n == "clip":
            if not clip_checkpoint:
                raise KoalaError("scorer clip needs a CLIP checkpoint directory (clip_checkpoint)", option="clip")
            out.append(ClipScorer(clip_checkpoint, device))
        elif n == "pickscore":
            if not pickscore:
                raise KoalaError(
                    "scorer pickscore needs the PickScore checkpoint directory (pickscore)", option="pickscore"
                )
            out.append(PickScoreScorer(pickscore, device, pickscore_processor))
        elif n == "hpsv2":
            if not hps_checkpoint or not hps_tokenizer:
                raise KoalaError(
                    "scorer hpsv2 needs the HPSv2 checkpoint (HPS_v2_compressed.pt) and a CLIP tokenizer directory",
                    option="hps_checkpoint",
                )
            out.append(HPSv2Scorer(hps_checkpoint, hps_tokenizer, device))
        else:
            raise KoalaError(f"unknown scorer {n!r}; choose from {', '.join(SCORERS)}", option="scorers")
    return out


def geneval_benchmark(
    path: str, detector: str | None, clip: str | None, device: str = "cpu", limit: int | None = None
) -> tuple[str, list[Prompt], list]:
    """``--benchmark geneval=FILE``: GenEval's prompts from its evaluation_metadata.jsonl (FILE, or a folder holding
    it) and the GenEval scorer (per tag and overall; images of a prompt: one per seed)."""
    from .geneval import read_metadata
    from .geneval_models import GenEval, GenEvalScorer

    meta = read_metadata(path)[:limit]
    opts = ("geneval_detector", "geneval_clip")
    prompts = [Prompt("all", i, m["prompt"]) for i, m in enumerate(meta)]
    return "geneval", prompts, [GenEvalScorer(meta, GenEval(detector, clip, device, options=opts))]


def score_images(model: EvalModel, images: list[dict], scorer: _Scorer, out_dir: str, progress: bool = True) -> dict:
    """Per-image scores of one model by one scorer (cached), aggregated."""
    cache, scored_now = _score_missing(model, images, scorer, out_dir, progress)
    rows = [cache[r["key"]] for r in images]
    return scorer.aggregate(rows, [r["style"] for r in images]) | {"_scored_now": scored_now}


def _score_missing(
    model: EvalModel,
    images: list[dict],
    scorer: _Scorer,
    out_dir: str,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[dict, int]:
    """(key -> per-image scores, how many were scored now): ``images`` not scored yet are scored and appended to
    the score file (process ``rank``'s part of it when ``world_size`` > 1)."""
    from ..utils.parts import part_path

    folder = os.path.join(out_dir, "scores", model.name)
    os.makedirs(folder, exist_ok=True)
    cache_path = os.path.join(folder, f"{scorer.name}.jsonl")
    cache = _read_jsonl(cache_path)
    cache_path = part_path(cache_path, rank, world_size)
    todo = [r for r in images if r["key"] not in cache]
    img_dir = os.path.join(out_dir, "images", model.name)
    from ..utils.console import progress_bar

    chunk = 16
    for i in progress_bar(
        range(0, len(todo), chunk), desc=f"{scorer.name} {model.name}", disable=not progress or not todo
    ):
        part = todo[i : i + chunk]
        scores = scorer.per_image([os.path.join(img_dir, r["file"]) for r in part], [r["prompt"] for r in part])
        for r, sc in zip(part, scores):
            entry = {"key": r["key"], **sc}
            _append(cache_path, entry)
            cache[r["key"]] = entry
    return cache, len(todo)


def model_fid(
    model: EvalModel, images: list[dict], out_dir: str, reference: str, inception: str, device: str = "cpu"
) -> float:
    """FID of one model's images against ``reference`` (cached while the images, reference and network stay)."""
    from ..utils.files import atomic_write_text
    from .fid import fid

    key = hashlib.sha1(
        json.dumps([sorted(r["key"] for r in images), os.path.abspath(reference), os.path.abspath(inception)]).encode()
    ).hexdigest()[:16]
    path = os.path.join(out_dir, "scores", model.name, "fid.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["fid"]
    res = fid(os.path.join(out_dir, "images", model.name), reference, inception, device=device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, **res}, indent=1))
    return res["fid"]


def run_eval(
    models: list[EvalModel],
    prompts: list[Prompt],
    scorers: list[_Scorer],
    out_dir: str,
    settings: EvalSettings | None = None,
    progress: bool = True,
    log=print,
    fid_reference: str | None = None,
    inception: str | None = None,
    benchmarks: list[tuple[str, list[Prompt], list[_Scorer]]] = (),
    rank: int = 0,
    world_size: int = 1,
    merge: bool = False,
) -> dict:
    """Generate and score every model; writes ``results.json``, ``results.md`` and (with matplotlib) ``results.png``
    in ``out_dir``. Returns the results dict.

    ``prompts`` / ``scorers``: the main prompt set and what scores it (FID, when asked for, is over its images);
    ``benchmarks``: more (name, prompt set, scorers), e.g. ("hpsv2", HPSv2's prompts, [HPSv2]) and
    ("compbench-color", color_val.txt, [B-VQA]): the paper's Table 5 in one run. Images of a prompt that two sets
    share are generated once.

    ``rank`` / ``world_size`` > 1: this process's share only, then (launched together) a barrier and rank 0
    merges; a process that does not merge returns ``{"part": rank, "world_size": world_size}``. ``merge``: write
    the results from every rank's parts, generating nothing (see the module doc)."""
    from ..utils.parts import check_rank, launched_together, wait_for_all

    s = settings or EvalSettings()
    check_rank(rank, world_size)
    sets, union = _prompt_sets(models, prompts, scorers, benchmarks, out_dir)
    if world_size > 1:
        _run_share(models, sets, union, s, out_dir, progress, rank, world_size)
        if launched_together(world_size):
            wait_for_all("koala eval run")
        else:
            log(
                f"rank {rank} of {world_size}: its share is done; once every rank's is, merge (koala eval run --merge)"
            )
        if rank or not launched_together(world_size):
            return {"part": rank, "world_size": world_size}
        merge = True
    previous = _read_previous(out_dir)
    measured = _read_part_stats(out_dir) if merge else {}
    rows = []
    for m in models:
        fid_args = (fid_reference, inception) if fid_reference else None
        row = _model_row(m, sets, union, s, out_dir, progress, previous.get(m.name, {}), measured, merge, fid_args)
        rows.append(row)
        log(f"{m.name}: {row.n_images} images ({row.generated_now} generated now)")
    result = {
        "schema": SCHEMA,
        "settings": {**asdict(s), "seeds": list(s.seeds)},
        "prompts": {name: {"n": len(ps), "styles": sorted({p.style for p in ps})} for name, ps, _ in sets},
        "models": [asdict(r) for r in rows],
    }
    with writing("the results", out_dir, _KEPT):
        atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1))
        atomic_write_text(os.path.join(out_dir, "results.md"), markdown(result))
    plot(result, os.path.join(out_dir, "results.png"), log)
    if merge:  # the results now hold what the parts measured
        for path in glob.glob(os.path.join(out_dir, "parts", "rank*-of-*.json")):
            os.remove(path)
    return result


def _prompt_sets(models, prompts, scorers, benchmarks, out_dir) -> tuple[list, dict[tuple[str, str], Prompt]]:
    """The checked prompt sets [(name, prompts, scorers)] and the union of their prompts (made once each)."""
    from ..utils.files import check_output_folder

    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise KoalaError(f"model names must differ: {names}", option="model")
    if not models:
        raise KoalaError("no model to evaluate", option="model")
    sets = ([("main", prompts, scorers)] if prompts else []) + list(benchmarks)
    if not sets:
        raise KoalaError("no prompts: give a prompt set and/or benchmarks", option="prompts")
    check_output_folder(out_dir, "eval run output")
    os.makedirs(out_dir, exist_ok=True)
    union: dict[tuple[str, str], Prompt] = {}
    for _, ps, _ in sets:
        for p in ps:
            union.setdefault((p.style, p.text), p)
    return sets, union


def _model_row(m, sets, union, s, out_dir, progress, old: dict, measured: dict, merge: bool, fid_args) -> ModelRow:
    """One model's row: its images (made unless ``merge``), what was measured making them, its scores (and FID
    over the first set's images against ``fid_args`` = (reference, inception))."""
    row = ModelRow(m.name, m.source())
    by_key = {r["key"]: r for r in generate_images(m, list(union.values()), s, out_dir, row, progress, make=not merge)}
    part = measured.get(m.name)
    if part and part["source"] == row.source:  # measured by the ranks that made the images
        for k in ("params", "latency_s", "peak_gib", "memory_kind", "generated_now"):
            setattr(row, k, part[k])
    elif not row.generated_now and old.get("source") == row.source:  # measured in the run that made the images
        row.params = old.get("params", old.get("unet_params"))  # results written before the rename
        for k in ("latency_s", "peak_gib", "memory_kind"):
            setattr(row, k, old.get(k))
    row.n_images = len(by_key)
    for set_name, ps, scs in sets:
        images = _set_images(m, ps, union, s, by_key)
        for sc in scs:
            agg = score_images(m, images, sc, out_dir, progress)
            agg.pop("_scored_now")
            label = sc.name if set_name in ("main", sc.name) else f"{set_name}:{sc.name}"
            row.scores[label] = agg
        if fid_args and set_name == sets[0][0]:
            device = "cuda" if (s.device or "").startswith("cuda") else "cpu"
            row.scores["fid"] = {"fid": model_fid(m, images, out_dir, *fid_args, device)}
    return row


def _run_share(models, sets, union, s: EvalSettings, out_dir: str, progress: bool, rank: int, world_size: int):
    """Process ``rank``'s share of every model's images, generated and scored into its part files; what it measured
    goes to ``OUT/parts/rankR-of-W.json`` (written last: its share is then complete)."""
    from ..utils.files import atomic_write_json

    measured = {}
    for m in models:
        row, times = ModelRow(m.name, m.source()), []
        mine = generate_images(m, list(union.values()), s, out_dir, row, progress, rank, world_size, times=times)
        by_key = {r["key"]: r for r in mine}
        for _, ps, scs in sets:
            images = _set_images(m, ps, union, s, by_key, only_present=True)
            for sc in scs:
                _score_missing(m, images, sc, out_dir, progress, rank, world_size)
        measured[m.name] = {**asdict(row), "seconds": times}
    with writing("this rank's measurements", out_dir, _KEPT):
        path = os.path.join(out_dir, "parts", f"rank{rank}-of-{world_size}.json")
        atomic_write_json(path, {"schema": SCHEMA, "rank": rank, "world_size": world_size, "models": measured})


def _read_part_stats(out_dir: str) -> dict:
    """model name -> what the ranks measured making its images (params, median latency over every image they
    made, the largest peak memory, how many they made); models no rank made an image of are left out."""
    from ..utils.files import read_json

    out: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "parts", "rank*-of-*.json"))):
        for name, r in read_json(path).get("models", {}).items():
            if not r.get("generated_now"):
                continue
            acc = out.setdefault(name, {"source": r["source"], "params": 0, "peak_gib": 0.0, "seconds": []})
            if acc["source"] != r["source"]:
                continue
            acc["params"] = max(acc["params"], r.get("params") or 0)
            acc["peak_gib"] = max(acc["peak_gib"], r.get("peak_gib") or 0.0)
            acc["memory_kind"] = r.get("memory_kind", "")
            acc["seconds"] += r.get("seconds", [])
    for acc in out.values():
        acc["generated_now"] = len(acc["seconds"])
        acc["latency_s"] = statistics.median(acc["seconds"]) if acc["seconds"] else None
    return out


def _set_images(
    m: EvalModel, ps: list[Prompt], union: dict, s: EvalSettings, by_key: dict, only_present: bool = False
) -> list[dict]:
    """The index rows of model ``m``'s images of one prompt set (every prompt x seed, in order; ``only_present``:
    those in ``by_key``, a rank's share)."""
    resolved, timesteps = model_settings(m, s)
    keys = [image_key(m, union[(p.style, p.text)], seed, resolved, timesteps) for p in ps for seed in s.seeds]
    return [by_key[k] for k in keys if k in by_key] if only_present else [by_key[k] for k in keys]


def _read_previous(out_dir: str) -> dict:
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return {m["name"]: m for m in json.load(f).get("models", [])}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def _columns(result: dict) -> list[tuple[str, str]]:
    cols: list[tuple[str, str]] = []
    for m in result["models"]:
        for sc, agg in m["scores"].items():
            for k in agg:
                if (sc, k) not in cols:
                    cols.append((sc, k))
    return cols


def markdown(result: dict) -> str:
    cols = _columns(result)
    head = ["model", "denoiser params", "latency (s/img)", "peak mem (GiB)"] + [f"{sc} {k}" for sc, k in cols]
    rows = []
    for m in result["models"]:

        def fmt(sc, k):
            v = m["scores"].get(sc, {}).get(k)
            if v is None:
                return "-"
            return (
                f"{100 * v:.1f}%"
                if sc.endswith("shapes")
                else f"{v:.3f}"
                if sc.startswith("compbench") or ":compbench" in sc
                else f"{v:.2f}"
            )  # (FID: lower is better)

        cells = [
            m["name"],
            f"{m['params'] / 1e6:.1f}M" if m.get("params") else "-",
            f"{m['latency_s']:.3f}" if m.get("latency_s") is not None else "-",
            f"{m['peak_gib']:.2f}" if m.get("peak_gib") is not None else "-",
        ] + [fmt(sc, k) for sc, k in cols]
        rows.append(cells)
    st = result["settings"]
    lines = [markdown_table(head, rows), ""]
    sets = ", ".join(f"{name} {v['n']}" for name, v in result["prompts"].items())
    lines.append(
        f"prompts: {sets}; x {len(st['seeds'])} seed(s); {_sampling_text(result)}; latency: median per image in the "
        "run that generated the images"
    )
    return "\n".join(lines) + "\n"


def _sampling_text(result: dict) -> str:
    """The sampler settings of the table: one line when every model sampled alike, else per model."""
    st = result["settings"]

    def text(d: dict) -> str:
        ts = f" (timesteps {', '.join(map(str, d['timesteps']))})" if d.get("timesteps") else ""
        return f"{d['scheduler']}, {d['steps']} steps{ts}, cfg {d['cfg']}"

    per_model = {m["name"]: text({**st, **m.get("sampling", {})}) for m in result["models"]}
    if len(set(per_model.values())) <= 1:
        return next(iter(per_model.values()), text(st))
    return "sampling per model (each one's recorded defaults): " + "; ".join(f"{k} {v}" for k, v in per_model.items())


def plot(result: dict, path: str, log=print) -> str | None:
    """Score against latency, one point per model, one panel per scorer's headline number."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed; no plot (pip install 'koala-diffusion[plots]')")
        return None
    first = result["models"][0]["scores"]
    heads = [
        (sc, "binding" if "binding" in agg else "average" if "average" in agg else next(iter(agg)))
        for sc, agg in first.items()
    ]
    if not heads:
        return None
    fig, axes = plt.subplots(1, len(heads), figsize=(4.5 * len(heads), 3.6), squeeze=False)
    for ax, (sc, k) in zip(axes[0], heads):
        for m in result["models"]:
            v, lat = m["scores"].get(sc, {}).get(k), m.get("latency_s")
            if v is None or lat is None:
                continue
            y = 100 * v if sc.endswith("shapes") else v
            ax.scatter([lat], [y])
            ax.annotate(m["name"], (lat, y), fontsize=8)
        ax.set_xlabel("latency (s / image)")
        ax.set_ylabel(f"{sc} {k}" + (" (%)" if sc.endswith("shapes") else ""))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
