"""Captions: choose the caption column(s), combine with synthetic captions (synCap), measure length.

synCap modes (KOALA App. A.1, Fig. 9):
  ``append``   original + ", " + synthetic (the paper's choice: keeps proper nouns from the original),
  ``replace``  synthetic only (PixArt-alpha's choice),
  ``original`` ignore the synthetic caption.
A missing synthetic caption falls back to the original (counted as ``syncap_missing``); a sample with no
usable caption at all is skipped as ``no_caption``.
"""

from __future__ import annotations

import math
import os

from ..errors import KoalaError
from .images import SkipSample

SYNCAP_MODES = ("append", "replace", "original")
SYNCAP_FIELD = "syncap"  # the field of a `koala data syncap` file (and the row field it is joined into)
DEFAULT_CAPTION_COLUMNS = ("text", "caption", "prompt", "TEXT", "alt", "txt", "alt_txt", "alt_text")
CLIP_WINDOW = 77  # tokens including BOS and EOS
WORDS_TO_TOKENS = 1.3  # rough CLIP BPE tokens per English word, used only when no tokenizer is given


def _as_list(x) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def _text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).strip()


class CaptionBuilder:
    """``builder(row) -> caption``; ``row`` is a dict of the sample's metadata fields."""

    def __init__(self, caption_column=None, syncap: str | None = None, syncap_column=None):
        self.columns = _as_list(caption_column) or list(DEFAULT_CAPTION_COLUMNS)
        self.syncap_columns = _as_list(syncap_column)  # first non-empty wins, as for caption_column
        self.mode = syncap or ("append" if syncap_column else "original")
        if self.mode not in SYNCAP_MODES:
            raise KoalaError(f"syncap: {self.mode!r} is not one of {', '.join(SYNCAP_MODES)}")
        if self.mode != "original" and not syncap_column:
            raise KoalaError(f"syncap: {self.mode!r} needs syncap_column (the field holding the synthetic caption)")
        self.notes: dict[str, int] = {}

    @staticmethod
    def _first(row: dict, columns: list[str]) -> str:
        for col in columns:  # first non-empty column, in the order given
            t = _text(row.get(col))
            if t:
                return t
        return ""

    def original(self, row: dict) -> str:
        return self._first(row, self.columns)

    def __call__(self, row: dict) -> str:
        orig = self.original(row)
        if self.mode == "original":
            cap = orig
        else:
            syn = self._first(row, self.syncap_columns)
            if not syn:
                self.notes["syncap_missing"] = self.notes.get("syncap_missing", 0) + 1
                cap = orig
            elif self.mode == "append":
                cap = f"{orig}, {syn}" if orig else syn
            else:
                cap = syn
        if not cap:
            cols = ", ".join(self.columns)
            raise SkipSample("no_caption", f"none of the caption fields [{cols}] is set")
        return cap


def word_count(caption: str) -> int:
    return len(caption.split())


class CaptionLengths:
    """Counts words and how many captions overflow the 77-token CLIP window (exact with a tokenizer)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.n = 0
        self.words = 0
        self.over = 0

    def add(self, caption: str) -> None:
        w = word_count(caption)
        self.n += 1
        self.words += w
        if self.tokenizer is not None:
            ntok = len(self.tokenizer(caption, truncation=False).input_ids)  # includes BOS/EOS
        else:
            ntok = math.ceil(w * WORDS_TO_TOKENS) + 2
        self.over += ntok > CLIP_WINDOW

    def as_dict(self) -> dict:
        return {
            "avg_caption_words": round(self.words / self.n, 2) if self.n else 0.0,
            "captions_over_77_tokens": self.over,
            "captions_over_77_tokens_pct": round(100.0 * self.over / self.n, 2) if self.n else 0.0,
            "token_count_method": "tokenizer"
            if self.tokenizer is not None
            else f"estimate ({WORDS_TO_TOKENS} tokens/word)",
        }


def read_syncap_file(path: str) -> dict[str, str]:
    """key -> caption of a synCap file (a line cut by a kill is ignored)."""
    if not os.path.isfile(path):
        raise KoalaError(f"syncap_file {path}: no such file (write it with koala data syncap)", option="syncap_file")
    from ..utils.files import read_jsonl

    return {str(r["key"]): str(r.get(SYNCAP_FIELD, "")) for r in read_jsonl(path) if "key" in r}
