"""From source records to usable samples: splitting across ranks/workers, filtering, captions, decoding."""

from __future__ import annotations

import os
import random
from typing import Iterator

import numpy as np

from .captions import CaptionBuilder
from .images import SkipSample, _open, _upright_size, decode_image, skip_on_decode_error


def iter_split(
    source,
    split: int = 0,
    nsplits: int = 1,
    epoch: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 64,
) -> Iterator[dict]:
    """Records of one split (``split`` of ``nsplits`` = rank * num_workers + worker) for one epoch.

    Indexed sources split by (shuffled) index; webdataset splits by shard, or by sample when there are
    fewer shards than splits (every split then reads all shards).
    """
    if source.kind == "indexed":
        n = len(source)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        yield from source.iter_indices(order[split::nsplits])
        return
    shards = list(source.shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}:shards").shuffle(shards)
    if len(shards) >= nsplits:
        stream = source.iter_shards(shards[split::nsplits])
    else:
        stream = (r for j, r in enumerate(source.iter_shards(shards)) if j % nsplits == split)
    if not shuffle or shuffle_buffer <= 1:
        yield from stream
        return
    rng, buf = random.Random(f"{seed}:{epoch}:{split}:buffer"), []
    for rec in stream:  # bounded shuffle buffer (encoded bytes, so keep it modest)
        buf.append(rec)
        if len(buf) >= shuffle_buffer:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def original_size(row: dict) -> tuple[int, int] | None:
    """(h, w) of the image before download-time resizing, from ``original_height`` / ``original_width`` in the
    sample's fields (img2dataset writes them into each sample's ``.json``); None when absent or not positive
    integers (the decoded image's size is then used)."""
    h, w = row.get("original_height"), row.get("original_width")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w))
    return (h, w) if ok else None


def _exists(src) -> None:
    """SkipSample("missing_file") for an image path (or ``{"path"}`` without bytes) that is not a file, as
    :func:`koala.data.images._open` decides."""
    if isinstance(src, dict) and not src.get("bytes"):
        src = src.get("path") or ""
    if isinstance(src, (str, os.PathLike)) and not os.path.isfile(src):
        raise SkipSample("missing_file", os.fspath(src))


class SamplePreparer:
    """``load(record) -> (rgb_image, caption)`` applying caption choice and size/aspect filters; raises SkipSample."""

    def __init__(self, cfg: dict):
        syncap_column = cfg.get("syncap_column") or ("syncap" if cfg.get("syncap_file") else None)
        self.captions = CaptionBuilder(cfg.get("caption_column"), cfg.get("syncap"), syncap_column)
        self.syncap = None
        if cfg.get("syncap_file"):  # synthetic captions from `koala data syncap`, joined by the sample's key
            from .captions import read_syncap_file

            column = syncap_column if isinstance(syncap_column, str) else list(syncap_column)[0]
            self.syncap = (column, read_syncap_file(cfg["syncap_file"]))
        self.nsfw = None
        if cfg.get("nsfw_model"):  # App. E: NSFW training images are filtered out (counted as skips)
            from ..safety import NSFWFilter

            self.nsfw = NSFWFilter(
                cfg["nsfw_model"], cfg.get("nsfw_label") or "nsfw", float(cfg.get("nsfw_threshold", 0.5))
            )
        self.min_size = int(cfg.get("min_size") or 0)
        self.max_aspect = float(cfg["max_aspect"]) if cfg.get("max_aspect") else None

    def check(self, h: int, w: int) -> None:
        if min(h, w) < self.min_size:
            raise SkipSample("too_small", f"{h}x{w} < min_size {self.min_size}")
        if self.max_aspect and max(h, w) / max(1, min(h, w)) > self.max_aspect:
            raise SkipSample("bad_aspect", f"{h}x{w} exceeds max_aspect {self.max_aspect}")

    def row(self, rec: dict) -> dict:
        if self.syncap is None:
            return rec["row"]
        column, captions = self.syncap
        key = str(rec.get("key"))
        return {**rec["row"], column: captions[key]} if key in captions else rec["row"]

    def load(self, rec: dict):
        """``(image, caption)``; the size filters see the sample's original size (:func:`original_size`) when its
        fields record one, else the decoded image's."""
        _exists(rec["image"])  # a file gone (the folder changed under the run) is missing, not uncaptioned
        caption = self.captions(self.row(rec))  # cheap check first: no caption -> no decode
        orig = original_size(rec["row"])
        if orig:
            self.check(*orig)
        img = decode_image(rec["image"], check=None if orig else self.check)
        if not orig:
            self.check(img.height, img.width)
        if self.nsfw is not None:
            flagged, score = self.nsfw.flags([img])[0]
            if flagged:
                raise SkipSample("nsfw", f"{self.nsfw.label} {score:.2f} > {self.nsfw.threshold}")
        return img, caption

    def probe(self, rec: dict, need_size: bool = False) -> tuple[int, int] | None:
        """What :meth:`load` decides, without decoding pixels (used to skip batches cheaply on resume).

        Checks the caption and that the image exists; reads the image *header* (upright size) only when
        ``need_size`` (aspect buckets) or a size/aspect filter is set, and applies the filters. Returns the
        upright (h, w) when read, else None; raises SkipSample like :meth:`load`. A file whose header is fine
        but whose pixel data is corrupt (e.g. truncated) passes here though :meth:`load` would skip it.
        """
        if self.nsfw is not None:  # the classifier needs the pixels: decide exactly as load() does
            img, _ = self.load(rec)
            return (img.height, img.width) if (need_size or self.min_size or self.max_aspect) else None
        src = rec["image"]
        _exists(src)
        self.captions(self.row(rec))
        if src is None:
            raise SkipSample("no_image")
        orig = original_size(rec["row"])
        if orig:
            self.check(*orig)
        if not (need_size or (not orig and (self.min_size or self.max_aspect))):
            return None
        img = None
        try:
            with skip_on_decode_error():
                img = _open(src)
                h, w = _upright_size(img)
        finally:
            if img is not None and img is not src:
                img.close()
        if not orig:
            self.check(h, w)
        return h, w
