"""``koala data stats``: Table 4's columns (#images, average resolution, average caption length) plus skips."""

from __future__ import annotations

from .captions import CaptionLengths
from .config import normalize_data_cfg
from .images import SkipCounter, SkipSample
from .records import SamplePreparer, iter_split, original_size
from .sources import make_source


def data_stats(data_cfg: dict, tokenizer=None, limit: int | None = None, progress: bool = True) -> dict:
    """Decode every sample (as training would, with the same filters) and summarise; ``limit`` caps the records
    read. The average resolution is of the original sizes where a sample's fields record them (img2dataset's
    ``original_height`` / ``original_width``), else of the decoded images."""
    from ..utils.console import progress_bar

    cfg = normalize_data_cfg(data_cfg)
    if cfg["type"] == "cache":
        from .cache import read_cache_config, read_index

        idx, meta = read_index(cfg["path"]), read_cache_config(cfg["path"])
        return {
            "source": cfg["path"],
            "type": "cache",
            "images": idx["num_samples"],
            "complete": idx["complete"],
            "resolution": meta["resolution"],
            "skipped": idx["skipped"],
            "skipped_total": sum(idx["skipped"].values()),
        }
    source = make_source(cfg)
    preparer = SamplePreparer(cfg)
    lengths, skips = CaptionLengths(tokenizer), SkipCounter()
    sum_h = sum_w = n = 0
    total = len(source) if source.kind == "indexed" else None
    if limit is not None and total is not None:
        total = min(total, limit)
    bar = progress_bar(iter_split(source), total=total, desc="data stats", unit="img", disable=not progress)
    for i, rec in enumerate(bar):
        if limit is not None and i >= limit:
            break
        try:
            img, caption = preparer.load(rec)
        except SkipSample as err:
            skips[err.reason] += 1
            continue
        n += 1
        h, w = original_size(rec["row"]) or (img.height, img.width)  # img2dataset: the size before its resize
        sum_h += h
        sum_w += w
        lengths.add(caption)
    bar.close()
    skips.update(getattr(source, "skips", {}))
    out = {
        "source": str(cfg["path"]),
        "type": cfg["type"],
        "images": n,
        "avg_resolution": [round(sum_h / n, 1), round(sum_w / n, 1)] if n else [0, 0],
        **lengths.as_dict(),
        "skipped": dict(skips),
        "skipped_total": sum(skips.values()),
        "caption_notes": dict(preparer.captions.notes),
    }
    return out
