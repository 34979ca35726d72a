"""Model cards: the ``README.md`` every student directory koala writes carries (Hugging Face model-card format).

YAML front matter (``library_name: diffusers``, ``pipeline_tag: text-to-image``, ``base_model``, ``license`` when the
teacher's own card names one, tags), then what the student is: preset, parameters against the teacher's, the layer
map per stage, the sampling defaults it is meant to be used with, and, for a training checkpoint, the recipe and step.
"""

from __future__ import annotations

import os
from collections import Counter

import yaml

from . import __version__
from .arch.layer_map import LayerMap
from .families.sampling import SPACING, SamplingDefaults
from .utils.console import markdown_table
from .utils.files import atomic_write_text

CARD = "README.md"


def read_card(path: str) -> tuple[dict, str]:
    """``(front matter, body)`` of a model card file (front matter ``{}`` when it has none)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end > 0:
            meta = yaml.safe_load(text[4:end]) or {}
            return (meta if isinstance(meta, dict) else {}), text[end + 4 :].lstrip("\n")
    return {}, text


def teacher_card_fields(teacher_path: str | None) -> dict:
    """``license`` and ``base_model`` from the teacher's own card (its README.md front matter), when present."""
    for folder in filter(None, (teacher_path, os.path.dirname(teacher_path or ""))):
        path = os.path.join(folder, CARD)
        if os.path.isfile(path):
            try:
                meta, _ = read_card(path)
            except (OSError, yaml.YAMLError):
                return {}
            return {k: meta[k] for k in ("license", "base_model") if meta.get(k)}
    return {}


def _stage_table(lmap: LayerMap) -> list[str]:
    """Per stage: kept blocks, transformer layers, and which teacher layers they were initialised from."""
    rows = []
    layers = Counter(e.stage for e in lmap.of_kind("transformer_layer"))
    blocks = Counter(e.stage for e in lmap.entries if e.kind in ("resnet", "attention", "transformer_block"))
    picked: dict[str, set] = {}
    for e in lmap.of_kind("transformer_layer"):
        picked.setdefault(e.stage, set()).add(e.teacher_layer)
    for stage in lmap.stages():
        src = sorted(x for x in picked.get(stage, ()) if x is not None)
        rows.append([stage, blocks.get(stage, 0), layers.get(stage, 0), ", ".join(map(str, src)) or "-"])
    head = ["stage", "resnet + attention blocks", "transformer layers", "from teacher layers"]
    return markdown_table(head, rows).split("\n")


