"""The in-memory ``data.type: synthetic`` source of ``koala distill`` (tests and the tiny smoke recipe).

``num_samples`` smooth random images with captions from ``captions``. Every real data type (folder, parquet,
csv, webdataset, hf_disk, cache) goes through :func:`koala.data.make_dataloader` (see
:func:`koala.distill.trainer.make_train_dataloader`).

Yields raw batches in the ``koala.data`` format (``pixel_values`` in [-1, 1], ``captions``, ``original_size``,
``crop_top_left``, ``target_size``), forever, reshuffled each epoch from ``seed``, each rank taking every
``world_size``-th sample. The order depends only on the seed, so resuming can skip ahead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import KoalaError

SYNTHETIC_KEYS = ("num_samples", "captions")  # data keys only the synthetic source reads
DEFAULT_CAPTIONS = ["a photo of a red circle", "a blue square", "a red square left of a blue circle", "a photo"]


class SyntheticBatches:
    def __init__(self, items: list[dict], batch_size: int, seed: int, rank: int, world_size: int):
        if len(items) < batch_size * world_size:
            raise KoalaError(f"data: {len(items)} samples cannot fill one batch of {batch_size} on {world_size} process(es)")
        self.items, self.batch_size = items, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __iter__(self):
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            order = torch.randperm(len(self.items), generator=g).tolist()[self.rank::self.world_size]
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield collate([self.items[j] for j in order[i:i + self.batch_size]])
            epoch += 1


def collate(samples: list[dict]) -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in ("pixel_values", "original_size", "crop_top_left", "target_size")}
    out["captions"] = [s["caption"] for s in samples]
    return out


def synthetic_items(cfg: dict, resolution: int, seed: int) -> list[dict]:
    n = int(cfg.get("num_samples", 8))
    captions = list(cfg.get("captions") or DEFAULT_CAPTIONS)
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        coarse = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
        img = F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)[0]
        items.append({"pixel_values": img, "caption": captions[i % len(captions)],
                      "original_size": torch.tensor([resolution, resolution]), "crop_top_left": torch.tensor([0, 0]),
                      "target_size": torch.tensor([resolution, resolution])})
    return items


def make_synthetic_dataloader(data_cfg: dict, *, batch_size: int, resolution: int, seed: int = 0, rank: int = 0,
                              world_size: int = 1) -> SyntheticBatches:
    if data_cfg.get("type", "synthetic") != "synthetic":
        raise KoalaError(f"data.type {data_cfg.get('type')!r} is not synthetic; real data goes to koala.data.make_dataloader")
    return SyntheticBatches(synthetic_items(data_cfg, resolution, seed), batch_size, seed, rank, world_size)
