"""Teacher ControlNets on KOALA students: ``koala controlnet transfer``.

Reads a teacher's diffusers ControlNet folder, checks that it is a ControlNet of the student's teacher (family,
sizes, every tensor's shape), builds the ControlNet whose encoder mirrors the student U-Net's
(:mod:`koala.arch.controlnet`), initialises it from the teacher ControlNet through the student's layer map, and
writes it atomically as a diffusers folder with a model card and ``koala_controlnet.json`` (what it was transferred
from). A student without a mid block gets :class:`~koala.arch.controlnet_model.KoalaControlNetModel`, whose source
is copied into the folder (``koala_controlnet.py``, named in ``config.json``'s ``auto_map``) so that diffusers'
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads it without koala.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from ..arch.controlnet import (
    CONTROLNET_CLASSES,
    build_controlnet,
    controlnet_class_name,
    encoder_mismatches,
    init_controlnet_from_teacher,
    residual_slots,
    student_controlnet_config,
)
from ..arch.layer_map import LayerMap
from ..errors import KoalaError
from ..utils.files import atomic_output_dir, atomic_write_json, atomic_write_text, read_json, refuse_existing
from ..utils.weights import check_safetensors, count_params, safetensors_header

RECORD = "koala_controlnet.json"
REMOTE_CODE = "koala_controlnet.py"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass
class ControlNetTransfer:
    out: str
    family: str
    class_name: str  # ControlNetModel, or KoalaControlNetModel (no mid block)
    teacher_residuals: int  # zero convolutions of the teacher ControlNet's encoder (controlnet_down_blocks)
    student_residuals: int  # the student's: its U-Net's down-block residual count
    slot_map: list[int]  # student residual k <- teacher residual slot_map[k]
    mid: str  # "copied" (the student has a mid block) or "zero" (a new zero convolution: no mid block)
    teacher_params: int
    student_params: int

    def summary(self) -> str:
        return (
            f"{self.family} ControlNet -> {self.out} ({self.class_name}): {self.student_params / 1e6:.2f}M parameters "
            f"(teacher ControlNet {self.teacher_params / 1e6:.2f}M); {self.student_residuals} residuals taken from "
            f"the teacher's {self.teacher_residuals} (slots {self.slot_map}); mid residual: {self.mid}"
        )


def _weight_files(path: str) -> list[str]:
    """The safetensors file(s) of a ControlNet folder: one file, or the shards its index names."""
    for name in WEIGHTS:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    index = os.path.join(path, WEIGHTS[0] + ".index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [os.path.join(path, s) for s in shards]
    raise KoalaError(
        f"{path}: no {WEIGHTS[0]} (koala reads ControlNet weights as safetensors only; other formats would be "
        "unpickled)",
        option="controlnet",
    )


def read_controlnet_config(path: str) -> dict:
    """The config of a ControlNet folder, refused (naming the file) when it is not a diffusers ControlNet."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg_path):
        raise KoalaError(
            f"{path}: not a ControlNet folder (no config.json); give a diffusers ControlNet directory "
            "(config.json + diffusion_pytorch_model.safetensors)",
            option="controlnet",
        )
    cfg = read_json(cfg_path)
    if cfg.get("_class_name") not in CONTROLNET_CLASSES:
        raise KoalaError(
            f"{cfg_path}: _class_name is {cfg.get('_class_name')!r}, not a ControlNet "
            f"({' / '.join(CONTROLNET_CLASSES)})",
            option="controlnet",
        )
    return cfg


def _family_hint(cfg: dict) -> str:
    """Which family a ControlNet config looks like (messages only)."""
    from ..families import FAMILIES

    for fam in FAMILIES.values():
        ref = fam.reference_config
        if fam.controlnet_pipeline_class_name and ref.get("addition_embed_type") == cfg.get("addition_embed_type"):
            if ref.get("cross_attention_dim") == cfg.get("cross_attention_dim"):
                return f" (it looks like a full-size {fam.label} ControlNet)"
    return ""


