"""Box geometry shared by the GenEval scorer (:mod:`koala.eval.geneval`) and the shapes world's GenEval tags
(:mod:`koala.lab.geneval_tags`): boxes are (x0, y0, x1, y1) in image pixels, y growing downwards."""

from __future__ import annotations

import numpy as np

POSITIONS = ("left of", "right of", "above", "below")


def box_iou(a, b) -> float:
    """IoU of two boxes with pixels counted inclusively (``x1 - x0 + 1``), as GenEval's evaluator counts them."""

    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def relative_position(a, b, margin: float = 0.1) -> set[str]:
    """Where box ``a`` is relative to box ``b`` by GenEval's rule: a subset of left of / right of / above / below.

    ``offset = centre_a - centre_b``; each axis is shrunk towards 0 by ``margin`` x (the two boxes' sizes on that
    axis, summed); no relation when both shrunk axes are under 1e-3; else the shrunk offset over the length of the
    full offset: x < -0.5 left of, x > 0.5 right of, y < -0.5 above, y > 0.5 below."""
    a, b = np.asarray(a[:4], dtype=float), np.asarray(b[:4], dtype=float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    size = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - margin * size, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {rel for rel, holds in zip(POSITIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if holds}
