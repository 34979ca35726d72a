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
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if w}):
        if len(word) < 2 or any(c not in _CHARS for c in word):
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        # Apply the merges so far exactly as BPE will (lowest rank first); while the word is not one token,
        # append a merge of its first two parts. Appended merges rank last, so earlier words are unaffected.
        while len(parts) > 1:
            pairs = [(ranks.get(p, len(ranks) + 1), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank > len(ranks):
                i = 0
                ranks[(parts[0], parts[1])] = len(merges)
                merges.append((parts[0], parts[1]))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            add(parts[i])
    add(BOS)
    add(EOS)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(
        os.path.join(out_dir, "vocab.json"),
        os.path.join(out_dir, "merges.txt"),
        model_max_length=model_max_length,
        pad_token=EOS,
    )
    tok.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def build_t5_tokenizer(out_dir: str, words: Iterable[str] = (), model_max_length: int = 300):
    """Write a T5-format (SentencePiece Unigram, ``tokenizer.json``) tokenizer to ``out_dir`` and return it loaded
    from there. Pieces: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), ``▁``, every printable ASCII character, and
    ``▁word`` for each word in ``words`` (more likely than its spelling, so known words are one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in _CHARS]
    known = {p for p, _ in pieces}
    for w in sorted({w.lower() for w in words if w}):
        if "\u2581" + w not in known:
            pieces.append(("\u2581" + w, -1.0))
            known.add("\u2581" + w)
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok = T5Tokenizer(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return T5Tokenizer.from_pretrained(out_dir)
