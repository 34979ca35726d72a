"""FLOP counts of real-size architectures, computed on the ``meta`` device (no memory, seconds).

A denoiser repeats identical blocks (the SDXL U-Net runs 70 identical transformer blocks at 32² alone), and the
meta kernels of the ops are Python code, so the count runs each distinct call once: a submodule called again
with the same structure (types, scalar attributes, parameter shapes, recursively) and the same inputs (tensor
shapes, strides, dtypes; the other arguments by value) adds the FLOPs of its first call and returns new meta
tensors of the first call's output shapes, without running. The totals are those of running every call.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

_SCALARS = (bool, int, float, str, type(None), torch.dtype)
_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "training"}


def _value_key(v):
    if isinstance(v, _SCALARS):
        return (type(v).__name__, v)
    if isinstance(v, tuple | list) and all(isinstance(x, _SCALARS) for x in v):
        return (type(v).__name__, tuple(v))
    return None


def _attrs_key(obj) -> tuple:
    """Scalar attributes by value, any other attribute by its type (one level down: a processor's scalars)."""
    out = []
    for k, v in sorted(vars(obj).items()):
        if k in _SKIP_ATTRS or (k.startswith("_") and k.endswith("hooks")) or isinstance(v, torch.nn.Module):
            continue
        vk = _value_key(v)
        if vk is None and not isinstance(v, dict | torch.Tensor) and hasattr(v, "__dict__"):
            vk = (type(v).__qualname__, tuple((a, _value_key(b)) for a, b in sorted(vars(v).items())))
        out.append((k, vk if vk is not None else type(v).__qualname__))
    return tuple(out)


def _structure_keys(model: torch.nn.Module) -> dict[int, int]:
    """id(module) -> a small integer, equal for modules that compute the same thing on the same inputs."""
    interned: dict[tuple, int] = {}
    keys: dict[int, int] = {}

    def visit(m: torch.nn.Module) -> int:
        if id(m) in keys:
            return keys[id(m)]
        tensors = [*m._parameters.items(), *m._buffers.items()]
        key = (
            type(m).__qualname__,
            type(m).forward.__qualname__,
            m.training,
            _attrs_key(m),
            tuple((n, None if t is None else (tuple(t.shape), t.dtype, t.device.type)) for n, t in tensors),
            tuple((n, visit(c)) for n, c in m._modules.items() if c is not None),
        )
        keys[id(m)] = interned.setdefault(key, len(interned))
        return keys[id(m)]

    visit(model)
    return keys


def _tensor_key(t: torch.Tensor) -> tuple:
    return ("T", tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device.type, t.requires_grad)


def _call_key(struct: int, args, kwargs):
    leaves, spec = tree_flatten((args, kwargs))
    out = [struct, str(spec)]
    for x in leaves:
        k = _tensor_key(x) if isinstance(x, torch.Tensor) else _value_key(x)
        if k is None:
            return None, leaves
        out.append(k)
    return tuple(out), leaves


class _Memo:
    def __init__(self, counter: FlopCounterMode):
        self.counter = counter
        self.extra = 0  # FLOPs of the calls answered from the memo
        self.memo: dict[tuple, tuple] = {}

    def total(self) -> int:
        return int(self.counter.get_total_flops()) + self.extra

    def wrap(self, module: torch.nn.Module, struct: int):
        forward = module.forward

        def memo_forward(*args, **kwargs):
            key, leaves = _call_key(struct, args, kwargs)
            if key is not None and key in self.memo:
                flops, recipe, spec = self.memo[key]
                self.extra += flops
                return tree_unflatten([_rebuild(r, leaves) for r in recipe], spec)
            before = self.total()
            out = forward(*args, **kwargs)
            if key is not None:
                recipe = _recipe(out, leaves)
                if recipe is not None:
                    self.memo[key] = (self.total() - before, *recipe)
            return out

        return memo_forward


def _recipe(out, in_leaves):
    """How to rebuild ``out`` on a memo hit: an input (by position), a new meta tensor, or a scalar; None: never
    answer this call from the memo (an output that is not a meta tensor nor a scalar)."""
    leaves, spec = tree_flatten(out)
    recipe = []
    for x in leaves:
        same = [i for i, y in enumerate(in_leaves) if y is x]
        if same:
            recipe.append(("in", same[0]))
        elif isinstance(x, torch.Tensor):
            if x.device.type != "meta" or type(x) is not torch.Tensor:
                return None
            recipe.append(("new", tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, x.requires_grad))
        elif _value_key(x) is not None and not isinstance(x, list):
            recipe.append(("value", x))
        else:
            return None
    return recipe, spec


def _rebuild(r, in_leaves):
    if r[0] == "in":
        return in_leaves[r[1]]
    if r[0] == "value":
        return r[1]
    _, shape, stride, offset, dtype, grad = r
    t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if offset:
        t = t.as_strided(shape, stride, offset)
    return t.requires_grad_(grad)


def forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of ``model(**inputs)``; with a meta model and meta inputs this allocates nothing."""
    keys = _structure_keys(model)
    subs = [m for m in model.modules() if m is not model and "forward" not in vars(m)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        memo = _Memo(counter)
        for m in subs:
            m.forward = memo.wrap(m, keys[id(m)])
        try:
            model(**inputs)
        finally:
            for m in subs:
                del m.forward
    return memo.total()
