"""GenEval's tags (:mod:`koala.eval.geneval`) in the shapes world, so a shapes table reads next to a GenEval one.

A shape plays a GenEval class, the palette colour found by the shapes scorer plays CLIP's colour, and the object's
area plays the detector's confidence (largest first, as GenEval takes its most confident detections). Per image,
each tag is 1 (correct), 0, or None where the prompt is not of that kind:

- ``single_object``: the prompt names one object; an object of its shape is found.
- ``two_object``: the prompt names two or more objects; every named shape is found as often as it is named.
- ``counting``: the prompt names two or more objects of one shape; exactly that many objects of that shape are
  found (GenEval's include count N and exclude N + 1).
- ``colors``: the prompt names one object; the largest object of its shape has its colour.
- ``color_attr``: the prompt names two or more objects; for each named shape, the largest N objects of that shape
  (N: how often it is named) carry the named colours.
- ``position``: the prompt states relations; each holds by GenEval's rule (:func:`koala.utils.boxes.
  relative_position`, margin 0.1) between the objects' boxes. Differs: GenEval finds the two objects by class;
  a shapes scene may hold two circles, so here each is found by colour and shape.

``overall`` is the mean over the tags that have images, as GenEval's overall score is the mean over its tags.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from ..utils.boxes import relative_position

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _by_shape(det: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in sorted(det, key=lambda o: -o["area"]):
        out.setdefault(o["shape"], []).append(o)
    return out


def geneval_tags(expected, det: list[dict], margin: float = 0.1) -> dict:
    """The GenEval tags of one image: ``expected`` a :class:`koala.lab.score.Expected`, ``det`` the shapes
    scorer's detections (with boxes)."""
    objs, found = expected.objects, _by_shape(det)
    want = Counter(o["shape"] for o in objs)
    out: dict = dict.fromkeys(TAGS)
    if len(objs) == 1:
        shape = objs[0]["shape"]
        out["single_object"] = float(shape in found)
        out["colors"] = float(shape in found and found[shape][0]["color"] == objs[0]["color"])
    if len(objs) >= 2:
        out["two_object"] = float(all(len(found.get(s, [])) >= k for s, k in want.items()))
        many = {s: k for s, k in want.items() if k >= 2}
        if many:
            out["counting"] = float(all(len(found.get(s, [])) == k for s, k in many.items()))
        ok = True
        for s, k in want.items():
            colors = Counter(o["color"] for o in found.get(s, [])[:k])
            ok = (
                ok and len(found.get(s, [])) >= k and not Counter(o["color"] for o in objs if o["shape"] == s) - colors
            )
        out["color_attr"] = float(ok)
    if expected.relations:
        out["position"] = float(all(_relation_holds(objs, r, det, margin) for r in expected.relations))
    return out


def _relation_holds(objs: list[dict], rel: dict, det: list[dict], margin: float) -> bool:
    def find(o):
        return next((d for d in det if d["color"] == o["color"] and d["shape"] == o["shape"]), None)

    a, b = find(objs[rel["a"]]), find(objs[rel["b"]])
    return a is not None and b is not None and rel["relation"] in relative_position(a["box"], b["box"], margin)


def aggregate_tags(rows: Iterable[dict]) -> dict:
    """Per tag the fraction of correct images among those it applies to (None when none), their counts, and
    ``overall``: the mean over the tags that have images."""
    rows = list(rows)
    out: dict = {}
    for t in TAGS:
        vals = [r[t] for r in rows if r.get(t) is not None]
        out[t] = float(np.mean(vals)) if vals else None
        out[f"n_{t}"] = len(vals)
    scored = [out[t] for t in TAGS if out[t] is not None]
    out["overall"] = float(np.mean(scored)) if scored else None
    return out
