"""Which teacher/student features to match (via the layer map) and forward hooks that capture them.

Feature types (paper Sec. 3.1.2, Table 3a/10a):
  SA  ``attn1`` output of each transformer layer      CA  ``attn2`` output
  FFN ``ff`` output                                   Res output of each resnet
  LF  last feature of a stage (the block's output, as BK-SDM)
Stages: DW-1..DW-3, MID, UP-1..UP-3. When the student has fewer transformer layers than the teacher, the
teacher layers matched are chosen with :func:`koala.arch.select_layers` (bottom / interleave / up, App. B.1).

Hooks are registered on the *unwrapped* modules by name (no ``module.`` prefix under DDP) and record only
inside :meth:`FeatureRecorder.capture`, so recomputation under gradient checkpointing (which re-runs the
forward during backward) neither overwrites nor double counts features and keeps no tensors alive.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ..arch.layer_map import LayerMap, select_layers
from ..errors import KoalaError
from .config import STAGES, feature_stages

SUBMODULE = {"SA": "attn1", "CA": "attn2", "FFN": "ff"}


@dataclass(frozen=True)
class FeaturePair:
    type: str      # SA | CA | FFN | Res | LF
    stage: str     # DW-1 .. UP-3
    student: str   # module name in the unwrapped student
    teacher: str   # module name in the teacher

    @property
    def name(self) -> str:
        return f"{self.type}/{self.stage}/{self.student}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / DataParallel / torch.compile wrappers."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _stage_module(stage: str) -> str:
    if stage == "MID":
        return "mid_block"
    kind, idx = stage.split("-")
    return f"{'down' if kind == 'DW' else 'up'}_blocks.{int(idx) - 1}"


def _transformer_pairs(lmap: LayerMap, student, teacher, selection: str | None) -> list[tuple[str, str, str]]:
    """(stage, student layer prefix, teacher layer prefix) for every student transformer layer."""
    if selection is None:
        return [(e.stage, e.student, e.teacher) for e in lmap.of_kind("transformer_layer")]
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    out = []
    for e in lmap.of_kind("attention"):
        n_s = len(s_mods[e.student].transformer_blocks)
        n_t = len(t_mods[e.teacher].transformer_blocks)
        for k, tk in enumerate(select_layers(n_t, n_s, selection)):
            out.append((e.stage, f"{e.student}.transformer_blocks.{k}", f"{e.teacher}.transformer_blocks.{tk}"))
    return out


def feature_pairs(lmap: LayerMap, student: torch.nn.Module, teacher: torch.nn.Module, features: dict,
                  selection: str | None = None) -> list[FeaturePair]:
    """The (student, teacher) module pairs whose outputs featKD matches, in a stable order.

    ``features`` maps a type to ``"all"`` (every stage that has it) or a list of stages; a stage listed
    explicitly that lacks the feature (e.g. SA at DW-1, or MID in a student without a mid block) is an error.
    """
    student, teacher = unwrap(student), unwrap(teacher)
    features = feature_stages(features)
    available: dict[str, dict[str, list[tuple[str, str]]]] = {t: {} for t in features}
    for stage, s, t in _transformer_pairs(lmap, student, teacher, selection):
        for ftype, sub in SUBMODULE.items():
            if ftype in available:
                available[ftype].setdefault(stage, []).append((f"{s}.{sub}", f"{t}.{sub}"))
    if "Res" in available:
        for e in lmap.of_kind("resnet"):
            available["Res"].setdefault(e.stage, []).append((e.student, e.teacher))
    if "LF" in available:
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for stage in STAGES:
            name = _stage_module(stage)
            if s_mods.get(name) is not None and t_mods.get(name) is not None:
                available["LF"][stage] = [(name, name)]
    pairs: list[FeaturePair] = []
    for ftype, stages in features.items():
        wanted = [s for s in STAGES if s in available[ftype]] if stages == "all" else stages
        for stage in wanted:
            if stage not in available[ftype]:
                raise KoalaError(f"kd.features.{ftype} lists stage {stage} but this student has no {ftype} features "
                                 f"there (stages with {ftype}: {', '.join(available[ftype]) or 'none'})")
            pairs += [FeaturePair(ftype, stage, s, t) for s, t in available[ftype][stage]]
    return pairs


class FeatureRecorder:
    """Forward hooks on named modules that record outputs only inside :meth:`capture`."""

    def __init__(self, model: torch.nn.Module, names: list[str], role: str = "model"):
        self.role = role
        self.features: dict[str, torch.Tensor] = {}
        self._active = False
        modules = dict(unwrap(model).named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KoalaError(f"{role} has no module(s) {missing[:5]}; does the layer map belong to this model?")
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in dict.fromkeys(names)]

    def _hook(self, name: str):
        def hook(_module, _args, output):
            if not self._active:
                return  # e.g. activation recomputation during backward
            if name in self.features:
                raise RuntimeError(f"{self.role} module {name} ran twice in one forward; featKD would double count")
            self.features[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        self.features = {}
        self._active = True
        try:
            yield self.features
        finally:
            self._active = False

    def pop(self) -> dict[str, torch.Tensor]:
        feats, self.features = self.features, {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = {}
