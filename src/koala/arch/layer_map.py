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
from typing import Any

import torch

from ..errors import KoalaError

LAYER_MAP_FILE = "koala_layer_map.json"
FORMAT = "koala-layer-map"
VERSION = 1
SELECTIONS = ("bottom", "interleave", "up")
DEFAULT_FAMILY = "sdxl"  # the family of a layer map that does not name one (written before families existed)


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
        picked = list(range(0, n_teacher, stride))[:n_student]
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

    def entry(self, student_name: str) -> MapEntry | None:
        """The entry covering a student parameter/module name (longest prefix wins); None when none does."""
        for e in self._sorted():
            if student_name == e.student or student_name.startswith(e.student + "."):
                return e
        return None

    def teacher_name(self, student_name: str) -> str:
        """Teacher parameter/module name for a student parameter/module name (longest prefix wins)."""
        e = self.entry(student_name)
        if e is None:
            raise KoalaError(f"student module {student_name!r} is not covered by the layer map")
        return e.teacher + student_name[len(e.student) :]

    @property
    def family(self) -> str:
        """The model family the map was made for (``meta.family``; older maps, which do not say, are SDXL's)."""
        return self.meta.get("family", DEFAULT_FAMILY)

    @family.setter
    def family(self, name: str) -> None:
        self.meta["family"] = name

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
                "the layer map does not fit this teacher/student pair:\n  "
                + "\n  ".join(problems[:8])
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
        return cls(
            entries,
            d.get("layer_selection", "bottom"),
            d.get("teacher_config", {}),
            d.get("student_config", {}),
            d.get("meta", {}),
        )

    def save(self, directory: str | os.PathLike) -> str:
        path = os.path.join(directory, LAYER_MAP_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @staticmethod
    def find(path: str | os.PathLike) -> str | None:
        """The layer map file of a student: ``path`` itself, ``koala_layer_map.json`` in the model directory
        ``path``, or in the component of the pipeline directory ``path`` that has one (its denoiser: the
        components are the ones ``model_index.json`` names); None when there is none."""
        path = str(path)
        if not os.path.isdir(path):
            return path if os.path.isfile(path) else None
        folders = [path]
        index = os.path.join(path, "model_index.json")
        if os.path.isfile(index):  # a pipeline directory
            try:
                with open(index) as f:
                    folders += [os.path.join(path, c) for c in json.load(f) if not c.startswith("_")]
            except (OSError, ValueError) as err:
                raise KoalaError(f"{index}: cannot read the pipeline's component list ({err})") from err
        return next((c for c in (os.path.join(d, LAYER_MAP_FILE) for d in folders) if os.path.isfile(c)), None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerMap":
        found = LayerMap.find(path)
        if found is None:
            raise KoalaError(
                f"{path}: no {LAYER_MAP_FILE} here or in its pipeline's denoiser folder (was this student made "
                "by `koala compress`?)"
            )
        path = found
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise KoalaError(f"{path}: cannot read layer map ({err})") from err
        return cls.from_dict(d, path)
