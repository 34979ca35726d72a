"""The ``koala`` command line. Thin: each subcommand module parses arguments and calls library functions.

Each module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser(s) and sets
``func`` to a callable taking the parsed ``argparse.Namespace``. Arguments that several commands share (choices
from the library, ``--dtype``, ``--json [FILE]``) are in :mod:`koala.cli.options`.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys

from .. import __version__
from ..errors import KoalaError
from ..utils.console import is_terminal

COMMANDS = [
    "presets",
    "compress",
    "distill",
    "vae",
    "plan",
    "data",
    "generate",
    "bench",
    "analyze",
    "lab",
    "eval",
    "export",
    "controlnet",
    "quantize",
    "lora",
    "adapter",
    "demo",
    "app",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koala",
        description="KOALA: compress text-to-image U-Nets and DiTs (SDXL, SD-1.x, PixArt families) and distill "
        "them with self-attention KD "
        "(Lee et al., NeurIPS 2024). Run `koala COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"koala {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show Python tracebacks instead of one-line errors (also: KOALA_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


_EXIT_HOOKED = False  # main() registers _freeze_heap_at_exit once per process


def main(argv: list[str] | None = None) -> int:
    global _EXIT_HOOKED
    if not _EXIT_HOOKED:
        atexit.register(_freeze_heap_at_exit)
        _EXIT_HOOKED = True
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # koala loads local directories only; never reach a hub
    if not is_terminal(sys.stderr):  # a log: no \r-redrawn bars from huggingface_hub / transformers (koala's: lines)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_torchao_import()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("KOALA_DEBUG", "") not in ("", "0")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"koala {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one error boundary: one line, no traceback (unless --debug)
        if debug:
            raise
        code, message = describe_error(err)
        print(f"koala {args.command}: error: {message}", file=sys.stderr)
        return code
    return int(result or 0)


def _quiet_torchao_import() -> None:
    """With torchao installed (the quantize extra), diffusers imports it with every model class; on a CPU build its
    CUDA kernels fail to load, and it and diffusers log a warning each about that (and torch about its enums).
    Those say nothing about koala's work: keep them out of every command's output."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _freeze_heap_at_exit() -> None:
    """The interpreter's last garbage collection walks every object torch, diffusers and transformers created (about
    a second per process, for each of a multi-process run's workers too); at exit nothing is left to reclaim, so
    freeze the heap and skip it."""
    gc.freeze()


def describe_error(err: BaseException) -> tuple[int, str]:
    """``(exit status, one-line message)``: 2 for expected failures (bad input, missing or unwritable files,
    out of memory), 1 for anything unexpected (with a pointer to --debug)."""
    if isinstance(err, KoalaError):
        opt = getattr(err, "option", None)
        # a config key (dotted) is set as an override KEY=VALUE; a plain name is this command's --flag
        hint = "" if not opt else f" (override {opt}=...)" if "." in opt else f" (option --{opt.replace('_', '-')})"
        return 2, _one_line(f"{err}{hint}")
    if isinstance(err, OSError) and (err.filename or err.strerror):
        import errno

        where = f"{err.filename}: " if err.filename else ""
        tip = {
            errno.ENOSPC: " (disk full); free some space or write elsewhere",
            errno.EDQUOT: " (quota exceeded); free some of your quota or write elsewhere",
            errno.EACCES: "; check the permissions",
            errno.EROFS: "; write elsewhere",
        }.get(err.errno, "")
        return 2, _one_line(f"{where}{err.strerror or err}{tip}")
    if type(err).__name__ in ("OutOfMemoryError",):
        return 2, _one_line(
            f"out of memory ({err}); try a smaller batch or resolution, or the memory options of this command"
        )
    from ..utils.writes import write_failure

    failure = write_failure(err)  # a safetensors / torch writer that ran out of room outside koala's own guards
    if failure is not None:
        return 2, _one_line(f"{failure[0]}: a write failed ({failure[1]}); free some space or write elsewhere")
    if type(err).__name__ == "UnpicklingError" and "weights only" in str(err).lower():  # a library's torch.load
        return 2, _one_line(
            "a torch file (.pt / .bin) holds objects other than tensors and plain values; koala does not unpickle "
            "them (run with --debug to see which file)"
        )
    if type(err).__name__ == "SafetensorError":
        return 2, _one_line(f"a safetensors file is corrupt or truncated ({err}); run with --debug to see which")
    return 1, _one_line(
        f"unexpected {type(err).__name__}: {err} (run with --debug or KOALA_DEBUG=1 for the "
        "traceback, and please report it)"
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
