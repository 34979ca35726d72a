"""The ``koala`` command line. Thin: each subcommand module parses arguments and calls library functions.

Each module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser(s) and sets
``func`` to a callable taking the parsed ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import KoalaError

COMMANDS = ["presets", "compress", "distill", "plan", "data", "generate", "bench", "lab", "eval", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koala",
        description="KOALA: compress text-to-image U-Nets (SDXL, SD-1.x families) and distill them with "
        "self-attention KD "
        "(Lee et al., NeurIPS 2024). Run `koala COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"koala {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # koala loads local directories only; never reach a hub
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KoalaError as err:
        opt = getattr(err, "option", None)
        # a config key (dotted) is set as an override KEY=VALUE; a plain name is this command's --flag
        hint = "" if not opt else f" (override {opt}=...)" if "." in opt else f" (option --{opt.replace('_', '-')})"
        print(f"koala {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"koala {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
