"""Where a denoiser's parameters and FLOPs are: per stage and per component (paper Table 1, Fig. 13).

Stages are the layer map's (U-Net: DW-1.., MID, UP-1.., plus IO for the stem and head; DiT: B-1..B-n, IO), so a
student and its teacher line up stage by stage. A model without a saved layer map gets the map of itself
(``family.build_layer_map(model, model)``), which names the teacher's stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.layer_map import LayerMap
from ..families import Family

COMPONENTS = (
    "resnets",
    "self-attention",
    "cross-attention",
    "feed-forward",
    "norms",
    "attention proj / modulation",
    "up/downsamplers",
    "embeddings & IO",
)


def component_of(name: str) -> str:
    """The component a parameter (or module) belongs to, from its dotted name."""
    parts = name.split(".")
    if "attn1" in parts:
        return "self-attention"
    if "attn2" in parts:
        return "cross-attention"
    if "ff" in parts:
        return "feed-forward"
    if "resnets" in parts:
        return "resnets"
    if "downsamplers" in parts or "upsamplers" in parts:
        return "up/downsamplers"
    if len(parts) > 1 and parts[-2].startswith("norm"):
        return "norms"
    if "attentions" in parts or "transformer_blocks" in parts:
        return "attention proj / modulation"
    return "embeddings & IO"


def stage_of(lmap: LayerMap, name: str) -> str:
    """The stage of a parameter or module name: its layer-map entry's, or (a container such as ``down_blocks.0``)
    that of the entries inside it; IO otherwise."""
    e = lmap.entry(name)
    if e is not None:
        return e.stage
    inner = next((e for e in lmap.entries if e.student.startswith(name + ".")), None) if name else None
    return inner.stage if inner is not None else "IO"


def stage_order(lmap: LayerMap) -> list[str]:
    return ["IO", *lmap.stages()]


def self_map(family: Family, model) -> LayerMap:
    """The layer map of a model onto itself: the teacher's stage names for every module."""
    return family.build_layer_map(model, model, "bottom")


@dataclass
class Dissection:
    """Parameters per stage and component, and forward FLOPs per stage."""

    params: dict[str, dict[str, int]]  # stage -> component -> count
    flops: dict[str, int]  # stage -> FLOPs of one forward (the inputs given)
    total_params: int
    total_flops: int

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "flops": self.flops,
            "total_params": self.total_params,
            "total_flops": self.total_flops,
            "params_per_stage": {s: sum(c.values()) for s, c in self.params.items()},
        }


def param_table(model: torch.nn.Module, lmap: LayerMap) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {s: {} for s in stage_order(lmap)}
    for name, p in model.named_parameters():
        row = out.setdefault(stage_of(lmap, name), {})
        comp = component_of(name)
        row[comp] = row.get(comp, 0) + p.numel()
    return out


def flop_table(model: torch.nn.Module, lmap: LayerMap, inputs: dict) -> dict[str, int]:
    """FLOPs of ``model(**inputs)`` per stage: torch's per-module counts (inclusive of children) made exclusive, then
    summed by the stage each module belongs to. On the meta device this allocates nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    root = type(model).__name__
    inclusive = {
        k[len(root) + 1 :] if k != root else "": sum(v.values())
        for k, v in counter.get_flop_counts().items()
        if k == root or k.startswith(root + ".")
    }
    children: dict[str, int] = {}
    for name, flops in inclusive.items():  # each module's count includes its children's: subtract them once
        if name:  # from the nearest ancestor that ran (a ModuleList never runs, so it has no count)
            parent = name
            while parent:
                parent = parent.rsplit(".", 1)[0] if "." in parent else ""
                if parent in inclusive:
                    break
            children[parent] = children.get(parent, 0) + flops
    out = dict.fromkeys(stage_order(lmap), 0)
    for name, flops in inclusive.items():
        own = flops - children.get(name, 0)
        if own:
            stage = stage_of(lmap, name) if name else "IO"
            out[stage] = out.get(stage, 0) + own
    return out


def dissect(
    family: Family, model: torch.nn.Module, lmap: LayerMap | None = None, inputs: dict | None = None
) -> Dissection:
    """Parameters (always) and FLOPs (when ``inputs`` are given) of ``model`` per stage of ``lmap``."""
    lmap = lmap or self_map(family, model)
    params = param_table(model, lmap)
    flops = flop_table(model, lmap, inputs) if inputs is not None else {}
    return Dissection(params, flops, sum(p.numel() for p in model.parameters()), sum(flops.values()))
