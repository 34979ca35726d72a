"""Per-stage forward time of a denoiser (paper Table 1's latency split, by stage): hooks around each stage's
top module time it inside a normal forward; IO is the rest of the forward (stem, embeddings, head)."""

from __future__ import annotations

import os
import statistics
import time

import torch

from ..arch.layer_map import LayerMap
from .structure import stage_order


def stage_modules(lmap: LayerMap, model: torch.nn.Module) -> dict[str, list[str]]:
    """Stage -> the top module(s) whose forward is the stage: the longest common dotted prefix of the stage's
    entries (``down_blocks.1``, ``mid_block``, ``transformer_blocks.3``) that is a module with a forward (a
    ModuleList such as ``up_blocks.2.resnets`` never runs: its parent block is taken)."""
    modules = dict(model.named_modules())

    def runnable(name: str) -> str:
        while name and isinstance(modules.get(name), (torch.nn.ModuleList, torch.nn.ModuleDict)):
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    names: dict[str, list[list[str]]] = {}
    for e in lmap.entries:
        if e.stage != "IO":
            names.setdefault(e.stage, []).append(e.student.split("."))
    out = {}
    for stage, parts in names.items():
        common = os.path.commonprefix(parts)  # element-wise on the dotted parts
        out[stage] = [runnable(".".join(common))] if common else sorted({runnable(".".join(p[:2])) for p in parts})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def stage_latency(
    model: torch.nn.Module, lmap: LayerMap, inputs: dict, repeats: int = 5, warmup: int = 1, progress: bool = False
) -> dict:
    """Median milliseconds per stage (and ``total``) of ``model(**inputs)``, over ``repeats`` timed forwards."""
    from ..utils.console import progress_bar

    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    starts: dict[str, float] = {}
    run: dict[str, float] = {}

    def pre(stage):
        def hook(_m, _a):
            _sync(device)
            starts[stage] = time.perf_counter()

        return hook

    def post(stage):
        def hook(_m, _a, _o):
            _sync(device)
            run[stage] = run.get(stage, 0.0) + 1000 * (time.perf_counter() - starts.pop(stage))

        return hook

    handles = []
    for stage, names in stage_modules(lmap, model).items():
        for n in names:
            handles += [
                modules[n].register_forward_pre_hook(pre(stage)),
                modules[n].register_forward_hook(post(stage)),
            ]
    samples: dict[str, list[float]] = {}
    try:
        for i in progress_bar(range(warmup + repeats), desc="forwards", disable=not progress):
            run.clear()
            _sync(device)
            t0 = time.perf_counter()
            model(**inputs)
            _sync(device)
            total = 1000 * (time.perf_counter() - t0)
            if i < warmup:
                continue
            run["IO"] = total - sum(run.values())
            run["total"] = total
            for k, v in run.items():
                samples.setdefault(k, []).append(v)
    finally:
        for h in handles:
            h.remove()
    order = [s for s in stage_order(lmap) if s in samples] + ["total"]
    return {s: statistics.median(samples[s]) for s in order}
