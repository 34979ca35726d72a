"""``make_dataloader``: one batch interface for raw sources and the latent/text cache.

Raw batch: ``pixel_values`` [B,3,H,W] in [-1,1], ``captions``, ``original_size`` [B,2] (h,w),
``crop_top_left`` [B,2] (top,left), ``target_size`` [B,2] (h,w), ``keys``, with ``data.control`` also
``control_image`` [B,3,H,W] in [0,1] (:mod:`koala.data.control`), ``skipped`` ({reason: count} of the
samples skipped since the worker's previous batch: unreadable or vanished files, a shard cut short while it is read).
Cached batch: ``latents`` [B,4,h,w] (scaled), the family's conditioning (SDXL: ``prompt_embeds`` [B,77,D],
``pooled_prompt_embeds`` [B,P], ``add_time_ids`` [B,6]; SD-1.x: ``prompt_embeds``), ``captions``, ``keys``
(and the size/crop fields).

Batches are formed inside the dataset (``DataLoader(batch_size=None)``) so aspect buckets stay homogeneous.
By default (``repeat: true``) the loader is **infinite**: the trainer counts steps; each pass over the data
reshuffles with ``seed + epoch``. With ``repeat: false`` each ``iter()`` is one epoch.

``skip_batches=n`` (resuming a run) starts the stream at batch ``n`` of the unskipped one without decoding
the skipped images (raw sources: captions, file existence and, with buckets or size filters, image headers
are checked) or reading the skipped tensors (cache): epochs, shuffle order, crops and bucket contents stay
identical. With ``num_workers > 0`` the per-worker counts and the worker order follow the DataLoader's
round robin (exact for the infinite ``repeat: true`` stream). With ``repeat: false`` it applies to the first
``iter()`` only. Not exact when a skipped image has a readable header but corrupt pixel data (a truncated
file): the full decode would have dropped it, the skip counts it, so the resumed stream shifts by one sample.
"""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader

from ..errors import KoalaError
from .batching import EpochBatches, collate_raw, prepare_sample
from .buckets import parse_buckets
from .config import normalize_data_cfg
from .images import SkipCounter, SkipSample
from .records import SamplePreparer, iter_split
from .sources import make_source
from .transforms import SDXLTransform

log = logging.getLogger("koala.data")


class RawBatches(EpochBatches):
    """Batches decoded from a raw source (folder, table, webdataset, ...): an item is ``(record, epoch)``."""

    def __init__(
        self, cfg: dict, batch_size: int, resolution: int, seed: int, rank: int, world_size: int, skip_batches: int = 0
    ):
        super().__init__(cfg, batch_size, seed, rank, world_size, skip_batches)
        self.source = make_source(cfg)
        self.preparer = SamplePreparer(cfg)
        self.transform = SDXLTransform(
            resolution, cfg["center_crop"], cfg["random_flip"], parse_buckets(cfg["buckets"], resolution)
        )
        self.skips = SkipCounter()  # samples skipped while decoding (a shard's unreadable rest: source.skips)
        self.reported = SkipCounter()  # what the batches so far carried in their "skipped" field

    def all_skips(self) -> SkipCounter:
        return SkipCounter(self.skips + getattr(self.source, "skips", SkipCounter()))

    def epoch_items(self, split: int, nsplits: int, epoch: int):
        for rec in iter_split(
            self.source, split, nsplits, epoch, self.cfg["shuffle"], self.seed, self.cfg["shuffle_buffer"]
        ):
            yield rec, epoch

    def stand_in(self, item):
        """The record itself, grouped by the target size its image header gives (no pixels decoded)."""
        try:
            hw = self.preparer.probe(item[0], self.transform.buckets is not None)
        except SkipSample as err:
            self.skips[err.reason] += 1
            return None
        return item, self.transform.target_for(*(hw or (1, 1)))  # = the sample's target_size

    def sample(self, item):
        s = self.load_stand_in(item)
        return None if s is None else (s, s["target_size"])

    def load_stand_in(self, item):
        rec, epoch = item
        try:
            return prepare_sample(self.preparer, self.transform, rec, self.seed, epoch, self.cfg.get("control"))
        except SkipSample as err:  # also a stand-in whose header was fine but pixels not (see module doc)
            self.skips[err.reason] += 1
            return None

    def collate(self, samples: list[dict]) -> dict:
        """The batch, with ``skipped``: the samples (by reason) this worker skipped since its previous batch, so a
        consumer adds them up across workers (``num_workers > 0``: the counters live in the worker processes)."""
        batch, total = collate_raw(samples), self.all_skips()
        batch["skipped"], self.reported = dict(total - self.reported), total
        return batch

    def end_epoch(self, split: int, nsplits: int, epoch: int, used: int) -> None:
        skips = self.all_skips()
        log.info("data split %d/%d epoch %d: %d samples, %s", split, nsplits, epoch, used, skips.summary())
        if used == 0 and self.cfg["repeat"]:  # an infinite loop over nothing would hang the trainer
            raise KoalaError(
                f"{self.cfg['path']}: split {split} of {nsplits} produced no usable samples "
                f"({skips.summary()}); check filters, captions and shard count"
            )


def make_dataloader(
    data_cfg: dict,
    *,
    batch_size: int,
    resolution: int,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pipeline_dir: str | None = None,
    skip_batches: int = 0,
) -> DataLoader:
    """A DataLoader of dict batches (see module doc); infinite unless ``data_cfg['repeat']`` is false.

    Each of the ``world_size`` ranks and each of its ``num_workers`` workers reads a disjoint part of the
    data. For ``type: cache``, ``pipeline_dir`` (if given) must match the VAE/text encoders that built it.
    ``skip_batches``: start this rank's stream at that batch, cheaply (resume; see module doc).
    """
    if batch_size < 1:
        raise KoalaError(f"batch_size must be >= 1, got {batch_size}")
    if skip_batches < 0:
        raise KoalaError(f"skip_batches must be >= 0, got {skip_batches}")
    if not 0 <= rank < world_size:
        raise KoalaError(f"rank {rank} is outside world_size {world_size}")
    cfg = normalize_data_cfg(data_cfg)
    if cfg["type"] == "cache":
        from .cache import CachedBatches

        ds = CachedBatches(cfg, batch_size, resolution, seed, rank, world_size, pipeline_dir, skip_batches)
    else:
        ds = RawBatches(cfg, batch_size, resolution, seed, rank, world_size, skip_batches)
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
