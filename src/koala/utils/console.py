"""Output people can read: tables that are never cut to ``pre…``, and progress bars that suit a log file.

- ``print_table(columns, rows, title=...)``: on a terminal a rich table whose cells wrap instead of being cut; when
  it is too narrow, the columns the caller marked droppable are left out (and the table says which). Piped or
  redirected, the whole table as aligned markdown.
- ``markdown_table(headers, rows)``: the one markdown table writer (``| a | b |`` / ``|---|---|``).
- ``progress_bar(...)``: tqdm on a terminal; to a log file (any stream that is not a terminal) one plain line every
  few percent or every minute, and the final line, never a ``\\r``.

A floor module: it imports rich and tqdm, nothing from koala.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Sequence

from tqdm.std import tqdm

_JUSTIFY = ("left", "right", "center")


@dataclass(frozen=True)
class Column:
    """One table column. ``drop`` 0: always shown; n > 0: may be left out of a narrow terminal, the highest n
    first, every column with the same n together. ``wrap``: its cells may wrap at spaces (by default a cell
    stays on one line and only the header wraps)."""

    header: str
    justify: str = "left"
    drop: int = 0
    wrap: bool = False

    def __post_init__(self):
        if self.justify not in _JUSTIFY:
            raise ValueError(f"justify must be one of {_JUSTIFY}, got {self.justify!r}")


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stdout) is an interactive terminal. Only ``isatty()`` counts: a CI log with
    FORCE_COLOR set is still a log."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _cell_len(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.split("\n")), default=0)


def _fit(text: str, width: int, justify: str) -> str:
    space = " " * max(0, width - _cell_len(text))
    if justify == "right":
        return space + text
    if justify == "center":
        return space[: len(space) // 2] + text + space[len(space) // 2 :]
    return text + space


def _rule(width: int, justify: str, aligned: bool) -> str:
    if not aligned:
        return "-" * width
    return (":" if justify != "right" else "-") + "-" * (width - 2) + (":" if justify != "left" else "-")


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence], align: Sequence[str] | None = None, pad: bool = False
) -> str:
    """A markdown table, its lines joined by newlines (no trailing one). ``align``: left / right / center per
    column (default: none, ``|---|``). ``pad``: cells padded to their column's width, so that the table reads as
    plain text too. A ``|`` in a cell is escaped, a newline becomes a space."""

    def esc(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = [esc(h) for h in headers]
    body = [[esc(c) for c in r] for r in rows]
    if any(len(r) != len(head) for r in body):
        raise ValueError(f"every row needs {len(head)} cells, got {[len(r) for r in body]}")
    just = list(align) if align is not None else ["left"] * len(head)
    if len(just) != len(head) or any(j not in _JUSTIFY for j in just):
        raise ValueError(f"align needs one of {_JUSTIFY} per column, got {just}")
    if pad:
        widths = [max([3, _cell_len(h)] + [_cell_len(r[i]) for r in body]) for i, h in enumerate(head)]
        seps = [_rule(w + 2, j, align is not None) for w, j in zip(widths, just)]

        def line(cells):
            return "| " + " | ".join(_fit(c, w, j) for c, w, j in zip(cells, widths, just)) + " |"

    else:
        seps = [_rule(3 if align is None else 4, j, align is not None) for j in just]

        def line(cells):
            return "| " + " | ".join(cells) + " |"

    return "\n".join([line(head), "|" + "|".join(seps) + "|"] + [line(r) for r in body])


# ----------------------------------------------------------------------------------------------- tables


def _columns(columns: Sequence[Column | str]) -> list[Column]:
    return [c if isinstance(c, Column) else Column(str(c)) for c in columns]


def _cells(columns: list[Column], rows: Sequence[Sequence]) -> list[list[str]]:
    cells = [["-" if c is None else str(c) for c in r] for r in rows]
    if any(len(r) != len(columns) for r in cells):
        raise ValueError(f"every row needs {len(columns)} cells, got {[len(r) for r in cells]}")
    return cells


def _longest_word(text: str) -> int:
    return max((_cell_len(w) for w in text.split()), default=0)


def _need(kept: list[int], widths: list[int]) -> int:
    return sum(widths[i] for i in kept) + 3 * len(kept) + 1  # rich's box: a border and a space each side per column


def _layout(columns: list[Column], rows: list[list[str]], width: int) -> tuple[list[int], list[int | None]]:
    """The columns that fit ``width`` characters (their indices) and the width each gets (None: rich's own).

    Natural width: every cell and header on one line. Compact: headers wrapped at spaces, cells on one line
    (``wrap`` columns: wrapped at spaces too). Droppable columns go, highest ``drop`` first, until the compact
    table fits; the room left over widens the columns that need the least of it first."""
    natural = [max([_cell_len(c.header)] + [_cell_len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    compact = [
        max([_longest_word(c.header)] + [(_longest_word if c.wrap else _cell_len)(r[i]) for r in rows])
        for i, c in enumerate(columns)
    ]
    kept = list(range(len(columns)))
    for level in sorted({c.drop for c in columns if c.drop > 0}, reverse=True):
        rest = [i for i in kept if columns[i].drop != level]
        if _need(kept, compact) <= width or not rest:
            break
        kept = rest
    if _need(kept, natural) <= width or _need(kept, compact) > width:
        return kept, [None] * len(kept)  # all fits on one line, or nothing left to drop: rich wraps (folds) cells
    widths = {i: compact[i] for i in kept}
    spare = width - _need(kept, compact)
    for i in sorted(kept, key=lambda i: natural[i] - compact[i]):
        more = min(natural[i] - compact[i], spare)  # the smallest needs in full, the rest what is left
        spare -= more
        widths[i] += more
    return kept, [widths[i] for i in kept]


def _rich_table(columns: list[Column], rows: list[list[str]], title, notes: Sequence[str], width: int):
    from rich.table import Table
    from rich.text import Text

    kept, widths = _layout(columns, rows, width)
    notes = list(notes)
    dropped = [c.header for i, c in enumerate(columns) if i not in kept]
    if dropped:
        notes.append(f"not shown at {width} columns: {', '.join(dropped)} (a wider terminal or a pipe shows all)")
    t = Table(title=Text(title) if title else None, caption=Text("\n".join(notes)) if notes else None)
    for i, w in zip(kept, widths):
        c = columns[i]
        t.add_column(Text(c.header), justify=c.justify, overflow="fold", width=w)
    for r in rows:
        t.add_row(*(Text(r[i]) for i in kept))
    return t


def _markdown(columns: list[Column], rows: list[list[str]], title, notes: Sequence[str]) -> str:
    table = markdown_table([c.header for c in columns], rows, align=[c.justify for c in columns], pad=True)
    return "\n\n".join(([title] if title else []) + [table] + (["\n".join(notes)] if notes else [])) + "\n"


def render_table(
    columns: Sequence[Column | str],
    rows: Sequence[Sequence],
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
    terminal: bool = True,
    width: int = 80,
) -> str:
    """What ``print_table`` prints, as text: on a ``terminal`` of ``width`` characters (no colours), or piped."""
    cols = _columns(columns)
    cells = _cells(cols, rows)
    if not terminal:
        return _markdown(cols, cells, title, notes)
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(
        _rich_table(cols, cells, title, notes, width)
    )
    return buf.getvalue()


def print_table(
    columns: Sequence[Column | str],
    rows: Sequence[Sequence],
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
    file=None,
) -> None:
    """Print a table to ``file`` (default: stdout). A terminal gets a rich table of its width (cells wrap, never
    cut; ``Column.drop`` columns left out when it is too narrow, and named under the table); anything else (a
    pipe, a file) the full table as aligned markdown. ``columns``: ``Column``s or plain header strings; ``rows``:
    one sequence of cells per row (None prints as ``-``)."""
    out = sys.stdout if file is None else file
    cols = _columns(columns)
    cells = _cells(cols, rows)
    if not is_terminal(out):
        print(_markdown(cols, cells, title, notes), end="", file=out)
        return
    from rich.console import Console

    console = Console(file=out, force_terminal=True)
    console.print(_rich_table(cols, cells, title, notes, console.width))


# ----------------------------------------------------------------------------------------------- progress


class Progress(tqdm):
    """tqdm, except that to a stream that is not a terminal (a log file, a pipe) it writes one plain line
    (newline-terminated, no ``\\r``) each time another ``every_pct`` percent is done or ``every_s`` seconds have
    passed since the last line, plus the first and the final line. ``lines``: force that mode (True) or tqdm's
    (False); default: by the stream. Everything else is tqdm's (``update``, ``set_postfix``, ``write``, ...)."""

    def __init__(self, *args, every_pct: float = 5.0, every_s: float = 60.0, lines: bool | None = None, **kwargs):
        stream = kwargs.get("file")
        self.lines = not is_terminal(stream if stream is not None else sys.stderr) if lines is None else lines
        self.every_pct, self.every_s = every_pct, every_s
        self._shown_n: float | None = None
        self._shown_t = 0.0
        self._next_pct = 0.0
        super().__init__(*args, **kwargs)

    def _due(self) -> bool:
        if self._shown_n is None:
            return True
        if self.n == self._shown_n or (self.total and self.n >= self.total):
            return False  # nothing new; or done: close() writes the final line, with the last postfix
        if self.total and 100 * self.n / self.total >= self._next_pct:
            return True
        return time.time() - self._shown_t >= self.every_s

    def _show(self) -> None:
        self.fp.write(self.__str__() + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._shown_n, self._shown_t = self.n, time.time()
        if self.total:
            done = 100 * self.n / self.total
            self._next_pct = (done // self.every_pct + 1) * self.every_pct

    def display(self, msg=None, pos=None):
        if not self.lines:
            return super().display(msg, pos)
        if msg is not None or not self._due():  # '' clears a bar: nothing to clear in a log
            return False
        self._show()
        return True

    def clear(self, nolock=False):
        if not self.lines:
            super().clear(nolock)

    def moveto(self, n):
        if not self.lines:
            super().moveto(n)

    def close(self):
        if self.lines and not self.disable and self._shown_n is not None:
            if self.n != self._shown_n:
                self._ema_dt = lambda: None  # the final line's rate: the whole run's average, as tqdm's
                self._show()
            self.leave = False  # the final line is written; tqdm has nothing left to end or clear
        super().close()


def progress_bar(iterable=None, **kwargs) -> Progress:
    """``tqdm(iterable, **kwargs)`` that suits a log file too (see ``Progress``); takes tqdm's arguments and
    ``every_pct`` (default 5), ``every_s`` (default 60) and ``lines``."""
    return Progress(iterable, **kwargs)
