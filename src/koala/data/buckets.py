"""Aspect-ratio buckets around a target area (SDXL-style multi-aspect training).

Buckets have sides that are multiples of ``step`` (64 by default) and an area no larger than
``resolution**2``; an image goes to the bucket whose aspect ratio is closest in log space.
With buckets, ``target_size`` in the time ids is the bucket size.
"""

from __future__ import annotations

import math

from ..errors import KoalaError


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """All (h, w) with h, w multiples of ``step``, h*w <= resolution**2, max/min side <= max_aspect, each side
    maximal."""
    if resolution % step:
        raise KoalaError(f"buckets: resolution {resolution} must be a multiple of bucket_step {step}")
    area = resolution * resolution
    out = set()
    for h in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        w = (area // h) // step * step
        if w >= step and max(h, w) / min(h, w) <= max_aspect + 1e-9:
            out.add((h, w))
    best_h = {}
    for h, w in out:  # for each width keep only the tallest bucket (the others waste area)
        best_h[w] = max(best_h.get(w, 0), h)
    return sorted((h, w) for w, h in best_h.items())


def nearest_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    r = math.log(h / w)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def parse_buckets(spec, resolution: int) -> list[tuple[int, int]] | None:
    """``buckets`` option: false/None (square crops), true (auto), a dict {step, max_aspect}, or a list of [h, w]."""
    if not spec:
        return None
    if spec is True:
        return make_buckets(resolution)
    if isinstance(spec, dict):
        return make_buckets(resolution, int(spec.get("step", 64)), float(spec.get("max_aspect", 4.0)))
    try:
        return sorted((int(h), int(w)) for h, w in spec)
    except (TypeError, ValueError):
        raise KoalaError(
            f"buckets: expected true, {{step, max_aspect}} or a list of [h, w] pairs, got {spec!r}"
        ) from None
