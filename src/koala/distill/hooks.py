"""Which teacher/student features to match (via the layer map) and forward hooks that capture them.

Feature types (paper Sec. 3.1.2, Table 3a/10a):
  SA  ``attn1`` output of each transformer layer      CA  ``attn2`` output
  FFN ``ff`` output                                   Res output of each resnet
  LF  last feature of a stage (the block's output, as BK-SDM)
Stages are the layer map's (SDXL: DW-1..DW-3, MID, UP-1..UP-3; SD-1.x: DW-1..DW-4, MID, UP-1..UP-4; PixArt DiT:
one stage per block, B-1..B-n, where LF is the block's output, Table 8); where a stage's last feature is comes
from the model's family. The types live in one registry, :data:`FEATURE_TYPES`.

Hooks are registered on the *unwrapped* modules by name (no ``module.`` prefix under DDP) and record only
inside :meth:`FeatureRecorder.capture`, so recomputation under gradient checkpointing (which re-runs the
forward during backward) neither overwrites nor double counts features and keeps no tensors alive.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..arch.layer_map import LayerMap
from ..errors import KoalaError
from ..families import Family


@dataclass(frozen=True)
class FeaturePair:
    type: str  # SA | CA | FFN | Res | LF
    stage: str  # DW-1 .. UP-3
    student: str  # module name in the unwrapped student
    teacher: str  # module name in the teacher

    @property
    def name(self) -> str:
        return f"{self.type}/{self.stage}/{self.student}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / DataParallel / torch.compile wrappers."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _sublayer(sub: str):
    """Sites of a transformer-layer submodule (attn1 = self-attention, attn2 = cross-attention, ff = FFN)."""

    def sites(ctx: "SiteContext") -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for stage, s, t in ctx.transformer_pairs:
            out.setdefault(stage, []).append((f"{s}.{sub}", f"{t}.{sub}"))
        return out

    return sites


def _resnets(ctx: "SiteContext") -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for e in ctx.lmap.of_kind("resnet"):
        out.setdefault(e.stage, []).append((e.student, e.teacher))
    return out


def _last_features(ctx: "SiteContext") -> dict[str, list[tuple[str, str]]]:
    return {stage: [pair] for stage, pair in ctx.family.stage_modules(ctx.lmap, ctx.student, ctx.teacher).items()}


@dataclass
class SiteContext:
    """What a feature type needs to find its (student, teacher) module pairs."""

    family: Family
    lmap: LayerMap
    student: torch.nn.Module
    teacher: torch.nn.Module
    selection: str | None

    @functools.cached_property
    def transformer_pairs(self) -> list[tuple[str, str, str]]:
        return self.family.transformer_pairs(self.lmap, self.student, self.teacher, self.selection)


# The feature-type registry (paper Sec. 3.1.2, Table 3a/10a): type -> stage -> [(student module, teacher module)].
# Add a type here in one place; the config accepts every key of this dict.
FEATURE_TYPES: dict[str, Callable[[SiteContext], dict[str, list[tuple[str, str]]]]] = {
    "SA": _sublayer("attn1"),
    "CA": _sublayer("attn2"),
    "FFN": _sublayer("ff"),
    "Res": _resnets,
    "LF": _last_features,
}


def feature_pairs(
    lmap: LayerMap,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    features: dict,
    selection: str | None = None,
    family: Family | str | None = None,
) -> list[FeaturePair]:
    """The (student, teacher) module pairs whose outputs featKD matches, in a stable order.

    ``features`` maps a type of :data:`FEATURE_TYPES` to ``"all"`` (every stage that has it) or a list of stage
    names (the layer map's: DW-1.., MID, UP-1.. for U-Nets, B-1..B-n for DiT blocks; ``first`` = the first
    stage, ``last`` = the last, whatever the family; ``A..B`` = the stages from A to B); a stage listed explicitly
    that lacks the feature
    (e.g. SA at DW-1, or MID in a student without a mid block) is an error. ``selection`` (``kd.layer_selection``):
    ``None`` matches each student transformer layer with the teacher layer the saved layer map initialised it
    from; bottom / interleave / up re-pick the matched teacher layers for featKD only (App. B.1).
    """
    from ..families import get_family

    student, teacher = unwrap(student), unwrap(teacher)
    fam = get_family(family or lmap.family)
    ctx = SiteContext(fam, lmap, student, teacher, selection)
    pairs: list[FeaturePair] = []
    for ftype, stages in (features or {}).items():
        if ftype not in FEATURE_TYPES:
            raise KoalaError(f"kd.features: unknown feature type {ftype!r}; choose from {', '.join(FEATURE_TYPES)}")
        available = FEATURE_TYPES[ftype](ctx)
        order = lmap.stages()
        wanted = (
            [s for s in order if s in available]
            if stages == "all"
            else expand_stages([stages] if isinstance(stages, str) else list(stages), order, available, ftype)
        )
        for stage in wanted:
            if stage not in available:
                raise KoalaError(
                    f"kd.features.{ftype} lists stage {stage} but this student has no {ftype} features "
                    f"there (stages with {ftype}: {', '.join(available) or 'none'})"
                )
            pairs += [FeaturePair(ftype, stage, s, t) for s, t in available[stage]]
    return pairs


def expand_stages(names: list, order: list[str], available: dict, ftype: str) -> list[str]:
    """Stage names with ``first``/``last`` aliases resolved and ranges ``A..B`` (inclusive, in the layer map's
    order, e.g. ``DW-2..UP-2`` or ``B-1..B-7``) expanded to the stages in between that have the feature."""
    aliases = {"first": order[0], "last": order[-1]} if order else {}
    out: list[str] = []
    for name in names:
        name = str(name)
        if ".." in name:
            a, b = (aliases.get(x.strip(), x.strip()) for x in name.split("..", 1))
            if a not in order or b not in order or order.index(a) > order.index(b):
                raise KoalaError(
                    f"kd.features.{ftype}: range {name!r} needs two stages of this student in order "
                    f"(stages: {', '.join(order)})"
                )
            out += [s for s in order[order.index(a) : order.index(b) + 1] if s in available]
        else:
            out.append(aliases.get(name, name))
    return list(dict.fromkeys(out))


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