def model_card(
    lmap: LayerMap,
    student_params: int,
    teacher_params: int | None = None,
    training: dict | None = None,
    name: str | None = None,
    layout: str = "pipeline",
) -> str:
    """The card's text. ``training``: ``{"step", "global_batch", "features", "loss"}`` for a checkpoint;
    ``layout``: what the folder holds (``pipeline``, ``model``: a U-Net / DiT alone, ``checkpoint``: a distill
    checkpoint), for the usage line. Measured results are added later with :func:`add_results`."""
    meta = lmap.meta
    teacher = meta.get("teacher_path") or ""
    from_teacher = teacher_card_fields(teacher)
    base = from_teacher.get("base_model") or (os.path.basename(os.path.normpath(teacher)) if teacher else None)
    front = {"library_name": "diffusers", "pipeline_tag": "text-to-image"}
    if base:
        front["base_model"] = base
    if from_teacher.get("license"):
        front["license"] = from_teacher["license"]
    family = lmap.family
    front["tags"] = ["koala", "knowledge-distillation", "text-to-image", family]
    kind = meta.get("teacher_kind", "base")
    preset = meta.get("preset") or "custom"
    lines = [
        f"# {name or preset}",
        "",
        f"A KOALA student ({preset}, {family} family) compressed from `{teacher or 'the teacher'}` by koala "
        f"{__version__} (Lee et al., NeurIPS 2024): blocks and transformer layers removed, every kept tensor "
        "initialised from the teacher tensor at the same place (`koala_layer_map.json` lists them).",
        "",
        "| | student | teacher |",
        "|---|---|---|",
        f"| denoiser parameters | {student_params:,} | {f'{teacher_params:,}' if teacher_params else '-'} |",
    ]
    if teacher_params:
        lines.append(f"| kept | {100 * student_params / teacher_params:.1f}% | 100% |")
    lines += [
        "",
        "## Layer map",
        "",
        f"Layer selection: {lmap.layer_selection}; teacher kind: {kind}.",
        "",
        *_stage_table(lmap),
        "",
    ]
    lines += _sampling_section(meta, family, layout)
    if training:
        lines += [
            "## Training",
            "",
            f"Distilled with `koala distill` for {training.get('step')} steps at a global batch of "
            f"{training.get('global_batch')} (the whole resolved recipe: `state.json` beside this card, and the "
            "run's `config.yaml`).",
            f"Losses: {training.get('loss')}; feature KD: {training.get('features')}.",
            "",
        ]
    else:
        lines += [
            "## Training",
            "",
            "Not trained yet: this is the compressed initialisation (`koala compress`). "
            "Distill it with `koala distill`.",
            "",
        ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(lines)


def _sampling_section(meta: dict, family: str, layout: str) -> list[str]:
    """How to sample the student: its recorded sampling defaults (``meta.sampling``), else the paper's with the
    spacing for its teacher kind."""
    sub = "transformer" if family == "pixart" else "unet"
    how = {
        "pipeline": "--model THIS_DIR",
        "model": "--unet THIS_DIR --base TEACHER_PIPELINE",
        "checkpoint": f"--unet THIS_DIR/{sub} --base TEACHER_PIPELINE",
    }[layout]
    usage = f'With koala: `koala generate "a photo of a koala" {how}`'
    if "sampling" not in meta:
        spacing = SPACING.get(meta.get("teacher_kind", "base")) or "the pipeline's own (leading for SDXL)"
        return [
            "## Sampling (the paper's defaults)",
            "",
            f"Euler, 10 steps, guidance scale 3.5, timestep spacing: {spacing}. {usage}.",
            "",
        ]
    d = SamplingDefaults.from_meta(meta["sampling"], "koala_layer_map.json: meta.sampling")
    text = f"{d.scheduler}, {d.steps} steps, guidance scale {d.guidance_scale:g}"
    if d.guidance_scale <= 1:
        text += " (no classifier-free guidance pass)"
    if d.timesteps:
        text += f", timesteps {', '.join(map(str, d.timesteps))}"
    if d.scheduler_config:
        text += ", scheduler config " + ", ".join(f"{k}={v}" for k, v in sorted(d.scheduler_config.items()))
    return [
        "## Sampling (recorded with the student)",
        "",
        f"{text}. {usage} (these are its defaults; `--scheduler`, `--steps` and `--cfg` override them). The "
        "record is `meta.sampling` in `koala_layer_map.json`.",
        "",
    ]


def write_model_card(
    folder: str,
    lmap: LayerMap,
    student_params: int,
    teacher_params: int | None = None,
    training: dict | None = None,
    layout: str = "pipeline",
) -> str:
    return atomic_write_text(
        os.path.join(folder, CARD), model_card(lmap, student_params, teacher_params, training, layout=layout)
    )


def add_results(folder: str, rows: list[dict], columns: list[str], how: str) -> str:
    """Add (or replace) the card's ``## Results`` section: one table row per dict of ``rows`` (``columns`` in
    order, the first naming the row), and ``how`` (the command that measured them)."""
    path = os.path.join(folder, CARD)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("\n## Results\n")
    if start >= 0:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + (text[nxt:] if nxt >= 0 else "\n")
    table = markdown_table(columns, [[r.get(c, "-") for c in columns] for r in rows])
    section = "\n## Results\n\n" + how + "\n\n" + table + "\n"
    return atomic_write_text(path, text.rstrip("\n") + "\n" + section)
