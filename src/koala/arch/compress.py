"""Initialise a student from its teacher through the layer map: every student tensor is a copy of the teacher
tensor the map names (any family: the map is the contract)."""

from __future__ import annotations

import torch

from ..errors import KoalaError
from .layer_map import LayerMap


def init_from_teacher(
    teacher: torch.nn.Module, student: torch.nn.Module, lmap: LayerMap, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Fill ``student`` (built on ``meta`` or anywhere) with copies of the mapped teacher tensors, in place."""
    t_state = teacher.state_dict()
    dtype = dtype or next(teacher.parameters()).dtype
    state = {}
    for name, p in student.state_dict().items():
        tname = lmap.teacher_name(name)
        src = t_state.get(tname)
        if src is None or tuple(src.shape) != tuple(p.shape):  # a bug in a family's map builder; never copy silently
            raise KoalaError(
                f"cannot copy {tname} -> {name}: "
                + ("no such teacher tensor" if src is None else f"{tuple(src.shape)} vs {tuple(p.shape)}")
            )
        state[name] = src.detach().to(dtype=dtype, copy=True)
    student.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (not in a state_dict; e.g. a DiT's sin-cos position table) come from the teacher too
    t_buffers = dict(teacher.named_buffers())
    for name, b in list(student.named_buffers()):
        src = t_buffers.get(lmap.teacher_name(name)) if b.is_meta else None
        if src is not None and tuple(src.shape) == tuple(b.shape):
            mod_name, _, attr = name.rpartition(".")
            student.get_submodule(mod_name)._buffers[attr] = src.detach().to(
                dtype=dtype if src.is_floating_point() else src.dtype, copy=True
            )
    leftover = [n for n, b in student.named_buffers() if b.is_meta]
    if leftover:
        raise KoalaError(f"student buffers left uninitialised: {leftover[:5]}")
    return student
