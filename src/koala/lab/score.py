"""Score images against shapes prompts with no learned model (a T2I-CompBench-style check we can trust).

1. ``parse_prompt``: the prompt -> expected objects (colour, shape, size) and relations ("A left of B").
2. ``detect_objects``: every pixel -> nearest palette colour or background; connected components
   (4-neighbour flood fill in numpy) above a minimum area are objects; shape from the component's
   fill ratio of its bounding box (square ~1, circle ~0.79, triangle ~0.5) and top/bottom mass asymmetry
   (a triangle's top half holds ~1/3 of its mass); centroid for relations.
3. ``score_image``: per image, the fraction of expected facts that hold, in four categories:
   ``color`` (each expected colour is present), ``shape`` (each expected shape is present, counted as a
   multiset), ``binding`` (the object of each expected colour has the expected shape) and ``spatial``
   (each stated relation holds between the centroids of the two objects, found by colour).
   ``all`` is 1 when every fact of the image holds. ``score_folder`` averages over images, and also reports
   GenEval's tags (counting, position, colours, colour attribution, single / two object; :mod:`.geneval_tags`).
4. ``held_out_breakdown``: binding accuracy on objects of held-out colour-shape pairs vs seen pairs.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ..errors import KoalaError
from .shapes import BACKGROUND, DEFAULT_HELD_OUT, PALETTE, SHAPES, SIZES

CATEGORIES = ("color", "shape", "binding", "spatial", "all")
_COLORS = "|".join(PALETTE)
_OBJ = re.compile(rf"\b(a|an|the)\s+(?:({'|'.join(SIZES)})\s+)?({_COLORS})\s+({'|'.join(SHAPES)})\b")
_REL = re.compile(r"\b(to the left of|to the right of|left of|right of|above|below)\b")


@dataclass
class Expected:
    objects: list[dict]  # {"color", "shape", "size" (or None)}
    relations: list[dict] = field(default_factory=list)  # {"a", "relation", "b"}: objects[a] REL objects[b]


def parse_prompt(prompt: str) -> Expected:
    """Objects are introduced with "a"/"an"; "the red circle" refers back to an earlier one. A relation
    phrase between two consecutive object phrases relates them (first REL second)."""
    text = prompt.lower()
    objects: list[dict] = []
    refs: list[tuple[int, int, int]] = []  # (object index, span start, span end)
    for m in _OBJ.finditer(text):
        art, size, color, shape = m.groups()
        idx = None
        if art == "the":
            idx = next((i for i, o in enumerate(objects) if o["color"] == color and o["shape"] == shape), None)
        if idx is None:
            objects.append({"color": color, "shape": shape, "size": size})
            idx = len(objects) - 1
        refs.append((idx, m.start(), m.end()))
    relations = []
    for (i, _, end), (j, start, _) in zip(refs, refs[1:]):
        m = _REL.search(text[end:start])
        if m and i != j:
            relations.append({"a": i, "relation": m.group(1).replace("to the ", ""), "b": j})
    return Expected(objects, relations)


# ----------------------------------------------------------------------------------------------- detection
def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: ``(labels [H, W] int32, 0 = none; count)``."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
    return labels, n


def classify_shape(component: np.ndarray) -> tuple[str, float, float]:
    """``(shape, fill ratio of bbox, top/bottom mass ratio)`` of a boolean mask cropped to its bbox."""
    h = component.shape[0]
    fill = float(component.mean())
    top, bottom = component[: h // 2].sum(), component[h - h // 2 :].sum()
    asym = float(top) / max(float(bottom), 1.0)
    if asym < 0.6 or fill < 0.62:
        return "triangle", fill, asym
    return ("square" if fill >= 0.88 else "circle"), fill, asym


def color_labels(
    image: np.ndarray, colors: Sequence[str] | None = None, max_dist: float = 110.0
) -> tuple[np.ndarray, list[str]]:
    """Per-pixel index into ``names`` (0 = background/unknown) by nearest palette colour in RGB."""
    names = list(colors or PALETTE)
    ref = np.array([BACKGROUND] + [PALETTE[c] for c in names], np.float32)
    img = image[..., :3].astype(np.float32)
    d = ((img[..., None, :] - ref) ** 2).sum(-1)
    lab = d.argmin(-1)
    lab[np.sqrt(d.min(-1)) > max_dist] = 0
    return lab, ["background"] + names


def detect_objects(image: np.ndarray, min_area_frac: float = 0.006, colors: Sequence[str] | None = None) -> list[dict]:
    """Objects in an ``uint8 [H, W, 3]`` image: ``{"color", "shape", "area", "cx", "cy", "fill", "asym"}``,
    largest first."""
    if image.ndim != 3 or image.shape[-1] < 3:
        raise KoalaError(f"expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    lab, names = color_labels(image, colors)
    min_area = max(6, int(min_area_frac * lab.size))
    found = []
    for ci in range(1, len(names)):
        mask = lab == ci
        if mask.sum() < min_area:
            continue
        comps, n = label_components(mask)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(comps == k)
            if len(ys) < min_area:
                continue
            crop = comps[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == k
            shape, fill, asym = classify_shape(crop)
            found.append(
                {
                    "color": names[ci],
                    "shape": shape,
                    "area": int(len(ys)),
                    "cx": float(xs.mean() + 0.5),
                    "cy": float(ys.mean() + 0.5),
                    "fill": round(fill, 3),
                    "asym": round(asym, 3),
                    "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],  # x0, y0, x1, y1
                }
            )
    return sorted(found, key=lambda o: -o["area"])


# ----------------------------------------------------------------------------------------------- scoring
def relation_holds(a: dict, rel: str, b: dict) -> bool:
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    return {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]


def largest_by_colour(detected: list[dict]) -> dict[str, dict]:
    """Colour -> the largest detected object of that colour (``detect_objects`` lists them largest first): the
    object every relation and binding check reads."""
    by_color: dict[str, dict] = {}
    for o in detected:
        by_color.setdefault(o["color"], o)
    return by_color


def score_image(image: np.ndarray, prompt: str | Expected) -> dict:
    """Per-category scores in [0, 1] for one image (``None`` where the prompt has no fact of that kind)."""
    exp = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    det = detect_objects(image)
    by_color = largest_by_colour(det)
    out: dict = dict.fromkeys(CATEGORIES)
    if exp.objects:
        out["color"] = float(np.mean([o["color"] in by_color for o in exp.objects]))
        want, have = Counter(o["shape"] for o in exp.objects), Counter(o["shape"] for o in det)
        out["shape"] = sum(min(k, have[s]) for s, k in want.items()) / len(exp.objects)
        out["binding"] = float(
            np.mean([o["color"] in by_color and by_color[o["color"]]["shape"] == o["shape"] for o in exp.objects])
        )
    if exp.relations:
        ok = []
        for r in exp.relations:
            a, b = exp.objects[r["a"]]["color"], exp.objects[r["b"]]["color"]
            ok.append(a in by_color and b in by_color and relation_holds(by_color[a], r["relation"], by_color[b]))
        out["spatial"] = float(np.mean(ok))
    facts = [v for k, v in out.items() if k != "all" and v is not None]
    out["all"] = float(all(v == 1.0 for v in facts)) if facts else None
    out["detected"] = det
    return out


def aggregate(scores: Iterable[dict]) -> dict:
    """Mean of each category over the images that have it, plus counts."""
    scores = list(scores)
    res = {}
    for c in CATEGORIES:
        vals = [s[c] for s in scores if s.get(c) is not None]
        res[c] = float(np.mean(vals)) if vals else None
        res[f"n_{c}"] = len(vals)
    res["n_images"] = len(scores)
    if any("geneval" in s for s in scores):  # rows of score_pairs / score_folder
        from .geneval_tags import aggregate_tags

        res["geneval"] = aggregate_tags(s["geneval"] for s in scores if "geneval" in s)
    return res


def image_prompt_pairs(folder: str) -> list[tuple[str, str]]:
    """``[(image path, prompt)]`` from ``metadata.jsonl`` (``file_name``, ``text`` or ``prompt``) or, failing
    that, from each PNG's tEXt chunk ``prompt``."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise KoalaError(f"{folder}: no such directory")
    meta = os.path.join(folder, "metadata.jsonl")
    items = []
    if os.path.isfile(meta):
        with open(meta) as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text = row.get("text", row.get("prompt"))
                if "file_name" not in row or text is None:
                    raise KoalaError(f"{meta}:{ln}: each row needs file_name and text (or prompt)")
                items.append((os.path.join(folder, row["file_name"]), text))
        return items
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(".png"):
            path = os.path.join(folder, name)
            with Image.open(path) as im:
                text = im.info.get("prompt")
            if text is not None:
                items.append((path, text))
    if not items:
        raise KoalaError(f"{folder}: no metadata.jsonl and no PNG with a 'prompt' text chunk")
    return items


