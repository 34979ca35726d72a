"""``torch.compile`` of a model in place, whole or by its repeated blocks (regional compilation)."""

from __future__ import annotations

import torch

from ..errors import KoalaError

COMPILE_SCOPES = ("full", "blocks")


# the repeated blocks of diffusers' U-Nets and DiTs: regional compilation compiles each once per input shape
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _compile_region(m: torch.nn.Module, kw: dict) -> int:
    """Compile the largest sub-trees of ``m`` that hold no hooked module; a hooked module whose children hold none
    gets its ``forward`` compiled, so its hooks run eagerly around the compiled code."""
    if not any(_has_hooks(x) for x in m.modules()):
        m.compile(**kw)
        return 1
    if not any(_has_hooks(x) for x in list(m.modules())[1:]):
        m.forward = torch.compile(m.forward, **kw)
        return 1
    return sum(_compile_region(c, kw) for c in m.children())


def compile_module(
    module: torch.nn.Module, scope: str = "full", backend: str = "inductor", mode: str | None = None
) -> int:
    """``torch.compile`` a model in place (its hooks, parameter names and ``state_dict`` keys stay).

    ``scope="full"``: one graph for the whole forward, forward hooks registered before this call traced into it
    (fastest code, longest compilation).
    ``scope="blocks"``: regional compilation: each repeated block (``REPEATED_BLOCKS``) is compiled in place; blocks
    of the same class share the generated code where their input shapes agree, so compilation takes a fraction of
    the full graph's time (what diffusers' ``compile_repeated_blocks`` does for models that declare their blocks).
    A block that holds hooked modules (featKD hooks on ``attn1``, say) is compiled in its hook-free parts instead,
    with the hooks outside the compiled code: blocks that share code must not share traced hooks (dynamo does not
    guard on hooks by default, so a graph traced with one block's hook would run for another's).
    Returns the number of compiled regions."""
    if scope not in COMPILE_SCOPES:
        raise KoalaError(f"compile scope {scope!r}: choose one of {', '.join(COMPILE_SCOPES)}", option="compile_scope")
    kw = {"backend": backend, **({"mode": mode} if mode else {})}
    if scope == "full":
        module.compile(**kw)
        return 1
    blocks = [m for m in module.modules() if type(m).__name__ in REPEATED_BLOCKS]
    if not blocks:
        raise KoalaError(
            f"compile scope blocks: {type(module).__name__} has none of {', '.join(REPEATED_BLOCKS)}; "
            "use the full scope",
            option="compile_scope",
        )
    # one static graph per (block shape, grad mode, dtype): a U-Net's resnets alone come in more than dynamo's
    # default 8 variants (after which it falls back to eager), and automatic dynamic shapes would make slower kernels
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return sum(_compile_region(m, {**kw, "dynamic": False}) for m in blocks)
