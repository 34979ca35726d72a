"""koala.utils.console: tables never cut to ``pre…`` (full markdown when piped, wrapped / fewer columns in a narrow
terminal) and progress that writes plain lines, not ``\\r`` redraws, to a log."""

import io
import re
import sys

from koala.cli import main
from koala.families import all_presets
from koala.utils.console import Column, Progress, markdown_table, progress_bar, render_table

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _preset_names() -> list[str]:
    return list(all_presets())


def test_presets_piped_is_the_full_markdown_table(capsys):
    assert main(["presets", "--no-flops"]) == 0  # capsys: stdout is not a terminal
    out = capsys.readouterr().out
    assert "…" not in out and "\x1b" not in out and "\r" not in out
    rows = [line for line in out.splitlines() if line.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split(" | ")]
    assert head == ["preset", "family", "params", "paper", "TFLOPs 1024²", "TFLOPs 512²", "enc", "Tx DW", "Tx UP"] + [
        "mid",
        "DiT blocks",
    ]
    assert set(rows[1]) <= set("|-: ")  # the separator, with alignment marks
    names = _preset_names()
    assert len(rows) == 2 + len(names) and "koala-700m" in names
    assert [r.strip("|").split("|")[0].strip() for r in rows[2:]] == names
    assert len({len(r) for r in rows}) == 1  # padded: every line as wide as the header
    ssd = next(r for r in rows if r.startswith("| ssd-1b "))
    assert "4,4,10\\|2,1,1\\|0,0,0" in ssd  # a | inside a cell is escaped, so the row keeps its 11 cells


def test_presets_in_an_80_column_terminal_drops_columns_instead_of_cutting(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["presets", "--no-flops"]) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for name in _preset_names():
        assert f"│ {name} " in out  # whole names, one per row
    for header in ("preset", "family", "params", "TFLOPs 1024²"):
        assert header in out
    assert "Tx UP" not in out.split("┡")[0]  # not a column any more ...
    assert "not shown at 80 columns: enc, Tx DW, Tx UP, mid, DiT blocks" in " ".join(out.split())  # ... but named


COLS = [
    Column("model"),
    Column("params", "right"),
    Column("note", wrap=True),
    Column("TFLOPs 1024²", "right", drop=1),
    Column("layers per stage", "right", drop=2),
]
ROWS = [
    ["teacher-with-a-long-name", "2,567.5M", "the reference model, kept whole", "6.761", "4,4,10|2,1,1|0,0,0"],
    ["student", "782.8M", "-", "2.702", "5,2,0"],
]


def _body_cells(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_narrow_terminal_wraps_headers_and_text_and_drops_marked_columns():
    wide = render_table(COLS, ROWS, title="t", terminal=True, width=200)
    assert "layers per stage" in wide and "not shown" not in wide and "…" not in wide
    for width, gone in ((95, []), (80, ["layers per stage"]), (55, ["TFLOPs 1024²", "layers per stage"])):
        out = render_table(COLS, ROWS, title="t", terminal=True, width=width)
        assert "…" not in out and max(len(line) for line in out.splitlines()) <= width, out
        cells = " ".join(c for row in _body_cells(out) for c in row)
        for kept in ("teacher-with-a-long-name", "2,567.5M", "782.8M"):  # cells of kept columns: never cut
            assert kept in cells, out
        if gone:
            assert f"not shown at {width} columns: {', '.join(gone)}" in " ".join(out.split()), out
            assert "4,4,10|2,1,1|0,0,0" not in out
        else:
            assert "not shown" not in out and "4,4,10|2,1,1|0,0,0" in out  # headers wrapped, cells whole
    tiny = render_table(COLS, ROWS, terminal=True, width=24)  # nothing left to drop: cells fold, still no ellipsis
    assert "…" not in tiny and max(len(line) for line in tiny.splitlines()) <= 24


def test_piped_table_is_markdown_with_title_and_notes():
    out = render_table(COLS, ROWS, title="Presets", notes=["FLOPs of one forward"], terminal=False)
    lines = out.splitlines()
    assert lines[0] == "Presets" and lines[-1] == "FLOPs of one forward" and out.endswith("\n")
    assert lines[2].startswith("| model ") and lines[3].startswith("|:---") and "---:|" in lines[3]
    assert "4,4,10\\|2,1,1\\|0,0,0" in out and "not shown" not in out


def test_markdown_table_plain_and_padded():
    assert markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    assert markdown_table(["name", "n"], [["ab", 12]], align=["left", "right"], pad=True).splitlines() == [
        "| name |   n |",
        "|:-----|----:|",
        "| ab   |  12 |",
    ]


def _lines_mode(n: int, **kw) -> str:
    buf = io.StringIO()
    for _ in progress_bar(range(n), file=buf, mininterval=0, miniters=1, desc="steps", **kw):
        pass
    return buf.getvalue()


def test_progress_to_a_log_writes_a_line_every_5_percent():
    out = _lines_mode(1000)  # every step refreshes (mininterval 0): the worst case for a log
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    assert 20 <= len(lines) <= 25, out
    assert lines[0].startswith("steps:   0%") and "1000/1000" in lines[-1]
    assert sum("1000/1000" in line for line in lines) == 1  # the final line once


def test_progress_to_a_log_resumed_with_postfix_and_write():
    buf = io.StringIO()
    bar = progress_bar(total=200, initial=50, file=buf, mininterval=0, desc="distill")
    for i in range(150):
        bar.update(1)
        bar.set_postfix(loss=f"{i:.1f}")
        if i == 70:
            bar.write("checkpoint saved", file=buf)
    bar.close()
    out = buf.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0].startswith("distill:  25%") and "200/200" in lines[-1] and "loss=149.0" in lines[-1]
    assert "checkpoint saved" in lines and len(lines) <= 18


def test_progress_without_total_writes_by_time():
    buf = io.StringIO()
    bar = progress_bar(file=buf, mininterval=0, every_s=3600)
    for _ in range(100):
        bar.update(1)
    bar.close()
    assert buf.getvalue().count("\n") == 2 and "\r" not in buf.getvalue()  # the first line and the final one


def test_progress_on_a_terminal_is_tqdm():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    buf = Terminal()
    bar = progress_bar(range(100), file=buf, mininterval=0)
    assert isinstance(bar, Progress) and not bar.lines
    for _ in bar:
        pass
    assert buf.getvalue().count("\r") > 20  # redrawn in place, as tqdm does
    assert "\r" in _lines_mode(10, lines=False) and "\r" not in _lines_mode(10, lines=True)


def test_progress_disabled_writes_nothing():
    buf = io.StringIO()
    assert list(progress_bar(range(5), file=buf, disable=True)) == list(range(5))
    assert buf.getvalue() == ""
