"""Hard negatives that teach the text encoders word order, and the auxiliary loss that uses them.

The U-Net reads a caption through cross-attention, which treats the token embeddings as a set: if each token's
embedding carried only its own word, "a red circle to the left of a blue square" and "a blue square to the left of
a red circle" would be the same set, and no amount of U-Net training could tell them apart. The text encoders must
put the word's role (subject or object of the relation, which noun a colour binds to) into the embeddings.

For every caption two hard negatives are built from the caption text alone (so ``--data`` folders work too):

* **relation swap**: the two noun phrases around the first relation trade places ("A left of B" -> "B left of A");
* **binding swap**: the first two colours trade places everywhere ("red circle ... blue square" ->
  "blue circle ... red square").

Each negative has the same words as its caption in another order. :func:`order_loss` is a hinge on the cosine
similarity of the caption's and the negative's conditioning, as the U-Net sees it: the mean over tokens of the
token embeddings (order-free unless the encoder puts order into them) and the pooled embedding. Pairs already less
similar than ``margin`` cost nothing, so the loss does not fight the diffusion loss once the encoders separate
them.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .shapes import PALETTE, RELATIONS

_REL = re.compile(r"^(an? .+?) (" + "|".join(RELATIONS) + r") (an? [^,]+)(,.*)?$")
_COLOR = re.compile(r"\b(" + "|".join(PALETTE) + r")\b")


def relation_swap(text: str) -> str | None:
    """``"A REL B[, rest]"`` -> ``"B REL A[, rest]"``; None when the caption states no relation first."""
    m = _REL.match(text)
    if not m:
        return None
    a, rel, b, rest = m.groups()
    return f"{b} {rel} {a}{rest or ''}"


def binding_swap(text: str) -> str | None:
    """The first two distinct colours swapped everywhere; None with fewer than two colours."""
    colors = list(dict.fromkeys(_COLOR.findall(text)))
    if len(colors) < 2:
        return None
    a, b = colors[:2]
    return _COLOR.sub(lambda m: b if m.group(1) == a else a if m.group(1) == b else m.group(1), text)


def hard_negatives(captions: list[str]) -> list[tuple[int, str]]:
    """``(index of the caption, negative caption)`` for every caption that has one (relation swap, binding swap)."""
    out = []
    for i, c in enumerate(captions):
        for neg in (relation_swap(c), binding_swap(c)):
            if neg is not None and neg != c:
                out.append((i, neg))
    return out


def order_loss(family, tokenizers, encoders, cond: dict, captions: list[str], margin: float) -> torch.Tensor:
    """Hinge ``relu(cos - margin)`` between each caption's conditioning (``cond``, already encoded, with
    gradients) and its hard negatives', on the token-mean of ``prompt_embeds`` and on the pooled embedding
    (SDXL); 0 when the batch has no negative."""
    pairs = hard_negatives(captions)
    if not pairs:
        return torch.zeros(())
    idx = torch.tensor([i for i, _ in pairs])
    neg = family.encode_prompts([n for _, n in pairs], tokenizers, encoders)
    losses = []
    for key in family.text_cond_keys:
        pos_v, neg_v = cond[key][idx], neg[key]
        if not pos_v.is_floating_point():  # an attention mask (PixArt): no embedding to separate
            continue
        if pos_v.ndim == 3:  # token embeddings: what cross-attention sees, as a set
            pos_v, neg_v = pos_v.mean(1), neg_v.mean(1)
        losses.append(F.relu(F.cosine_similarity(pos_v, neg_v, dim=-1) - margin).mean())
    return torch.stack(losses).mean()
