"""``koala compress``: a teacher directory -> a student directory initialised from the teacher's weights.

The teacher's family (SDXL, SD-1.x, ...) is detected from its config; the family builds the student config
for the preset and the teacher->student layer map; every student tensor is copied from the teacher tensor the
map names. Output is written atomically; ``koala_layer_map.json`` sits next to the student's ``config.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .card import write_model_card
from .families import family_of, model_dir_kind
from .families.sampling import SPACING, check_kind, sampling_scheduler
from .formats.single_file import load_denoiser
from .utils.files import atomic_output_dir, read_json, refuse_existing
from .utils.weights import count_params


@dataclass
class CompressResult:
    out_dir: str
    kind: str  # "pipeline" or "model" (a denoiser directory: a U-Net or a transformer)
    family: str
    teacher_params: int
    student_params: int
    tensors_copied: int

    @property
    def kept(self) -> float:
        return self.student_params / self.teacher_params


def compress(
    teacher_path: str,
    preset,
    out_dir: str,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    layer_selection: str = "bottom",
    teacher_unet: str | None = None,
    family: str | None = None,
    teacher_kind: str = "base",
    teacher_config: str | None = None,
    _source: str | None = None,
) -> CompressResult:
    """Compress ``teacher_path`` (model dir or pipeline dir) into ``out_dir`` atomically.

    For a pipeline, ``out_dir`` becomes a full pipeline directory with the student in the denoiser's folder.
    ``teacher_unet`` replaces the pipeline's denoiser (U-Net or transformer) as the teacher (e.g. a SDXL-Lightning
    U-Net checkpoint).
    ``teacher_path`` may be a single-file SDXL / SD-1.x checkpoint (``.safetensors``, original key layout); it is
    converted offline with ``teacher_config`` (a pipeline directory of the same architecture) or, for SDXL, the
    configs koala ships (:mod:`koala.formats.single_file`).
    ``teacher_kind`` (base / turbo / lightning) is recorded in the layer map; a turbo or lightning student pipeline
    gets the scheduler it is sampled with (Euler, trailing spacing; :mod:`koala.families.sampling`).
    """
    check_kind(teacher_kind, "teacher_kind")
    if os.path.isfile(teacher_path):  # a single-file checkpoint (SDXL fine-tunes ship so): converted offline first
        return _compress_single_file(
            teacher_path,
            teacher_config,
            out_dir,
            overwrite,
            preset=preset,
            dtype=dtype,
            layer_selection=layer_selection,
            teacher_unet=teacher_unet,
            family=family,
            teacher_kind=teacher_kind,
        )
    kind = model_dir_kind(teacher_path)
    fam = family_of(teacher_path, family)
    spec = fam.resolve_spec(preset)  # refuse a wrong preset before loading gigabytes
    refuse_existing(out_dir, overwrite)
    if kind == "pipeline":  # the other components are copied into the output: refuse a broken pipeline first
        fam.check_pipeline_dir(teacher_path, "teacher")
    teacher, fam = load_denoiser(teacher_unet or teacher_path, dtype, config_from=teacher_path, family=fam)
    student, lmap = fam.compress(teacher, spec, layer_selection, dtype)
    recorded = os.path.abspath(teacher_unet) if teacher_unet else (_source or os.path.abspath(teacher_path))
    lmap.meta.update(
        {"teacher_path": recorded, "preset": preset if isinstance(preset, str) else None, "teacher_kind": teacher_kind}
    )
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model_out = _copy_pipeline(teacher_path, tmp, fam, teacher_kind) if kind == "pipeline" else tmp
        student.save_pretrained(model_out, safe_serialization=True)
        lmap.save(model_out)
        # the student's model card replaces the teacher's (copied with the pipeline) at the top of the output
        write_model_card(tmp, lmap, count_params(student), count_params(teacher), layout=kind)
    return CompressResult(
        os.path.abspath(out_dir),
        kind,
        fam.name,
        count_params(teacher),
        count_params(student),
        len(student.state_dict()),
    )


def _compress_single_file(
    teacher_path: str, teacher_config: str | None, out_dir: str, overwrite: bool, **kw
) -> CompressResult:
    """:func:`compress` of a single-file checkpoint, converted offline first into a temporary pipeline directory
    next to ``out_dir``; ``kw``: compress's other arguments."""
    from .formats.single_file import single_file_to_diffusers

    refuse_existing(out_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".koala-teacher-", dir=parent) as tmp:
        converted = single_file_to_diffusers(teacher_path, os.path.join(tmp, "teacher"), config=teacher_config)
        return compress(
            converted.out, out_dir=out_dir, overwrite=overwrite, _source=os.path.abspath(teacher_path), **kw
        )


def _copy_pipeline(teacher_path: str, tmp: str, fam, teacher_kind: str) -> str:
    """Copy the teacher pipeline's other components into ``tmp`` (a turbo / lightning student gets its sampling
    scheduler); returns the student's folder in it."""
    for entry in sorted(os.listdir(teacher_path)):
        src = os.path.join(teacher_path, entry)
        if entry == fam.model_subfolder or entry.startswith(".") or entry == "koala_import.json":
            continue
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(tmp, entry))
        else:
            shutil.copy2(src, os.path.join(tmp, entry))
    sched_dir = os.path.join(tmp, "scheduler")
    if SPACING[teacher_kind] and os.path.isfile(os.path.join(sched_dir, "scheduler_config.json")):
        sampling_scheduler(read_json(os.path.join(sched_dir, "scheduler_config.json")), teacher_kind).save_config(
            sched_dir
        )
    return os.path.join(tmp, fam.model_subfolder)
