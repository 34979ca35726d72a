"""GenEval (Ghosh et al. 2023), the object-focused benchmark small fast text-to-image models report: its prompt set,
image layout and rules. The models (Mask2Former detector, CLIP colour classifier) are in :mod:`.geneval_models`.

Facts of the reference (github.com/djghosh13/geneval, ``prompts/create_prompts.py``,
``evaluation/evaluate_images.py``, ``evaluation/summary_scores.py``, ``generation/diffusers_generate.py``) that
koala relies on:

- **Prompts.** 553 lines of ``prompts/evaluation_metadata.jsonl``, each ``{"tag", "include": [{"class", "count",
  "color"?, "position"?: [relation, index of the include it is relative to]}], "exclude"?, "prompt"}``. They are
  generated with ``numpy.random.default_rng(43)`` from COCO's 80 class names (``object_names.txt``; COCO's order,
  with "computer mouse", "tv remote", "computer keyboard" for COCO's "mouse", "remote", "keyboard"): every class as a
  single object ("a photo of a bench"), then 100 each of two objects, counting (2 to 4, "a photo of two parking
  meters", plural by adding "s" or "es" after a final "s", hence "four benchs"), colours (10 colours, never
  "person"), position ("left of", "right of", "above", "below"; "a photo of a dog right of a teddy bear") and
  colour attribution (two different colours), drawn in that order from the one generator, then deduplicated: 80 +
  99 + 80 + 94 + 100 + 100. ``geneval_prompts()`` draws the same numbers in the same order and gives the
  benchmark's file line for line (numpy's ``Generator`` streams are not promised stable across numpy versions;
  the test compares known lines).
- **Images.** ``OUT/00000/metadata.jsonl`` (that prompt's metadata line) and ``OUT/00000/samples/00000.png`` ...:
  4 images per prompt in the reference generator (``--n_samples 4``, ``seed_everything(42)`` before each prompt's
  batch). The evaluator reads every all-digit folder and every ``\\d+.png`` in its ``samples``.
- **Detections.** mmdet's Mask2Former (Swin-S, COCO instances) gives per class boxes with confidences (and masks).
  Kept: confidence > 0.3 (> 0.9 for every class when the prompt's tag is "counting"), at most 16 per class, highest
  first; then a box overlapping a kept one of its class by IoU >= ``max_overlap`` is dropped, with ``max_overlap`` 1.0
  by default, i.e. no overlap is dropped. IoU counts pixels inclusively (``x1 - x0 + 1``).
- **Judging an image** (``evaluate``): every include (AND): the first ``count`` detections of its class must exist;
  with a colour, CLIP must call at least ``count`` of them that colour; with a position, each of them must stand in
  the relation to each kept object of the include it refers to (which must itself have matched). Any exclude (OR):
  ``count`` or more detections of the class make the image wrong (counting's exclude is count + 1: exactly N).
- **Position** (``relative_position``): centres and sizes of the two boxes, ``offset = centre_A - centre_B``, each
  axis shrunk by 0.1 x (the sum of the two sizes on that axis) towards 0; no relation if both are under 1e-3; else
  the shrunk offset over the length of the full offset: x < -0.5 "left of", > 0.5 "right of", y < -0.5 "above",
  y > 0.5 "below" (image y grows downwards).
- **Colour**: CLIP ViT-L/14 (OpenAI weights through open_clip) zero-shot over red, orange, yellow, green, blue,
  purple, pink, brown, black, white, with the templates "a photo of a {c} {class}", "a photo of a {c}-colored
  {class}", "a photo of a {c} object" (normalised text embeddings averaged per colour, then normalised); the image:
  the object's mask over a #999999 background, cropped to its box.
- **Score.** An image is correct or not; a tag's score is the fraction of its images that are correct; the overall
  GenEval score is the mean of the six tags' scores. The summary also gives the fraction of prompts with at least
  one correct image.

Where koala differs:

- the detector is transformers' port (``Mask2FormerForUniversalSegmentation`` with the checkpoint's own
  ``AutoImageProcessor``, e.g. facebook/mask2former-swin-small-coco-instance) in place of mmdet's; its outputs are
  turned into instances as mmdet's Mask2Former instance head does (softmax over classes without "no object", the top
  100 (query, class) pairs, mask logits > 0, score = class probability x mean mask probability inside the mask, the
  mask's tight box; mask logits upsampled to the padded input, the padding cut off, then resized to the image), but
  the input size is the processor's, and weights and resizing differ from mmdet's, so counts can differ near the
  thresholds. (transformers' own ``post_process_instance_segmentation``, as of 5.24, is not used: it resizes every
  mask to a fixed 384 x 384 whatever the input's padding and aspect, and keeps the top ``num_queries`` pairs, not
  mmdet's 100);
- CLIP ViT-L/14 is a transformers ``CLIPModel`` from a local directory (openai/clip-vit-large-patch14) with its
  ``CLIPProcessor`` (open_clip's OpenAI preprocessing is the same resize, centre crop and normalisation);
- in ``koala eval run`` the images of a prompt are one per ``--seeds`` seed (``--seeds 0,1,2,3`` for the
  benchmark's 4), not the reference generator's one seeded batch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import KoalaError
from ..utils.boxes import POSITIONS, box_iou, relative_position

OBJECT_NAMES = tuple(
    """person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|stop sign|parking meter|
bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|backpack|umbrella|handbag|tie|suitcase|frisbee|skis|
snowboard|sports ball|kite|baseball bat|baseball glove|skateboard|surfboard|tennis racket|bottle|wine glass|cup|fork|
knife|spoon|bowl|banana|apple|sandwich|orange|broccoli|carrot|hot dog|pizza|donut|cake|chair|couch|potted plant|bed|
dining table|toilet|tv|laptop|computer mouse|tv remote|computer keyboard|cell phone|microwave|oven|toaster|sink|
refrigerator|book|clock|vase|scissors|teddy bear|hair drier|toothbrush""".replace("\n", "").split("|")
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SEED = 43
PER_TAG = 100


@dataclass(frozen=True)
class Rules:
    """The reference's defaults (``--options`` of evaluate_images.py)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_margin: float = 0.1


@dataclass
class Detection:
    box: tuple  # x0, y0, x1, y1 in image pixels
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)  # bool (H, W), or None


# ------------------------------------------------------------------------------------------- prompts
def _article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _not_person(rng, size=None):
    """Class indices drawn from all but "person" (the reference's offset trick: no colour on a person)."""
    n, person = len(OBJECT_NAMES), OBJECT_NAMES.index("person")
    idx = rng.choice(n - 1, size=size, replace=False) if size else rng.choice(n - 1)
    return (np.asarray(idx) + 1 + person) % n


def _draw(rng, tag: str) -> dict:
    """One prompt of ``tag`` (not single_object), drawing from ``rng`` exactly as the reference does."""
    names, n = OBJECT_NAMES, len(OBJECT_NAMES)
    if tag == "two_object":
        a, b = (names[i] for i in rng.choice(n, size=2, replace=False))
        return {"tag": tag, "include": [_inc(a), _inc(b)], "prompt": f"a photo of {_article(a)} and {_article(b)}"}
    if tag == "counting":
        c = names[rng.choice(n)]
        k = int(rng.integers(2, 4, endpoint=True))
        return {
            "tag": tag,
            "include": [_inc(c, k)],
            "exclude": [_inc(c, k + 1)],
            "prompt": f"a photo of {NUMBERS[k]} {_plural(c)}",
        }
    if tag == "colors":
        c = names[int(_not_person(rng))]
        col = COLORS[rng.choice(len(COLORS))]
        return {"tag": tag, "include": [_inc(c, color=col)], "prompt": f"a photo of {_article(col)} {c}"}
    if tag == "position":
        a, b = (names[i] for i in rng.choice(n, size=2, replace=False))
        rel = POSITIONS[rng.choice(len(POSITIONS))]
        inc = [_inc(b), {**_inc(a), "position": [rel, 0]}]
        return {"tag": tag, "include": inc, "prompt": f"a photo of {_article(a)} {rel} {_article(b)}"}
    a, b = (names[int(i)] for i in _not_person(rng, 2))
    ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    text = f"a photo of {_article(ca)} {a} and {_article(cb)} {b}"
    return {"tag": tag, "include": [_inc(a, color=ca), _inc(b, color=cb)], "prompt": text}


def _inc(name: str, count: int = 1, color: str | None = None) -> dict:
    return {"class": name, "count": count} | ({"color": color} if color else {})


