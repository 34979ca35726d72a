"""Batch formation shared by the raw loader and the cache: which split a worker reads, aspect-bucket batching,
cheap skipping of already-used batches on resume, and the epoch loop that ties them together
(:class:`EpochBatches`; see :mod:`koala.data.loader`)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .records import SamplePreparer
from .transforms import SDXLTransform, sample_rng, to_tensor


def worker_plan(rank: int, world_size: int, skip_batches: int = 0) -> tuple[int, int, int]:
    """(split, nsplits, batches this worker skips) when the rank's stream starts at batch ``skip_batches``.

    The DataLoader takes batch ``i`` from worker ``i % num_workers`` and always starts at worker 0, so after a
    skip worker ``w`` takes the role (split) of worker ``(w + skip_batches) % num_workers`` of the unskipped
    run, and skips the batches that role produced among the first ``skip_batches``.
    """
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    role = (wid + skip_batches) % nw
    return rank * nw + role, world_size * nw, max(0, (skip_batches - role + nw - 1) // nw)


class BatchSkipper:
    """Mirrors :class:`BucketBatcher` on cheap stand-ins (records, not samples) until ``n`` batches are
    complete; then :meth:`materialize` gives the stand-ins of the partial buckets, to load into the batcher."""

    def __init__(self, batch_size: int, n: int):
        self.batch_size, self.left, self.buffers = batch_size, n, {}

    @property
    def active(self) -> bool:
        return self.left > 0

    def add(self, item, group) -> bool:
        """Count ``item`` in ``group``; True when this completed the last skipped batch."""
        buf = self.buffers.setdefault(group, [])
        buf.append(item)
        if len(buf) == self.batch_size:
            self.buffers[group] = []
            self.left -= 1
            return self.left == 0
        return False

    def materialize(self, batcher: BucketBatcher, load) -> None:
        """Fill ``batcher``'s buckets (same groups, order, contents) with ``load(item)`` (None: dropped)."""
        batcher.buffers = {g: [s for s in map(load, items) if s is not None] for g, items in self.buffers.items()}
        self.buffers = {}

    def flush(self, batcher: BucketBatcher, load) -> None:
        """End of a ``repeat: false`` pass: each partial bucket is one (flushed) batch; skip what is left."""
        if not self.active:
            return
        for g, items in self.buffers.items():
            if items and self.left > 0:
                self.buffers[g], self.left = [], self.left - 1
        self.materialize(batcher, load)


def collate_raw(samples: list[dict]) -> dict:
    batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "target_size": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
    }
    if "control_image" in samples[0]:
        batch["control_image"] = torch.stack([s["control_image"] for s in samples])
    return batch


def prepare_sample(
    preparer: SamplePreparer, transform: SDXLTransform, rec: dict, seed: int, epoch: int, control: str | None = None
) -> dict:
    """One decoded, cropped sample; with ``control`` (``data.control``) also its ``control_image``
    (:mod:`koala.data.control`), cropped as the image."""
    img, caption = preparer.load(rec)
    c = transform(img, sample_rng(seed, epoch, rec["key"]))
    out = {
        "pixel_values": to_tensor(c.image),
        "caption": caption,
        "original_size": c.original_size,
        "crop_top_left": c.crop_top_left,
        "target_size": c.target_size,
        "flipped": c.flipped,
        "key": rec["key"],
    }
    if control:
        from .control import control_image

        out["control_image"] = control_image(control, rec["image"], c)
    return out


class BucketBatcher:
    """Groups samples by ``target_size``; a batch is emitted when its bucket holds ``batch_size`` samples."""

    def __init__(self, batch_size: int, collate):
        self.batch_size, self.collate, self.buffers = batch_size, collate, {}

    def add(self, sample: dict, group):
        buf = self.buffers.setdefault(group, [])
        buf.append(sample)
        if len(buf) == self.batch_size:
            self.buffers[group] = []
            return self.collate(buf)
        return None

    def flush(self):
        for group, buf in list(self.buffers.items()):
            if buf:
                yield self.collate(buf)
        self.buffers = {}


class EpochBatches(IterableDataset):
    """The epoch / skip / flush loop of the raw loader (:class:`~koala.data.loader.RawBatches`) and the cache
    reader (:class:`~koala.data.cache.CachedBatches`).

    Each epoch walks :meth:`epoch_items` (the subclass reshuffles them per epoch from ``seed``). While batches are
    being skipped (``skip_batches``, resume) an item only becomes a cheap stand-in (:meth:`stand_in`: nothing
    decoded or read) counted by a :class:`BatchSkipper`; the stand-ins of the partial buckets left after the last
    skipped batch are loaded (:meth:`load_stand_in`) into the :class:`BucketBatcher`, so the resumed stream goes
    on exactly as the unskipped one. With ``repeat: false`` one pass is all, and (unless ``drop_last``) the
    partial buckets are flushed as last batches.
    """

    def __init__(self, cfg: dict, batch_size: int, seed: int, rank: int, world_size: int, skip_batches: int = 0):
        self.cfg, self.batch_size, self.seed, self.rank, self.world_size = cfg, batch_size, seed, rank, world_size
        self.epoch = 0  # epochs completed by the last iter()
        self.skip_batches = int(skip_batches)  # applies to the first iter() (per worker) only

    # what a subclass provides
    def epoch_items(self, split: int, nsplits: int, epoch: int) -> Iterator[Any]:
        """The items of split ``split`` of ``nsplits`` for epoch ``epoch``, in order."""
        raise NotImplementedError

    def stand_in(self, item) -> tuple[Any, Any] | None:
        """``(cheap stand-in, group)`` of an item being skipped; None: the item is dropped."""
        raise NotImplementedError

    def sample(self, item) -> tuple[dict, Any] | None:
        """``(sample, group)``, the item loaded; None: the item is dropped."""
        raise NotImplementedError

    def load_stand_in(self, stand_in) -> dict | None:
        """The sample of a stand-in (the partial buckets after the skip); None: dropped."""
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def end_epoch(self, split: int, nsplits: int, epoch: int, used: int) -> None:
        """Called after each epoch's items with the number of items used (skipped or loaded, not dropped)."""

    # the loop
    def __iter__(self):
        skip_batches, self.skip_batches = self.skip_batches, 0
        split, nsplits, skip = worker_plan(self.rank, self.world_size, skip_batches)
        batcher = BucketBatcher(self.batch_size, self.collate)
        skipper = BatchSkipper(self.batch_size, skip)
        epoch = 0
        while True:
            used = 0
            for item in self.epoch_items(split, nsplits, epoch):
                if skipper.active:  # no decode, no tensor read: only what decides whether and where the item goes
                    got = self.stand_in(item)
                    if got is not None:
                        used += 1
                        if skipper.add(*got):
                            skipper.materialize(batcher, self.load_stand_in)
                    continue
                got = self.sample(item)
                if got is None:
                    continue
                used += 1
                batch = batcher.add(*got)
                if batch is not None:
                    yield batch
            self.end_epoch(split, nsplits, epoch, used)
            epoch += 1
            self.epoch = epoch
            if not self.cfg["repeat"]:
                if not self.cfg["drop_last"]:
                    skipper.flush(batcher, self.load_stand_in)
                    yield from batcher.flush()
                return
