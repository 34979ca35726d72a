"""Does a shapes model place related objects by the prompt, or by chance? (issue 34)

``koala eval shapes``' spatial accuracy counts a relation as failed when either object is missing, so it mixes two
things: drawing both objects, and putting them the stated way round. This script separates them, for each image
folder written by ``koala lab sample`` (or any folder ``koala eval shapes`` reads):

- ``found``: the fraction of stated relations whose two objects (found by colour) are both in the image;
- ``holds | found``: of those, the fraction where the relation holds between the centroids (the scorer's own
  rule, :func:`koala.lab.score.score_image`). Random placement gives 50 %: "A left of B" and "B left of A" are
  equally likely. The 95 % Wilson interval says whether a model is above chance;
- the same per relation (left of / right of / above / below).

    koala lab sample --num 200 --split val --out /tmp/packaged          # the packaged teacher
    koala lab sample --pipeline /work/teacher34/pipe --num 200 --split val --out /tmp/new
    python benchmarks/bench_relation_placement.py /tmp/packaged /tmp/new [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def relation_placement(folder: str) -> dict:
    from PIL import Image

    from koala.lab.score import (
        detect_objects,
        image_prompt_pairs,
        largest_by_colour,
        parse_prompt,
        relation_holds,
    )

    total, found, holds = 0, 0, 0
    per: dict[str, list[int]] = {}
    for path, prompt in image_prompt_pairs(folder):
        exp = parse_prompt(prompt)
        if not exp.relations:
            continue
        by_color = largest_by_colour(detect_objects(np.asarray(Image.open(path).convert("RGB"))))
        for r in exp.relations:
            a, b = exp.objects[r["a"]]["color"], exp.objects[r["b"]]["color"]
            total += 1
            row = per.setdefault(r["relation"], [0, 0])
            if a in by_color and b in by_color:
                ok = relation_holds(by_color[a], r["relation"], by_color[b])
                found, holds, row[0], row[1] = found + 1, holds + ok, row[0] + 1, row[1] + ok
    lo, hi = wilson(holds, found)
    return {
        "folder": folder,
        "relations": total,
        "found": found / max(total, 1),
        "holds_given_found": holds / max(found, 1),
        "holds_given_found_95ci": [lo, hi],
        "spatial": holds / max(total, 1),
        "per_relation": {k: {"found": v[0], "holds_given_found": v[1] / max(v[0], 1)} for k, v in sorted(per.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="image folders (koala lab sample --out)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = [relation_placement(f) for f in args.folders]
    print("| folder | relations | both found | holds given found (95 % CI) | spatial | per relation (n, holds) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["holds_given_found_95ci"]
        per = ", ".join(f"{k} {v['found']} {100 * v['holds_given_found']:.0f}" for k, v in r["per_relation"].items())
        print(
            f"| {r['folder']} | {r['relations']} | {100 * r['found']:.1f} | {100 * r['holds_given_found']:.1f} "
            f"({100 * lo:.1f}-{100 * hi:.1f}) | {100 * r['spatial']:.1f} | {per} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
