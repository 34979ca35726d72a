"""Arguments that several commands share: choices that a library module defines, ``--dtype`` and ``--json [FILE]``.

Building the parser must not import torch (``koala --help`` and commands that need no model stay fast), and the
library modules that define the choices import it; so :class:`LibraryChoices` reads a constant only when argparse
first checks a value against it or prints help.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence

STDOUT = "-"  # --json's FILE for standard output; a bare --json means it too


class LibraryChoices(Sequence):
    """The names in a library constant, given by its dotted path (``"koala.arch.layer_map.SELECTIONS"``): a tuple,
    or a dict's keys; ``None`` (meaning "off", given by leaving the option out) is left out. Imported on first use."""

    def __init__(self, path: str):
        self.path = path
        self._names: tuple[str, ...] | None = None

    def _load(self) -> tuple[str, ...]:
        if self._names is None:
            module, _, name = self.path.rpartition(".")
            self._names = tuple(n for n in getattr(importlib.import_module(module), name) if n is not None)
        return self._names

    def __getitem__(self, index):
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())


def add_choice_argument(parser, *flags: str, choices: str, **kwargs):
    """``parser.add_argument(*flags, **kwargs)`` whose choices are the library constant at the dotted path
    ``choices``. They are set once the argument is added: adding it formats its choices, which would import them."""
    action = parser.add_argument(*flags, **kwargs)
    action.choices = LibraryChoices(choices)
    return action


def add_dtype_argument(parser, flag: str = "--dtype", **kwargs):
    """A dtype option: one of ``koala.utils.devices.DTYPE_NAMES`` (fp32, fp16, bf16)."""
    return add_choice_argument(parser, flag, choices="koala.utils.devices.DTYPE_NAMES", **kwargs)


def add_rank_arguments(parser, rank_help: str, merge_help: str | None = None) -> None:
    """``--rank`` / ``--world-size`` (defaults: the launcher's ``RANK`` / ``WORLD_SIZE``) and, given
    ``merge_help``, ``--merge``: the work split that ``koala cache``, ``koala data syncap`` and ``koala eval run``
    share. ``rank_help`` follows "this process (env RANK)"."""
    from ..utils.parts import env_rank, env_world_size

    parser.add_argument("--rank", type=int, default=env_rank(), help="this process (env RANK)" + rank_help)
    parser.add_argument(
        "--world-size", type=int, default=env_world_size(), help="number of processes (env WORLD_SIZE)"
    )
    if merge_help:
        parser.add_argument("--merge", action="store_true", help=merge_help)


def add_json_argument(parser, what: str):
    """``--json [FILE]``: ``what`` as JSON to FILE, or to stdout (instead of the table) for a bare --json or '-'."""
    return parser.add_argument(
        "--json",
        nargs="?",
        const=STDOUT,
        default=None,
        metavar="FILE",
        help=f"write {what} as JSON to FILE; without FILE (or with -), print it instead of the table",
    )


def emit_json(target: str | None, data, indent: int | None = 1) -> str | None:
    """``data`` as JSON where ``--json`` says: FILE (written atomically; returns FILE), stdout for '-', nowhere for
    None (both return None)."""
    if target is None:
        return None
    text = json.dumps(data, indent=indent)
    if target == STDOUT:
        print(text)
        return None
    from ..utils.files import atomic_write_text

    return atomic_write_text(target, text + "\n")


def human_stream(args):
    """Where a command's progress and notes for people ("wrote FILE") go: stdout, or stderr when a bare --json prints
    JSON there, so that stdout carries the JSON alone."""
    return sys.stderr if getattr(args, "json", None) == STDOUT else sys.stdout
