"""Layout (control) images of shapes scenes: what ``koala lab train-controlnet``'s ControlNet is conditioned on.

A layout is each object's mask filled with its palette colour on a black background (``LAYOUT_BACKGROUND``),
at the image's size, written as ``<stem>.layout.png`` next to each shapes image by the shapes data set writer
(:func:`koala.lab.shapes.write_image_folder`, ``koala lab make-data``), so
``koala.data`` reads it with ``control: layout``.

Why filled masks and not edges: at 32 x 32 pixels an outline is one or two pixels wide, so a ControlNet gets a
few dozen informative pixels per object; a filled mask gives it every pixel of the object (position, extent,
shape and colour) aligned with the target, which its zero-initialised residuals pick up in the fewest steps.
The background is black, not the images' white, so a layout is a map of the scene and not a copy of the image
(it is what segmentation-map ControlNets see), and the colour is kept so that binding (which colour goes where)
is part of what the control asks for.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .shapes import LAYOUT_BACKGROUND, ShapeObject, render, shape_mask

LAYOUT_NAME = "layout"  # data.control name: <stem>.layout.png


def object_masks(objects: Sequence[ShapeObject], size: int) -> list[np.ndarray]:
    """Boolean ``[size, size]`` mask of each object, exactly as :func:`koala.lab.shapes.render` fills it."""
    return [shape_mask(o.shape, o.cx, o.cy, o.r, size) for o in objects]


def draw_layout(objects: Sequence[ShapeObject], size: int = 64) -> np.ndarray:
    """``uint8 [size, size, 3]`` layout: each object's mask in its colour on black (later objects on top, as in
    the rendered image); what :func:`koala.lab.shapes.write_image_folder` writes as ``<stem>.layout.png``."""
    return render(objects, size, LAYOUT_BACKGROUND)


def layout_path(image_path: str) -> str:
    """``<image stem>.layout.png`` next to the image."""
    return f"{os.path.splitext(image_path)[0]}.{LAYOUT_NAME}.png"
