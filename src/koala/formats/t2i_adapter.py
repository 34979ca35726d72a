"""T2I-Adapters on KOALA students: checked, not remapped.

A T2I-Adapter (diffusers' ``T2IAdapter``) is a small network of its own. Its features are not tied to U-Net layers
the way LoRA or IP-Adapter weights are: diffusers' ``UNet2DConditionModel`` adds feature i at the output of encoder
stage i (``down_intrablock_additional_residuals``; a cross-attention stage before its downsampler, a plain stage
after it) and one more after the mid block when its shape fits. A KOALA / BK student keeps each encoder stage it has
at the teacher's width and resolution and drops transformer layers and blocks inside the stages, so the layer map
has nothing to move: the teacher's adapter fits unchanged wherever the student's stage i is the teacher's stage i.
A feature whose stage the student lacks (a stage BK-SDM-Tiny drops, the mid block KOALA drops) is simply not added.
This module checks that and copies the adapter; a student whose stages differ is refused with the reason.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from ..errors import KoalaError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class T2IAdapterTransferReport:
    out: str
    used: list[str]  # the stages whose features the student adds
    unused: list[str]  # features the student has no place for (stages it dropped)
    pipeline: str  # the diffusers pipeline class that runs it

    def summary(self) -> str:
        unused = ", ".join(self.unused) or "none"
        return (
            f"T2I-Adapter -> {self.out}: unchanged (its features go to encoder stages, which the student keeps); "
            f"features used at {', '.join(self.used)}; unused (stage not in the student): {unused}. "
            f"Run it with diffusers' {self.pipeline} and T2IAdapter.from_pretrained"
        )


def injection_points(config: dict) -> list[tuple[str, int, int]]:
    """Where a ``UNet2DConditionModel`` with ``config`` adds T2I-Adapter features, in order: ``(stage, channels,
    downsamplings before the point)`` per encoder stage, then the mid block's when it has one."""
    types, widths = config["down_block_types"], config["block_out_channels"]
    points, downs = [], 0
    for i, (kind, width) in enumerate(zip(types, widths)):
        final = i == len(widths) - 1
        plain = "CrossAttn" not in kind  # a plain stage's feature is added after its downsampler
        points.append((f"DW-{i + 1}", width, downs + (0 if final or not plain else 1)))
        downs += 0 if final else 1
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn"):
        points.append(("MID", widths[-1], downs))
    return points


def read_t2i_adapter(path: str) -> dict:
    """The config of a T2I-Adapter directory (``config.json`` + safetensors weights); a KoalaError naming the
    directory for anything else."""
    from ..utils.files import read_json
    from ..utils.weights import check_safetensors

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise KoalaError(f"{path}: not a T2I-Adapter directory (no config.json; give the T2IAdapter folder)")
    config = read_json(os.path.join(path, "config.json"))
    if config.get("_class_name") != "T2IAdapter":
        raise KoalaError(
            f"{path}: config.json is a {config.get('_class_name') or 'model of no class'}, not a T2IAdapter "
            "(a MultiAdapter: transfer each adapter alone)"
        )
    if not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise KoalaError(f"{path}: no {WEIGHTS} (koala reads safetensors weights only; a .bin would be unpickled)")
    check_safetensors(os.path.join(path, WEIGHTS))
    return config


def transfer_t2i_adapter(path: str, student: str, out: str, overwrite: bool = False) -> T2IAdapterTransferReport:
    """Check the teacher's T2I-Adapter ``path`` fits the student's teacher and the student, and copy it to ``out``
    (a directory, atomically) with a report."""
    from ..arch.layer_map import LayerMap
    from ..families import FAMILIES, get_family, model_config
    from ..utils.files import atomic_output_dir, atomic_write_json, refuse_existing

    refuse_existing(out, overwrite)
    lmap = LayerMap.load(student)
    fam = get_family(lmap.family)
    if not fam.t2i_adapter_pipeline:
        covered = ", ".join(f.label for f in FAMILIES.values() if f.t2i_adapter_pipeline)
        raise KoalaError(f"{student}: T2I-Adapters run on U-Net students ({covered}), not {fam.label}")
    config = read_t2i_adapter(path)
    teacher = injection_points(lmap.teacher_config)
    _check_fits_teacher(path, config, teacher, lmap)
    used, unused = _student_points(student, teacher, injection_points(model_config(student)), len(config["channels"]))
    report = T2IAdapterTransferReport(os.path.abspath(out), used, unused, fam.t2i_adapter_pipeline)
    with atomic_output_dir(out, overwrite) as tmp:
        for name in ("config.json", WEIGHTS):
            shutil.copyfile(os.path.join(path, name), os.path.join(tmp, name))
        info = {"source": os.path.abspath(path), "student": os.path.abspath(student), "report": report.summary()}
        atomic_write_json(os.path.join(tmp, "koala_adapter.json"), info)
    return report


def _check_fits_teacher(path: str, config: dict, points: list, lmap) -> None:
    """Feature i has the width of the teacher's injection point i."""
    channels = list(config["channels"])
    teacher = lmap.meta.get("teacher_path", "from the layer map")
    if len(channels) > len(points):
        raise KoalaError(
            f"{path}: {len(channels)} features but the student's teacher ({teacher}) takes {len(points)}: a "
            "T2I-Adapter for another base model?"
        )
    wrong = [f"{stage}: {c} vs {w}" for c, (stage, w, _) in zip(channels, points) if c != w]
    if wrong:
        raise KoalaError(
            f"{path}: feature widths do not fit the student's teacher ({teacher}; shape mismatch): a T2I-Adapter "
            "for another base model? " + "; ".join(wrong[:3])
        )


def _student_points(student: str, teacher: list, points: list, n_features: int) -> tuple[list[str], list[str]]:
    """``(stages that use a feature, features unused)``; a KoalaError when a student stage is not the teacher's."""
    downs = [p for p in points if p[0] != "MID"]
    t_downs = [p for p in teacher if p[0] != "MID"]
    if downs != t_downs[: len(downs)]:
        raise KoalaError(
            f"{student}: its encoder stages ({downs}) are not the teacher's first ones ({t_downs}): a T2I-Adapter "
            "adds its features per stage, so it has no place in this student"
        )
    used = [stage for stage, *_ in downs[:n_features]]
    mid = points[-1] if points[-1][0] == "MID" else None
    # the next feature reaches the mid block; diffusers adds it only when its shape is the mid block's
    if mid is not None and len(downs) < n_features and teacher[len(downs)][1:] == mid[1:]:
        used.append("MID")
    unused = [stage for stage, *_ in teacher[:n_features] if stage not in used]
    return used, unused