def load_teacher_controlnet(path: str, teacher_config: dict, family_label: str, dtype=None):
    """The teacher ControlNet of ``path``, refused unless its encoder is the teacher U-Net's (``teacher_config``)
    and every tensor in its file has the shape its config says."""
    from safetensors.torch import load_file

    cfg = read_controlnet_config(path)
    bad = encoder_mismatches(cfg, teacher_config)
    if bad:
        raise KoalaError(
            f"{os.path.join(path, 'config.json')}: a ControlNet for another model family or size{_family_hint(cfg)}; "
            f"its encoder is not the student's {family_label} teacher's:\n  " + "\n  ".join(bad[:8]),
            option="controlnet",
        )
    model = build_controlnet(cfg, "meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        check_safetensors(f)
        _check_shapes(f, safetensors_header(f), expected)
        state.update(load_file(f))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KoalaError(f"{path}: the ControlNet's weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    dt = dtype or next(iter(state.values())).dtype
    model.load_state_dict({k: v.to(dt) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def _check_shapes(path: str, header: dict, expected: dict[str, tuple]) -> None:
    problems = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(info.get("shape", ()))
        if name not in expected:
            problems.append(f"{name}: no such tensor in a ControlNet of this config")
        elif shape != expected[name]:
            problems.append(f"{name}: shape {shape}, the config (and the student's teacher) needs {expected[name]}")
    if problems:
        raise KoalaError(
            f"{path}: does not fit the student's teacher ({len(problems)} tensors):\n  " + "\n  ".join(problems[:8]),
            option="controlnet",
        )


def transfer_controlnet(
    controlnet: str, student: str, out: str, overwrite: bool = False, dtype=None
) -> ControlNetTransfer:
    """Write the student ControlNet of teacher ControlNet folder ``controlnet`` for the student ``student`` (a
    pipeline or U-Net folder with ``koala_layer_map.json``) to the folder ``out``, atomically."""
    from ..families import get_family

    refuse_existing(out, overwrite)
    lmap = LayerMap.load(student)
    fam = get_family(lmap.family)
    if not fam.controlnet_pipeline_class_name:
        raise KoalaError(
            f"{student}: a {fam.label} student; diffusers has no ControlNet for {fam.label} (no ControlNet model or "
            "pipeline for it), so there is nothing to transfer to",
            option="student",
        )
    teacher = load_teacher_controlnet(controlnet, lmap.teacher_config, fam.label, dtype)
    cfg = student_controlnet_config(dict(teacher.config), lmap.student_config)
    model = build_controlnet(cfg, "meta")
    slots = init_controlnet_from_teacher(teacher, model, lmap)
    result = ControlNetTransfer(
        os.path.abspath(out),
        fam.name,
        controlnet_class_name(cfg),
        len(residual_slots(teacher)),
        len(residual_slots(model)),
        slots,
        "copied" if model.mid_block is not None else "zero",
        count_params(teacher),
        count_params(model),
    )
    record = {**asdict(result), "teacher_controlnet": os.path.abspath(controlnet), "student": os.path.abspath(student)}
    record["teacher_path"] = lmap.meta.get("teacher_path")
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if result.class_name == "KoalaControlNetModel":
            add_remote_code(tmp)
        atomic_write_json(os.path.join(tmp, RECORD), record)
        atomic_write_text(os.path.join(tmp, "README.md"), controlnet_card(result, record, fam))
    return result


def add_remote_code(folder: str) -> None:
    """Copy the subclass's source beside the weights and name it in ``auto_map`` (diffusers' AutoModel)."""
    from ..arch import controlnet_model

    shutil.copyfile(controlnet_model.__file__, os.path.join(folder, REMOTE_CODE))
    cfg_path = os.path.join(folder, "config.json")
    cfg = read_json(cfg_path)
    cfg["auto_map"] = {"AutoModel": f"{REMOTE_CODE[:-3]}.KoalaControlNetModel"}
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def controlnet_card(result: ControlNetTransfer, record: dict, fam) -> str:
    """The student ControlNet's model card (Hugging Face format): what it is, where it came from, how to use it."""
    import yaml

    from .. import __version__
    from ..card import teacher_card_fields

    meta = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["koala", "controlnet", f"family-{fam.name}"],
        **teacher_card_fields(record["teacher_controlnet"]),
    }
    load = load_snippet(result.class_name)
    body = [
        "# Student ControlNet (koala)",
        "",
        f"A {fam.label} ControlNet moved onto a KOALA student by `koala controlnet transfer` (koala {__version__}).",
        "Its encoder mirrors the student U-Net's: the blocks and transformer layers the student's layer map keeps, "
        f"initialised from the teacher ControlNet at the mapped locations. {result.student_residuals} "
        "zero-convolution residuals (the student's down-block residuals) are taken from the teacher's "
        f"{result.teacher_residuals} (student slot k <- teacher slot {result.slot_map}[k]); "
        f"the mid residual is {result.mid}"
        + (
            " (the student has no mid block: a new zero convolution, which adds nothing until trained)."
            if result.mid == "zero"
            else "."
        ),
        "",
        f"- teacher ControlNet: `{record['teacher_controlnet']}`",
        f"- student: `{record['student']}` (teacher `{record.get('teacher_path')}`)",
        f"- parameters: {result.student_params:,} (teacher ControlNet {result.teacher_params:,})",
        f"- class: `{result.class_name}`; pipeline: diffusers `{fam.controlnet_pipeline_class_name}` with the student",
        "",
        "## Use",
        "",
        "```python",
        load,
        f"pipe = {fam.controlnet_pipeline_class_name}.from_pretrained(STUDENT, controlnet=controlnet)",
        "```",
        "",
        "or `koala generate --model STUDENT --controlnet FOLDER --control-image IMAGE --control-scale 1.0`.",
        "",
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body)


def load_snippet(class_name: str) -> str:
    """The model card's Python lines that load a student ControlNet of ``class_name`` from ``FOLDER``."""
    if class_name == "KoalaControlNetModel":
        return (
            "from diffusers import AutoModel\n"
            "controlnet = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)  # koala_controlnet.py\n"
            "# or, with koala installed: koala.inference.load_controlnet(FOLDER)"
        )
    return "from diffusers import ControlNetModel\ncontrolnet = ControlNetModel.from_pretrained(FOLDER)"
