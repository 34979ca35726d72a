"""Built-in fallback data sources for ``koala distill`` (tests, smoke runs, small folders).

``data.type: synthetic``: ``num_samples`` smooth random images with captions from ``captions`` (in memory).
``data.type: folder``: images under ``root`` with sidecar ``.txt`` captions (same stem); resized so the
short side is ``resolution``, then center-cropped (or randomly with ``random_crop: true``).

Both yield raw batches in the ``koala.data`` format (``pixel_values`` in [-1, 1], ``captions``,
``original_size``, ``crop_top_left``, ``target_size``), forever, reshuffled each epoch from ``seed``, each
rank taking every ``world_size``-th sample. The order depends only on the seed, so resuming can skip ahead.
"""

from __future__ import annotations

import os
import zlib

import torch
import torch.nn.functional as F

from ..errors import KoalaError

SIMPLE_TYPES = ("synthetic", "folder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_CAPTIONS = ["a photo of a red circle", "a blue square", "a red square left of a blue circle", "a photo"]


class SimpleBatches:
    def __init__(self, items: list, load, batch_size: int, seed: int, rank: int, world_size: int):
        if len(items) < batch_size * world_size:
            raise KoalaError(f"data: {len(items)} samples cannot fill one batch of {batch_size} on {world_size} process(es)")
        self.items, self.load, self.batch_size = items, load, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __iter__(self):
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            order = torch.randperm(len(self.items), generator=g).tolist()[self.rank::self.world_size]
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                samples = [self.load(self.items[j], epoch) for j in order[i:i + self.batch_size]]
                yield collate(samples)
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


def folder_items(root: str) -> list[tuple[str, str]]:
    if not root or not os.path.isdir(root):
        raise KoalaError(f"data.root {root!r} is not a directory (data.type: folder wants images + sidecar .txt captions)")
    items = []
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTS):
                path = os.path.join(dirpath, f)
                txt = os.path.splitext(path)[0] + ".txt"
                caption = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else ""
                items.append((path, caption))
    if not items:
        raise KoalaError(f"data.root {root}: no images ({', '.join(IMAGE_EXTS)}) found")
    return items


def load_folder_image(path: str, caption: str, resolution: int, random_crop: bool, g: torch.Generator) -> dict:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(h, w)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        if random_crop:
            top = int(torch.randint(0, nh - resolution + 1, (1,), generator=g))
            left = int(torch.randint(0, nw - resolution + 1, (1,), generator=g))
        else:
            top, left = (nh - resolution) // 2, (nw - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return {"pixel_values": arr / 127.5 - 1.0, "caption": caption, "original_size": torch.tensor([h, w]),
            "crop_top_left": torch.tensor([top, left]), "target_size": torch.tensor([resolution, resolution])}


def make_simple_dataloader(data_cfg: dict, *, batch_size: int, resolution: int, seed: int = 0, num_workers: int = 0,
                           rank: int = 0, world_size: int = 1, pipeline_dir: str | None = None) -> SimpleBatches:
    kind = data_cfg.get("type", "synthetic")
    if kind == "synthetic":
        items = synthetic_items(data_cfg, resolution, seed)
        return SimpleBatches(items, lambda it, _epoch: it, batch_size, seed, rank, world_size)
    if kind == "folder":
        items = folder_items(data_cfg.get("root"))
        random_crop = bool(data_cfg.get("random_crop", False))

        def load(item, epoch):
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{epoch}/{item[0]}".encode()))
            return load_folder_image(item[0], item[1], resolution, random_crop, g)

        return SimpleBatches(items, load, batch_size, seed, rank, world_size)
    raise KoalaError(f"data.type {kind!r} is not a built-in type ({', '.join(SIMPLE_TYPES)})")


def make_dataloader(data_cfg: dict, **kw):
    """Built-in types here; anything else goes to ``koala.data.make_dataloader`` (the full data pipeline)."""
    if data_cfg.get("type", "synthetic") in SIMPLE_TYPES:
        return make_simple_dataloader(data_cfg, **kw)
    try:
        from ..data import make_dataloader as full
    except ImportError as err:
        raise KoalaError(f"data.type {data_cfg.get('type')!r} needs koala.data.make_dataloader, which is not available "
                         f"({err}); use data.type: synthetic or folder") from err
    return full(data_cfg, **kw)
