"""``make_dataloader``: one batch interface for raw sources and the latent/text cache.

Raw batch: ``pixel_values`` [B,3,H,W] in [-1,1], ``captions``, ``original_size`` [B,2] (h,w),
``crop_top_left`` [B,2] (top,left), ``target_size`` [B,2] (h,w), ``keys``.
Cached batch: ``latents`` [B,4,h,w] (scaled), ``prompt_embeds`` [B,77,D], ``pooled_prompt_embeds`` [B,P],
``add_time_ids`` [B,6], ``captions``, ``keys`` (and the size/crop fields).

Batches are formed inside the dataset (``DataLoader(batch_size=None)``) so aspect buckets stay homogeneous.
By default (``repeat: true``) the loader is **infinite**: the trainer counts steps; each pass over the data
reshuffles with ``seed + epoch``. With ``repeat: false`` each ``iter()`` is one epoch.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import KoalaError
from .buckets import parse_buckets
from .config import normalize_data_cfg
from .images import SkipCounter, SkipSample
from .records import SamplePreparer, iter_split
from .sources import make_source
from .transforms import SDXLTransform, sample_rng, to_tensor

log = logging.getLogger("koala.data")


def split_info(rank: int, world_size: int) -> tuple[int, int]:
    """(split, nsplits) for this rank and DataLoader worker."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return rank * nw + wid, world_size * nw


def collate_raw(samples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "target_size": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
    }


def prepare_sample(preparer: SamplePreparer, transform: SDXLTransform, rec: dict, seed: int, epoch: int) -> dict:
    img, caption = preparer.load(rec)
    c = transform(img, sample_rng(seed, epoch, rec["key"]))
    return {"pixel_values": to_tensor(c.image), "caption": caption, "original_size": c.original_size,
            "crop_top_left": c.crop_top_left, "target_size": c.target_size, "flipped": c.flipped, "key": rec["key"]}


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


class RawBatches(IterableDataset):
    def __init__(self, cfg: dict, batch_size: int, resolution: int, seed: int, rank: int, world_size: int):
        self.cfg, self.batch_size, self.seed, self.rank, self.world_size = cfg, batch_size, seed, rank, world_size
        self.source = make_source(cfg)
        self.preparer = SamplePreparer(cfg)
        self.transform = SDXLTransform(resolution, cfg["center_crop"], cfg["random_flip"],
                                       parse_buckets(cfg["buckets"], resolution))
        self.skips = SkipCounter()
        self.epoch = 0

    def __iter__(self):
        split, nsplits = split_info(self.rank, self.world_size)
        batcher = BucketBatcher(self.batch_size, collate_raw)
        epoch = 0
        while True:
            used = 0
            for rec in iter_split(self.source, split, nsplits, epoch, self.cfg["shuffle"], self.seed,
                                  self.cfg["shuffle_buffer"]):
                try:
                    s = prepare_sample(self.preparer, self.transform, rec, self.seed, epoch)
                except SkipSample as err:
                    self.skips[err.reason] += 1
                    continue
                used += 1
                batch = batcher.add(s, s["target_size"])
                if batch is not None:
                    yield batch
            self.skips.update(getattr(self.source, "skips", {}))
            log.info("data split %d/%d epoch %d: %d samples, %s", split, nsplits, epoch, used, self.skips.summary())
            if used == 0 and self.cfg["repeat"]:  # an infinite loop over nothing would hang the trainer
                raise KoalaError(f"{self.cfg['path']}: split {split} of {nsplits} produced no usable samples "
                                 f"({self.skips.summary()}); check filters, captions and shard count")
            epoch += 1
            self.epoch = epoch
            if not self.cfg["repeat"]:
                if not self.cfg["drop_last"]:
                    yield from batcher.flush()
                return


def make_dataloader(data_cfg: dict, *, batch_size: int, resolution: int, seed: int = 0, num_workers: int = 0,
                    rank: int = 0, world_size: int = 1, pipeline_dir: str | None = None) -> DataLoader:
    """A DataLoader of dict batches (see module doc); infinite unless ``data_cfg['repeat']`` is false.

    Each of the ``world_size`` ranks and each of its ``num_workers`` workers reads a disjoint part of the
    data. For ``type: cache``, ``pipeline_dir`` (if given) must match the VAE/text encoders that built it.
    """
    if batch_size < 1:
        raise KoalaError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise KoalaError(f"rank {rank} is outside world_size {world_size}")
    cfg = normalize_data_cfg(data_cfg)
    if cfg["type"] == "cache":
        from .cache import CachedBatches

        ds = CachedBatches(cfg, batch_size, resolution, seed, rank, world_size, pipeline_dir)
    else:
        ds = RawBatches(cfg, batch_size, resolution, seed, rank, world_size)
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=2 if num_workers > 0 else None)
