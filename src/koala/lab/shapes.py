"""Synthetic "shapes" data with known ground truth: 1-3 flat-coloured objects on a white background.

Each scene has objects with a colour, a shape, a size and a position, and a caption built from templates of
varying length ("a small red circle to the left of a large blue square, and a green triangle below the
blue square"). Colours are distinct within a scene, so every object can be found again by its colour.
Relations are stated only when they are unambiguous (one axis clearly dominates).

Everything is seeded: image ``i`` of split ``s`` depends only on ``(seed, s, i)``, so the same seed gives
byte-identical PNGs. The training split never contains the held-out colour-shape pairs; the val split
draws from all pairs (so it tests both seen and held-out bindings).

On disk (``write_shapes_dataset``): ``OUT/train`` and ``OUT/val`` image folders, each with
``metadata.jsonl`` rows ``{"file_name", "text", "objects", "relations"}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ..errors import KoalaError

# Every colour the scorer knows. Datasets use DEFAULT_COLORS unless told otherwise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
BACKGROUND = (255, 255, 255)
LAYOUT_BACKGROUND = (0, 0, 0)  # layout (control) images: the masks on black (koala.lab.layout)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.13, "large": 0.20}  # radius as a fraction of the image side
DEFAULT_COLORS = ("red", "green", "blue", "yellow")
DEFAULT_HELD_OUT = (("red", "triangle"), ("blue", "circle"))
RELATIONS = ("to the left of", "to the right of", "above", "below")
SPLITS = ("train", "val")
COUNT_WEIGHTS = (0.35, 0.4, 0.25)  # probability of 1, 2, 3 objects

# Word list for a tokenizer: every word a caption can contain.
VOCAB_WORDS = sorted(
    {
        "a",
        "an",
        "the",
        "and",
        "picture",
        "of",
        "on",
        "white",
        "background",
        "to",
        "left",
        "right",
        "above",
        "below",
        ",",
        *PALETTE,
        *SHAPES,
        *SIZES,
    }
)


@dataclass
class ShapeObject:
    color: str
    shape: str
    size: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half-extent, pixels


@dataclass
class Scene:
    text: str
    objects: list[ShapeObject]
    relations: list[dict] = field(default_factory=list)  # {"a": i, "relation": "left of", "b": j}: a REL b

    def to_json(self) -> dict:
        return {"text": self.text, "objects": [asdict(o) for o in self.objects], "relations": self.relations}


# ----------------------------------------------------------------------------------------------- rendering
def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of one shape (pixel centres at integer + 0.5)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r * 0.9) & (np.abs(y - cy) <= r * 0.9)
    if shape == "triangle":  # apex up; base at the bottom
        top, bottom = cy - r, cy + r
        half = r * (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
    raise KoalaError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def render(
    objects: Sequence[ShapeObject], size: int = 64, background: tuple[int, int, int] = BACKGROUND
) -> np.ndarray:
    """``uint8 [size, size, 3]`` image of the objects (no anti-aliasing, so colours are exact)."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    for o in objects:
        img[shape_mask(o.shape, o.cx, o.cy, o.r, size)] = PALETTE[o.color]
    return img


# ----------------------------------------------------------------------------------------------- captions
def _phrase(o: ShapeObject, with_size: bool, article: str = "a") -> str:
    return f"{article} {o.size + ' ' if with_size else ''}{o.color} {o.shape}"


