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

Separating the embeddings is necessary, not sufficient: the U-Net must also draw the layout the words say.
:func:`image_order_loss` asks that directly, as a diffusion classifier would: at high noise (where the caption, not
the noisy image, decides the layout) the denoiser's error with the true caption must be lower than with a hard
negative, by a relative margin.
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


def image_order_loss(
    family, denoiser, tokenizers, encoders, batch: dict, err: torch.Tensor, captions: list[str], eligible, margin, g
) -> torch.Tensor:
    """Hinge ``relu(margin - (err_neg - err_pos) / (err_neg + err_pos))`` over the eligible samples that have a
    hard negative (one, drawn from ``g``, per sample): ``err_pos`` is the sample's per-sample MSE to the prediction
    target with its caption (``err``, with gradients), ``err_neg`` the denoiser's with the negative caption on the
    same noisy input (``batch``: ``xt``, ``t``, ``target``, ``micro``); the relative difference makes the margin
    independent of the noise level. 0 when no sample qualifies."""
    by_caption: dict[int, list[str]] = {}
    for i, neg in hard_negatives(captions):
        if eligible[i]:
            by_caption.setdefault(i, []).append(neg)
    if not by_caption:
        return torch.zeros(())
    idx = sorted(by_caption)
    picks = torch.randint(2, (len(idx),), generator=g).tolist()
    negs = [by_caption[i][p % len(by_caption[i])] for i, p in zip(idx, picks)]
    rows = torch.tensor(idx)
    cond = family.encode_prompts(negs, tokenizers, encoders)
    micro = {k: v[rows] for k, v in batch["micro"].items()}
    out = family.forward(denoiser, batch["xt"][rows], batch["t"][rows], {**cond, **micro})
    pred = family.prediction(out, batch["target"].shape[1])
    err_neg = F.mse_loss(pred, batch["target"][rows], reduction="none").mean(dim=(1, 2, 3))
    err_pos = err[rows]
    rel = (err_neg - err_pos) / (err_neg + err_pos).detach().clamp_min(1e-8)
    return F.relu(margin - rel).mean()