def load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise KoalaError(f"{path}: image not found") from None


def score_pairs(images: Iterable[np.ndarray], prompts: Iterable[str]) -> tuple[dict, list[dict]]:
    """Aggregate and per-image rows; each row also holds GenEval's tags (``geneval``, :mod:`.geneval_tags`)."""
    from .geneval_tags import geneval_tags

    per = []
    for im, p in zip(images, prompts):
        row = score_image(np.asarray(im), p)
        row["geneval"] = geneval_tags(parse_prompt(p), row["detected"])
        per.append(row)
    return aggregate(per), per


def score_folder(folder: str, limit: int | None = None) -> tuple[dict, list[dict]]:
    """Score every (image, prompt) of a folder; returns ``(aggregate, per-image rows)``."""
    items = image_prompt_pairs(folder)[:limit]
    agg, per = score_pairs((load_rgb(p) for p, _ in items), (t for _, t in items))
    for (path, text), row in zip(items, per):
        row["file_name"] = os.path.relpath(path, folder)
        row["text"] = text
    return agg, per


def held_out_breakdown(per: list[dict], held_out=DEFAULT_HELD_OUT) -> dict:
    """Binding accuracy on objects of a held-out colour-shape pair vs the rest (``per``: ``score_folder`` rows)."""
    held_set = set(map(tuple, held_out))
    held, seen = [], []
    for row in per:
        for o in parse_prompt(row["text"]).objects:
            det = next((d for d in row["detected"] if d["color"] == o["color"]), None)
            ok = det is not None and det["shape"] == o["shape"]
            (held if (o["color"], o["shape"]) in held_set else seen).append(ok)
    return {
        "binding_held_out_objects": float(np.mean(held)) if held else None,
        "n_held_out_objects": len(held),
        "binding_seen_objects": float(np.mean(seen)) if seen else None,
        "n_seen_objects": len(seen),
    }
