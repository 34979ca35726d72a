"""The offline CLIP-format tokenizer: every listed word is exactly one token; any ASCII text tokenizes."""

from transformers import CLIPTokenizer

from koala.lab.shapes import VOCAB_WORDS
from koala.testing.tokenizer import build_clip_tokenizer


def test_every_word_is_one_token_even_when_merge_chains_collide(tmp_path):
    words = list(VOCAB_WORDS) + ["right", "triangle", "tri", "ri", "rig"]  # "r i" is shared by several words
    tok = build_clip_tokenizer(str(tmp_path), words)
    for w in words:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path))
    text = "a red triangle to the right of a blue circle, 3 zebras!"
    assert reloaded(text).input_ids == tok(text).input_ids
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids).replace(" ", "") == text.lower().replace(" ", "")
