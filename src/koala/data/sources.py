"""Data sources with one record interface: ``{"key": str, "image": path | bytes | {"bytes", "path"}, "row": dict}``.

Indexed sources (random access, split across ranks/workers by index): ``folder``, ``parquet``, ``csv``,
``hf_disk``. Sharded source (streamed, split across ranks/workers by tar shard): ``webdataset``.
``row`` holds the caption fields; the caption itself is chosen later by :class:`~koala.data.captions.CaptionBuilder`.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
from typing import Iterable, Iterator

from ..errors import KoalaError
from ..utils.extras import require
from .captions import DEFAULT_CAPTION_COLUMNS, _as_list
from .images import IMAGE_EXTS, SkipCounter

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
IMAGE_COLUMN_GUESSES = ("file_name", "image", "image_path", "path", "filepath", "filename")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
log = logging.getLogger("koala.data")


def _read_table(path: str, columns: list[str] | None = None) -> list[dict]:
    """Rows of a .jsonl, .csv (every value a string) or .parquet file, keeping only ``columns`` when given."""
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = [{k: v for k, v in r.items() if k is not None} for r in csv.DictReader(f, restval="")]
        else:
            pq = require("pyarrow.parquet", "data", "reading parquet")
            names = pq.read_schema(path).names
            rows = pq.read_table(path, columns=[c for c in names if columns is None or c in columns]).to_pylist()
    except (OSError, ValueError) as err:
        raise KoalaError(f"{path}: cannot read table ({err})") from err
    if columns is not None:
        rows = [{k: v for k, v in r.items() if k in columns} for r in rows]
    return rows


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


class IndexedSource:
    """Rows in memory (paths and captions only, never pixels); images are read on demand."""

    kind = "indexed"

    def __init__(self, rows: list[dict], image_column: str, root: str, name: str):
        self.rows, self.image_column, self.root, self.name = rows, image_column, root, name

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> dict:
        row = self.rows[i]
        rel = str(row.get(self.image_column) or "")
        return {"key": rel or f"{self.name}#{i}", "image": os.path.join(self.root, rel) if rel else None, "row": row}

    def iter_indices(self, indices: Iterable[int]) -> Iterator[dict]:
        for i in indices:
            yield self.get(int(i))


def _pick_image_column(columns, wanted: str | None, where: str) -> str:
    if wanted:
        if wanted not in columns:
            raise KoalaError(
                f"{where}: no column {wanted!r} (columns: {', '.join(map(str, columns))}); set image_column"
            )
        return wanted
    for c in IMAGE_COLUMN_GUESSES:
        if c in columns:
            return c
    raise KoalaError(
        f"{where}: cannot tell which column holds the image path (columns: {', '.join(map(str, columns))}); "
        "set image_column"
    )


def _wanted_columns(cfg: dict, image_column: str | None) -> list[str]:
    cols = _as_list(cfg.get("caption_column")) or list(DEFAULT_CAPTION_COLUMNS)
    cols += _as_list(cfg.get("syncap_column")) + list(IMAGE_COLUMN_GUESSES) + _as_list(image_column)
    return cols


def _is_control_file(name: str, control: str | None) -> bool:
    """``x.NAME.png``: the control image of ``x.*`` under ``data.control: NAME``, not an image to train on."""
    return bool(control) and control != "canny" and name.lower().endswith(f".{control.lower()}.png")


class FolderSource(IndexedSource):
    """An image folder: captions from ``metadata.jsonl``/``.csv``/``.parquet`` (``file_name`` column, HF
    imagefolder convention, at the folder root) or from sidecar files (``x.jpg`` + ``x.txt`` -> field ``text``,
    ``x.json`` -> its fields)."""

    def __init__(self, path: str, cfg: dict):
        if not os.path.isdir(path):
            raise KoalaError(f"{path}: not a directory (type: folder expects a folder of images)")
        meta = next((os.path.join(path, m) for m in METADATA_FILES if os.path.isfile(os.path.join(path, m))), None)
        self.sidecars = meta is None
        if meta:
            rows = _read_table(meta, None)
            if "file_name" not in _columns(rows):
                raise KoalaError(f"{meta}: needs a 'file_name' column with image paths relative to {path}")
        else:
            files = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                files += [
                    os.path.relpath(os.path.join(dirpath, f), path)
                    for f in sorted(filenames)
                    if f.lower().endswith(IMAGE_EXTS) and not _is_control_file(f, cfg.get("control"))
                ]
            rows = [{"file_name": f} for f in files]
        if not rows:
            raise KoalaError(f"{path}: no images found (extensions: {', '.join(IMAGE_EXTS)})")
        super().__init__(rows, "file_name", path, os.path.basename(path.rstrip("/")))

    def get(self, i: int) -> dict:
        rec = super().get(i)
        if self.sidecars:
            stem = os.path.splitext(rec["image"])[0]
            row = dict(rec["row"])
            if os.path.isfile(stem + ".json"):
                try:
                    with open(stem + ".json") as f:
                        row.update(json.load(f))
                except (OSError, ValueError):
                    pass  # a broken sidecar only loses its fields; the caption check counts the sample if needed
            if os.path.isfile(stem + ".txt"):
                try:
                    with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
                        row["text"] = f.read().strip()
                except OSError:
                    pass  # removed since the check (a folder changing under a run): the sample is counted below
            rec["row"] = row
        return rec


class TableSource(IndexedSource):
    """Parquet or CSV file(s) (a file, a folder of them or a glob) with an image-path column."""

    def __init__(self, path: str, cfg: dict, ext: str):
        files = sorted(glob.glob(os.path.join(path, f"*.{ext}"))) if os.path.isdir(path) else sorted(glob.glob(path))
        if not files:
            raise KoalaError(f"{path}: no .{ext} file found")
        rows = [r for f in files for r in _read_table(f, _wanted_columns(cfg, cfg.get("image_column")))]
        col = _pick_image_column(_columns(rows), cfg.get("image_column"), files[0])
        root = cfg.get("image_root") or os.path.dirname(os.path.abspath(files[0]))
        super().__init__(rows, col, root, os.path.basename(files[0]))


class HFDiskSource(IndexedSource):
    """A ``datasets`` dataset saved with ``save_to_disk``; the image column is an ``Image`` feature or a path."""

    def __init__(self, path: str, cfg: dict):
        datasets = require("datasets", "data", "type hf_disk (a datasets dataset saved with save_to_disk)")

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise KoalaError(f"{path}: not a dataset saved with save_to_disk ({err})") from err
        if isinstance(ds, datasets.DatasetDict):
            split = cfg.get("split", "train")
            if split not in ds:
                raise KoalaError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); set split")
            ds = ds[split]
        col = _pick_image_column(ds.column_names, cfg.get("image_column"), path)
        if isinstance(ds.features[col], datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))  # decode ourselves, robustly
        self.ds, self.image_column, self.name = ds, col, os.path.basename(path.rstrip("/"))
        self.root = cfg.get("image_root") or path

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, i: int) -> dict:
        row = self.ds[i]
        img = row.pop(self.image_column)
        key = f"{self.name}#{i}"
        if isinstance(img, str):
            img = os.path.join(self.root, img)
        return {"key": key, "image": img, "row": row}


class WebDatasetSource:
    """Tar shards (brace patterns like ``shards/{00000..00099}.tar``), streamed. Image from the first of
    jpg/jpeg/png/webp; fields from ``json``, ``txt`` (as ``text`` and ``txt``) and ``NAME.txt`` (as ``NAME``)."""

    kind = "sharded"

    def __init__(self, path, cfg: dict):
        expand_urls = require("webdataset.shardlists", "data", "type webdataset").expand_urls

        self.shards = []
        for p in _as_list(path):
            self.shards += expand_urls(p)
        missing = [s for s in self.shards if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]
        if not self.shards or missing:
            raise KoalaError(
                f"webdataset: shard(s) not found: {', '.join(missing[:3]) or path}{' ...' if len(missing) > 3 else ''}"
            )
        self.skips = SkipCounter()
        self._last_error = None

    def _handler(self, err: Exception) -> bool:
        """A shard that cannot be read on (cut short, even while it is being read; gone; damaged) loses its rest,
        counted by reason, and the stream goes on with the next shard."""
        reason, text = shard_error_reason(err), " ".join(str(a) for a in err.args)
        where = re.search(r"name='([^']*)'|(\S+\.tar\b)", text)
        seen = (reason, where and where.group(0))
        if seen != self._last_error:  # one cut shard: the member read and the tar stream both fail; count once
            self.skips[reason] += 1
            log.warning("webdataset: %s; skipping the rest of that shard", text[:300])
        self._last_error = seen
        return True

    def iter_shards(self, shards: Iterable[str]) -> Iterator[dict]:
        tarfile_samples = require("webdataset", "data", "type webdataset").tarfile_samples

        self._last_error = None
        for s in tarfile_samples(({"url": u} for u in shards), handler=self._handler):
            yield self.to_record(s)

    @staticmethod
    def to_record(s: dict) -> dict:
        row = {}
        if "json" in s:
            try:
                row.update(json.loads(s["json"]))
            except ValueError:
                pass
        for k, v in s.items():
            if k.endswith("txt"):
                text = v.decode("utf-8", errors="replace").strip() if isinstance(v, bytes) else str(v)
                name = k[:-4] if k.endswith(".txt") else k
                row[name] = text
                if k == "txt":
                    row.setdefault("text", text)
        image = next((s[k] for k in WDS_IMAGE_KEYS if k in s), None)
        return {"key": f"{os.path.basename(str(s.get('__url__', '')))}/{s.get('__key__')}", "image": image, "row": row}


def shard_error_reason(err: Exception) -> str:
    """The skip reason of a shard read error: missing_shard, truncated_shard or bad_shard_member."""
    if isinstance(err, FileNotFoundError):
        return "missing_shard"
    text = str(err).lower()
    if isinstance(err, EOFError) or "unexpected end" in text or "truncated" in text or "empty file" in text:
        return "truncated_shard"
    return "bad_shard_member"


def guess_type(path: str) -> str:
    p = str(path)
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "index.json")) and os.path.isfile(os.path.join(p, "cache_config.json")):
            return "cache"
        if os.path.isfile(os.path.join(p, "dataset_dict.json")) or os.path.isfile(os.path.join(p, "state.json")):
            return "hf_disk"
        return "folder"
    for ext, kind in ((".parquet", "parquet"), (".csv", "csv"), (".tar", "webdataset"), (".tar}", "webdataset")):
        if p.endswith(ext) or (ext == ".tar" and ".tar" in p and "{" in p):
            return kind
    raise KoalaError(
        f"{path}: cannot guess the source type; set type (folder, parquet, csv, webdataset, hf_disk, cache)"
    )


class SyntheticSource(IndexedSource):
    """``num_samples`` generated images (smooth random colour fields of ``size`` pixels, drawn from the sample's
    index) with captions cycled from ``captions``: an ordinary source for smoke runs and tests, no files."""

    CAPTIONS = ("a photo of a red circle", "a blue square", "a red square left of a blue circle", "a photo")

    def __init__(self, cfg: dict):
        n, self.size = int(cfg.get("num_samples") or 0), int(cfg.get("size") or 0)
        captions = list(cfg.get("captions") or self.CAPTIONS)
        if n < 1 or self.size < 8:
            raise KoalaError(f"synthetic data: num_samples must be >= 1 and size >= 8, got {n} and {self.size}")
        super().__init__([{"text": captions[i % len(captions)]} for i in range(n)], "image", "", "synthetic")

    def get(self, i: int) -> dict:
        import numpy as np
        from PIL import Image

        coarse = np.random.default_rng(i).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((self.size, self.size), Image.BILINEAR)
        return {"key": f"synthetic#{i}", "image": img, "row": self.rows[i]}


def make_source(cfg: dict):
    kind, path = cfg["type"], cfg["path"]
    if kind == "synthetic":
        return SyntheticSource(cfg)
    if kind == "folder":
        return FolderSource(path, cfg)
    if kind in ("parquet", "csv"):
        return TableSource(path, cfg, kind)
    if kind == "hf_disk":
        return HFDiskSource(path, cfg)
    if kind == "webdataset":
        return WebDatasetSource(path, cfg)
    raise KoalaError(f"type: {kind!r} is not a raw data source (folder, parquet, csv, webdataset, hf_disk, synthetic)")