def geneval_prompts(seed: int = SEED, per_tag: int = PER_TAG) -> list[dict]:
    """The benchmark's prompt metadata from its templates and object list (seed 43, 100 per tag: its 553 lines)."""
    rng = np.random.default_rng(seed)
    out = [
        {
            "tag": "single_object",
            "include": [_inc(OBJECT_NAMES[i])],
            "prompt": f"a photo of {_article(OBJECT_NAMES[i])}",
        }
        for i in rng.choice(len(OBJECT_NAMES), size=len(OBJECT_NAMES), replace=False)
    ]
    for tag in TAGS[1:]:
        out += [_draw(rng, tag) for _ in range(per_tag)]
    seen, unique = set(), []
    for m in out:  # the reference deduplicates on the whole sample (its YAML dump, keys sorted)
        key = json.dumps(m, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(m)
    return unique


def write_prompts(out_dir: str, seed: int = SEED, per_tag: int = PER_TAG, overwrite: bool = False) -> dict:
    """``evaluation_metadata.jsonl`` and ``generation_prompts.txt`` in ``out_dir``, as the reference writes them."""
    from ..utils.files import atomic_output_dir

    meta = geneval_prompts(seed, per_tag)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with open(os.path.join(tmp, "evaluation_metadata.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(m) + "\n" for m in meta)
        with open(os.path.join(tmp, "generation_prompts.txt"), "w", encoding="utf-8") as f:
            f.writelines(m["prompt"] + "\n" for m in meta)
    return {"out": out_dir, "n": len(meta), "tags": {t: sum(m["tag"] == t for m in meta) for t in TAGS}}


# ------------------------------------------------------------------------------------------- metadata
def check_metadata(m, where: str) -> dict:
    """``m`` if it is a GenEval metadata object; else a KoalaError naming ``where`` (file and line) and the field."""

    def bad(what: str):
        raise KoalaError(f"{where}: {what}", option="metadata")

    if not isinstance(m, dict):
        bad("not a JSON object")
    if m.get("tag") not in TAGS:
        bad(f"field tag is {m.get('tag')!r}, not one of {', '.join(TAGS)}")
    if not isinstance(m.get("prompt"), str) or not m["prompt"].strip():
        bad("no prompt (field prompt)")
    for key in ("include", "exclude"):
        reqs = m.get(key, [])
        if not isinstance(reqs, list) or (key == "include" and not reqs):
            bad(f"field {key} must be a list of {{class, count}}" + (" (not empty)" if key == "include" else ""))
        for i, r in enumerate(reqs):
            if not isinstance(r, dict) or r.get("class") not in OBJECT_NAMES:
                bad(f"{key}[{i}]: class {r.get('class') if isinstance(r, dict) else r!r} is not a GenEval class")
            if not isinstance(r.get("count"), int) or isinstance(r["count"], bool) or r["count"] < 1:
                bad(f"{key}[{i}]: count must be a positive integer")
            if "color" in r and r["color"] not in COLORS:
                bad(f"{key}[{i}]: color {r['color']!r} is not one of {', '.join(COLORS)}")
            pos = r.get("position")
            if pos is not None and (
                not isinstance(pos, list | tuple)
                or len(pos) != 2
                or pos[0] not in POSITIONS
                or not isinstance(pos[1], int)
                or not 0 <= pos[1] < i
            ):
                bad(f"{key}[{i}]: position must be [one of {', '.join(POSITIONS)}, index of an earlier include]")
    return m


def read_metadata(path: str) -> list[dict]:
    """The benchmark's ``evaluation_metadata.jsonl`` (or a folder holding it): one metadata object a line."""
    if os.path.isdir(path):
        path = os.path.join(path, "evaluation_metadata.jsonl")
    if not os.path.isfile(path):
        raise KoalaError(
            f"GenEval metadata {path}: no such file (the benchmark's prompts/evaluation_metadata.jsonl, or "
            "`koala eval geneval-prompts --out DIR` writes it)",
            option="metadata",
        )
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                m = json.loads(line)
            except json.JSONDecodeError as err:
                raise KoalaError(f"{path} line {n}: not valid JSON ({err.msg})", option="metadata") from None
            out.append(check_metadata(m, f"{path} line {n}"))
    if not out:
        raise KoalaError(f"GenEval metadata {path}: no prompts", option="metadata")
    return out


# ------------------------------------------------------------------------------------------- image layout
@dataclass
class PromptImages:
    folder: str  # OUT/00012
    index: int
    metadata: dict
    images: list[str]  # paths of samples/NNNNN.png, in order


def read_layout(folder: str, images_per_prompt: int = 4, limit: int | None = None) -> list[PromptImages]:
    """The benchmark's image folder: one all-digit folder per prompt with ``metadata.jsonl`` and ``samples/*.png``.
    A prompt folder without its metadata or with fewer than ``images_per_prompt`` images is refused by name."""
    if not os.path.isdir(folder):
        raise KoalaError(f"GenEval images {folder}: no such folder", option="dir")
    subs = sorted((d for d in os.listdir(folder) if d.isdigit()), key=int)
    if not subs:
        raise KoalaError(
            f"GenEval images {folder}: no prompt folders (00000/metadata.jsonl + 00000/samples/00000.png, ...)",
            option="dir",
        )
    out = []
    for d in subs[:limit]:
        sub = os.path.join(folder, d)
        meta_path = os.path.join(sub, "metadata.jsonl")
        if not os.path.isfile(meta_path):
            raise KoalaError(f"GenEval images: {sub} has no metadata.jsonl (the prompt's metadata line)", option="dir")
        with open(meta_path, encoding="utf-8") as f:
            text = f.read().strip()
        try:
            meta = json.loads(text.splitlines()[0]) if text else None
        except json.JSONDecodeError as err:
            raise KoalaError(f"{meta_path} line 1: not valid JSON ({err.msg})", option="dir") from None
        check_metadata(meta, f"{meta_path} line 1")
        samples = os.path.join(sub, "samples")
        names = sorted(
            (n for n in (os.listdir(samples) if os.path.isdir(samples) else []) if re.fullmatch(r"\d+\.png", n)),
            key=lambda n: int(n[:-4]),
        )
        if len(names) < images_per_prompt:
            raise KoalaError(
                f"GenEval images: {samples} has {len(names)} image(s) (NNNNN.png), the benchmark needs "
                f"{images_per_prompt} per prompt ({meta['prompt']!r}); generate the missing ones or lower "
                "--images-per-prompt",
                option="dir",
            )
        out.append(PromptImages(sub, int(d), meta, [os.path.join(samples, n) for n in names]))
    return out


# ------------------------------------------------------------------------------------------- rules
def keep_detections(detected: dict[str, list[Detection]], tag: str, rules: Rules = Rules()) -> dict:
    """Per class, the detections the benchmark keeps: above the threshold (the counting one for counting prompts),
    highest first, at most ``max_objects``, minus those overlapping a kept one by ``max_overlap`` or more."""
    thr = rules.counting_threshold if tag == "counting" else rules.threshold
    out = {}
    for name, dets in detected.items():
        todo = sorted((d for d in dets if d.score > thr), key=lambda d: -d.score)[: rules.max_objects]
        kept = []
        while todo:
            best = todo.pop(0)
            kept.append(best)
            if rules.max_overlap < 1:
                todo = [d for d in todo if box_iou(best.box, d.box) < rules.max_overlap]
        if kept:
            out[name] = kept
    return out


def judge(metadata: dict, objects: dict[str, list[Detection]], colors_of, margin: float = 0.1) -> tuple[bool, str]:
    """(correct, reasons) of one image: ``objects`` the kept detections per class (highest first);
    ``colors_of(class, detections)`` the colour name of each detection (CLIP in the scorer)."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in req:
            colors = list(colors_of(name, found))
            if colors.count(req["color"]) < count:
                ok = False
                reasons.append(f"expected {req['color']} {name}>={count}, found colours {', '.join(colors)}")
        if ok and req.get("position"):
            rel, target = req["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {rel}")
            else:
                for obj in found:
                    bad = next(
                        (t for t in groups[target] if rel not in relative_position(obj.box, t.box, margin)), None
                    )
                    if bad is not None:
                        ok = False
                        got = relative_position(obj.box, bad.box, margin)
                        reasons.append(f"expected {name} {rel} target, found {' and '.join(sorted(got)) or 'none'}")
                        break
        correct = correct and ok
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def summarize(rows: list[dict]) -> dict:
    """Per tag (in order of first appearance) the fraction of correct images, the overall score (mean over tags),
    and the fraction of prompts with a correct image. ``rows``: {"tag", "correct", "prompt"}."""
    if not rows:
        raise KoalaError("GenEval: no images scored")
    tags: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in rows:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["prompt"]] = prompts.get(r["prompt"], False) or bool(r["correct"])
    per_tag = {t: sum(v) / len(v) for t, v in tags.items()}
    return {
        "overall": sum(per_tag.values()) / len(per_tag),
        "tags": {t: {"score": per_tag[t], "correct": sum(v), "n": len(v)} for t, v in tags.items()},
        "n_images": len(rows),
        "n_prompts": len(prompts),
        "correct_images": sum(bool(r["correct"]) for r in rows) / len(rows),
        "correct_prompts": sum(prompts.values()) / len(prompts),
    }
