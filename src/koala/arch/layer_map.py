"""The teacher -> student layer map: for every student module, the teacher module it came from.

Compression writes it (``koala_layer_map.json`` next to the student's ``config.json``); KD hooks, LoRA
transfer and analysis tools read it. Entries are module-name prefixes of diffusers'
``UNet2DConditionModel``; a parameter is mapped by its longest matching student prefix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from ..errors import KoalaError

LAYER_MAP_FILE = "koala_layer_map.json"
FORMAT = "koala-layer-map"
VERSION = 1
SELECTIONS = ("bottom", "interleave", "up")


def select_layers(n_teacher: int, n_student: int, strategy: str = "bottom") -> list[int]:
    """Which teacher transformer layers (0-based) a student with ``n_student`` layers keeps / matches.

    ``bottom``: the first ones (the paper's SA-bottom, App. B.1/B.4). ``up``: the last ones.
    ``interleave``: every other layer from the bottom, topped up with the last layers when that runs out
    (10 -> 6 gives 1,3,5,7,9,10 in the paper's 1-based numbering).
    """
    if n_student > n_teacher:
        raise KoalaError(f"student depth {n_student} exceeds teacher depth {n_teacher}")
    if strategy == "bottom":
        return list(range(n_student))
    if strategy == "up":
        return list(range(n_teacher - n_student, n_teacher))
    if strategy == "interleave":
        if n_student == 0:
            return []
        stride = max(1, math.ceil(n_teacher / n_student))
        picked = [i for i in range(0, n_teacher, stride)][:n_student]
        top = n_teacher - 1
        while len(picked) < n_student:
            if top not in picked:
                picked.append(top)
            top -= 1
        return sorted(picked)
    raise KoalaError(f"unknown layer selection {strategy!r}; choose one of {', '.join(SELECTIONS)}")


@dataclass
class MapEntry:
    student: str  # module prefix in the student, e.g. "up_blocks.0.attentions.1.transformer_blocks.3"
    teacher: str  # module prefix in the teacher it was initialised from / is matched with
    stage: str  # "DW-1".."DW-n", "MID", "UP-1".."UP-n", or "IO" for stem/head modules
    kind: str  # "io", "resnet", "attention", "transformer_layer", "downsampler", "upsampler"
    index: int | None = None  # block index within the stage (student)
    teacher_index: int | None = None
    layer: int | None = None  # transformer layer index (student)
    teacher_layer: int | None = None


@dataclass
class LayerMap:
    entries: list[MapEntry]
    layer_selection: str = "bottom"
    teacher_config: dict[str, Any] = field(default_factory=dict)
    student_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- lookup -----------------------------------------------------------------------------------
    def _sorted(self) -> list[MapEntry]:
        cache = getattr(self, "_by_len", None)
        if cache is None:
            cache = sorted(self.entries, key=lambda e: len(e.student), reverse=True)
            object.__setattr__(self, "_by_len", cache)
        return cache

    def teacher_name(self, student_name: str) -> str:
        """Teacher parameter/module name for a student parameter/module name (longest prefix wins)."""
        for e in self._sorted():
            if student_name == e.student or student_name.startswith(e.student + "."):
                return e.teacher + student_name[len(e.student):]
        raise KoalaError(f"student module {student_name!r} is not covered by the layer map")

    def of_kind(self, kind: str) -> list[MapEntry]:
        return [e for e in self.entries if e.kind == kind]

    def stages(self) -> list[str]:
        seen: list[str] = []
        for e in self.entries:
            if e.stage not in seen and e.stage != "IO":
                seen.append(e.stage)
        return seen

    # -- checks -----------------------------------------------------------------------------------
    def validate(self, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        """Refuse a map that does not fit this teacher/student pair (missing modules or shape mismatches)."""
        t_params = dict(teacher.named_parameters())
        problems = []
        for name, p in student.named_parameters():
            try:
                tname = self.teacher_name(name)
            except KoalaError as err:
                problems.append(str(err))
                continue
            tp = t_params.get(tname)
            if tp is None:
                problems.append(f"{name} -> {tname}: no such teacher parameter")
            elif tuple(tp.shape) != tuple(p.shape):
                problems.append(f"{name} -> {tname}: shape {tuple(p.shape)} vs teacher {tuple(tp.shape)}")
            if len(problems) > 8:
                break
        if problems:
            raise KoalaError(
                "the layer map does not fit this teacher/student pair:\n  " + "\n  ".join(problems[:8])
                + "\nRe-create the student with `koala compress` from this teacher."
            )

    # -- I/O --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "layer_selection": self.layer_selection,
            "meta": self.meta,
            "teacher_config": self.teacher_config,
            "student_config": self.student_config,
            "entries": [asdict(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "layer map") -> "LayerMap":
        if d.get("format") != FORMAT:
            raise KoalaError(f"{where}: not a koala layer map (field 'format' is {d.get('format')!r})")
        try:
            entries = [MapEntry(**e) for e in d["entries"]]
        except (KeyError, TypeError) as err:
            raise KoalaError(f"{where}: malformed 'entries' ({err})") from err
        return cls(entries, d.get("layer_selection", "bottom"), d.get("teacher_config", {}),
                   d.get("student_config", {}), d.get("meta", {}))

    def save(self, directory: str | os.PathLike) -> str:
        path = os.path.join(directory, LAYER_MAP_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerMap":
        path = str(path)
        if os.path.isdir(path):
            for cand in (os.path.join(path, LAYER_MAP_FILE), os.path.join(path, "unet", LAYER_MAP_FILE)):
                if os.path.isfile(cand):
                    path = cand
                    break
            else:
                raise KoalaError(f"{path}: no {LAYER_MAP_FILE} here or in unet/ (was this student made by `koala compress`?)")
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise KoalaError(f"{path}: cannot read layer map ({err})") from err
        return cls.from_dict(d, path)


def _depth(attn_module) -> int:
    return len(attn_module.transformer_blocks)


def _attn_entries(prefix_s, prefix_t, stage, idx_s, idx_t, a_s, a_t, selection) -> Iterable[MapEntry]:
    yield MapEntry(prefix_s, prefix_t, stage, "attention", idx_s, idx_t)
    sel = select_layers(_depth(a_t), _depth(a_s), selection)
    for k, tk in enumerate(sel):
        yield MapEntry(f"{prefix_s}.transformer_blocks.{k}", f"{prefix_t}.transformer_blocks.{tk}", stage,
                       "transformer_layer", idx_s, idx_t, k, tk)


def build_layer_map(teacher: torch.nn.Module, student: torch.nn.Module, selection: str = "bottom") -> LayerMap:
    """Map every student module of an SDXL-topology U-Net to its teacher module at the same location.

    Encoder stages keep their first resnet/attention pairs. Decoder stages keep their first ones plus the
    last one, whose input takes the skip connection with the stage's input channel count (so every copied
    tensor has exactly the teacher tensor's shape). Transformer layers follow ``selection`` (SA-bottom).
    Works on meta-device modules: only structure is read.
    """
    entries: list[MapEntry] = []
    for name in ("conv_in", "time_embedding", "add_embedding", "conv_norm_out", "conv_out"):
        if getattr(student, name, None) is not None:
            entries.append(MapEntry(name, name, "IO", "io"))
    n = len(student.down_blocks)
    if n != len(teacher.down_blocks):
        raise KoalaError(f"student has {n} encoder stages but the teacher has {len(teacher.down_blocks)}")
    for i, (bs, bt) in enumerate(zip(student.down_blocks, teacher.down_blocks)):
        stage = f"DW-{i + 1}"
        if len(bs.resnets) > len(bt.resnets):
            raise KoalaError(f"{stage}: student has more resnets ({len(bs.resnets)}) than the teacher ({len(bt.resnets)})")
        for j in range(len(bs.resnets)):
            entries.append(MapEntry(f"down_blocks.{i}.resnets.{j}", f"down_blocks.{i}.resnets.{j}", stage, "resnet", j, j))
            if getattr(bs, "attentions", None) is not None:
                entries += _attn_entries(f"down_blocks.{i}.attentions.{j}", f"down_blocks.{i}.attentions.{j}", stage,
                                         j, j, bs.attentions[j], bt.attentions[j], selection)
        if bs.downsamplers is not None:
            entries.append(MapEntry(f"down_blocks.{i}.downsamplers", f"down_blocks.{i}.downsamplers", stage, "downsampler"))
    if student.mid_block is not None:
        if teacher.mid_block is None:
            raise KoalaError("student has a mid block but the teacher has none")
        for j in range(len(student.mid_block.resnets)):
            entries.append(MapEntry(f"mid_block.resnets.{j}", f"mid_block.resnets.{j}", "MID", "resnet", j, j))
        for j in range(len(student.mid_block.attentions)):
            entries += _attn_entries(f"mid_block.attentions.{j}", f"mid_block.attentions.{j}", "MID", j, j,
                                     student.mid_block.attentions[j], teacher.mid_block.attentions[j], selection)
    for i, (bs, bt) in enumerate(zip(student.up_blocks, teacher.up_blocks)):
        stage = f"UP-{i + 1}"
        ns, nt = len(bs.resnets), len(bt.resnets)
        if ns > nt:
            raise KoalaError(f"{stage}: student has more resnets ({ns}) than the teacher ({nt})")
        for j in range(ns):
            tj = j if j < ns - 1 else nt - 1
            entries.append(MapEntry(f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.resnets.{tj}", stage, "resnet", j, tj))
            if getattr(bs, "attentions", None) is not None:
                entries += _attn_entries(f"up_blocks.{i}.attentions.{j}", f"up_blocks.{i}.attentions.{tj}", stage,
                                         j, tj, bs.attentions[j], bt.attentions[tj], selection)
        if bs.upsamplers is not None:
            entries.append(MapEntry(f"up_blocks.{i}.upsamplers", f"up_blocks.{i}.upsamplers", stage, "upsampler"))
    return LayerMap(entries, selection, dict(teacher.config), dict(student.config))
