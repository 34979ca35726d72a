"""Build a CLIP-format BPE tokenizer (vocab.json + merges.txt) offline, for tiny and embedded models.

Every printable ASCII character is a token (so any text tokenizes); each word in ``words`` additionally
gets a chain of merges that makes it a single token, as CLIP's tokenizer does for common words.
"""

from __future__ import annotations

import json
import os
import string
from typing import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_CHARS = [c for c in string.printable if not c.isspace()]


def build_clip_tokenizer(out_dir: str, words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIP tokenizer to ``out_dir`` and return it loaded from there."""
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for c in _CHARS:
        add(c)
    for c in _CHARS:
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted({w.lower() for w in words if w}):
        if len(word) < 2 or any(c not in _CHARS for c in word):
            continue
        left = word[0]
        for i in range(1, len(word)):
            right = word[i] + ("</w>" if i == len(word) - 1 else "")
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
            add(left)
    add(BOS)
    add(EOS)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
                        model_max_length=model_max_length, pad_token=EOS)
    tok.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)