def _relation(a: ShapeObject, b: ShapeObject, margin: float) -> str | None:
    """The relation 'a REL b' if one axis clearly dominates, else None."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) > 1.5 * abs(dy) and abs(dx) > margin:
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) > 1.5 * abs(dx) and abs(dy) > margin:
        return "above" if dy < 0 else "below"
    return None


def _caption(objs: list[ShapeObject], rng: np.random.Generator, size: int) -> tuple[str, list[dict]]:
    sized = [bool(rng.random() < 0.5) for _ in objs]
    ph = [_phrase(o, s) for o, s in zip(objs, sized)]
    margin = 0.15 * size
    rels: list[dict] = []

    def rel(i, j):
        r = _relation(objs[i], objs[j], margin) if rng.random() < 0.7 else None
        if r:
            rels.append({"a": i, "relation": r.replace("to the ", ""), "b": j})
        return r

    if len(objs) == 1:
        tpl = int(rng.integers(3))
        return [ph[0], f"a picture of {ph[0]}", f"{ph[0]} on a white background"][tpl], rels
    r01 = rel(0, 1)
    text = f"{ph[0]} {r01} {ph[1]}" if r01 else f"{ph[0]} and {ph[1]}"
    if len(objs) == 3:
        r21 = rel(2, 1)
        if r21:
            text += f", and {ph[2]} {r21} {_phrase(objs[1], False, 'the')}"
        else:
            text = f"{ph[0]}, {ph[1]} and {ph[2]}" if not r01 else f"{text}, and {ph[2]}"
    return text, rels


# ----------------------------------------------------------------------------------------------- scenes
def make_scene(
    rng: np.random.Generator,
    size: int = 64,
    colors: Sequence[str] = DEFAULT_COLORS,
    shapes: Sequence[str] = SHAPES,
    exclude: Iterable[tuple[str, str]] = (),
    count_weights: Sequence[float] = COUNT_WEIGHTS,
) -> Scene:
    """One random scene; colour-shape pairs in ``exclude`` never appear."""
    exclude = {tuple(p) for p in exclude}
    pairs = [(c, s) for c in colors for s in shapes if (c, s) not in exclude]
    w = np.asarray(count_weights, np.float64)
    n = 1 + int(rng.choice(len(w), p=w / w.sum()))
    n = min(n, len(set(colors)))
    for _ in range(1000):
        chosen: list[tuple[str, str]] = []
        for idx in rng.permutation(len(pairs)):
            if pairs[idx][0] not in {c for c, _ in chosen}:
                chosen.append(pairs[idx])
            if len(chosen) == n:
                break
        objs: list[ShapeObject] = []
        for color, shape in chosen:
            sz = str(rng.choice(list(SIZES)))
            r = SIZES[sz] * size
            for _ in range(200):
                cx, cy = rng.uniform(r + 1, size - r - 1, 2)
                if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.r + 0.06 * size for o in objs):
                    objs.append(ShapeObject(color, shape, sz, round(float(cx), 2), round(float(cy), 2), round(r, 2)))
                    break
        if len(objs) == n:
            text, rels = _caption(objs, rng, size)
            return Scene(text, objs, rels)
    raise KoalaError(f"could not place {n} objects in a {size}x{size} image; use a larger size", option="size")


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def generate_scenes(
    n: int,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    colors: Sequence[str] = DEFAULT_COLORS,
    held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT,
    count_weights: Sequence[float] = COUNT_WEIGHTS,
) -> list[Scene]:
    """Scenes ``0..n-1`` of a split. ``train`` excludes ``held_out`` pairs; ``val`` uses all pairs."""
    if split not in SPLITS:
        raise KoalaError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    bad = [c for c in colors if c not in PALETTE]
    if bad:
        raise KoalaError(f"unknown colour(s) {', '.join(bad)}; known: {', '.join(PALETTE)}")
    exclude = tuple(held_out) if split == "train" else ()
    return [make_scene(scene_rng(seed, split, i), size, colors, SHAPES, exclude, count_weights) for i in range(n)]


def write_image_folder(scenes: Sequence[Scene], out_dir: str, size: int = 64, progress: bool = True) -> str:
    """Write PNGs + ``metadata.jsonl`` (``file_name``, ``text``, ``objects``, ``relations``) to ``out_dir``, and
    each image's layout ``<stem>.layout.png`` (:mod:`koala.lab.layout`)."""
    from PIL import Image

    from ..utils.console import progress_bar

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
        for i, sc in enumerate(
            progress_bar(scenes, desc=f"writing {os.path.basename(out_dir)}", disable=not progress)
        ):
            name = f"{i:06d}.png"
            Image.fromarray(render(sc.objects, size)).save(os.path.join(out_dir, name))
            layout = render(sc.objects, size, LAYOUT_BACKGROUND)  # the ControlNet's control (koala.lab.layout)
            Image.fromarray(layout).save(os.path.join(out_dir, f"{i:06d}.layout.png"))
            f.write(json.dumps({"file_name": name, **sc.to_json()}) + "\n")
    return out_dir


def write_shapes_dataset(
    out_dir: str,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    size: int = 64,
    colors: Sequence[str] = DEFAULT_COLORS,
    held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT,
    progress: bool = True,
) -> str:
    """Write ``out_dir/train`` and ``out_dir/val`` image folders and ``out_dir/shapes.json`` (the settings)."""
    held_out = [tuple(p) for p in held_out]
    os.makedirs(out_dir, exist_ok=True)
    for split, n in (("train", num_train), ("val", num_val)):
        scenes = generate_scenes(n, split, seed, size, colors, held_out)
        write_image_folder(scenes, os.path.join(out_dir, split), size, progress)
    with open(os.path.join(out_dir, "shapes.json"), "w") as f:
        json.dump(
            {
                "seed": seed,
                "size": size,
                "colors": list(colors),
                "shapes": list(SHAPES),
                "held_out": [list(p) for p in held_out],
                "num_train": num_train,
                "num_val": num_val,
            },
            f,
            indent=1,
        )
    return out_dir


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``"red:triangle,blue:circle"`` -> ``[("red", "triangle"), ("blue", "circle")]`` ("" -> [])."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if ":" not in item:
            raise KoalaError(f"held-out pair {item!r} must look like colour:shape (e.g. red:triangle)")
        c, s = (x.strip() for x in item.split(":", 1))
        if c not in PALETTE or s not in SHAPES:
            raise KoalaError(f"held-out pair {item!r}: colours are {', '.join(PALETTE)}; shapes {', '.join(SHAPES)}")
        out.append((c, s))
    return out
