"""Precomputed training cache: VAE latents and the family's conditioning (text embeddings, added conditions).

Layout of a cache directory::

    cache_config.json      what made it: pipeline fingerprint, resolution, crops, latent mode, dtype, source
    shards/00000.safetensors  one per work unit (``shard_size`` source rows, or one webdataset tar shard)
    index.json             shard list with sample counts per size group, skip counts, ``complete``

Inside a shard, tensors are grouped by target size ``"{H}x{W}/<name>"`` (one group without buckets):
``latents`` [n,4,H/f,W/f] = ``latent_dist.sample()`` (or ``.mean``) x ``vae.config.scaling_factor``,
the family's conditioning (SDXL: ``prompt_embeds`` [n,77,D], ``pooled_prompt_embeds`` [n,P], ``add_time_ids`` [n,6]
(float32); SD-1.x: ``prompt_embeds``), listed in cache_config.json's ``tensors``, and
``original_size``, ``crop_top_left``, ``target_size`` (int64), ``flipped`` (uint8). The safetensors metadata
holds ``captions`` and ``keys`` (JSON, per group) and the shard's ``skipped`` counts.

Shards are written to a temporary name and renamed when complete, so an interrupted run resumes by skipping
finished shards; process ``rank`` of ``world_size`` writes units ``k`` with ``k % world_size == rank``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import KoalaError
from ..families import Family, Parts, family_of, get_family
from ..utils.devices import parse_dtype
from ..utils.files import atomic_write_json, check_output_folder
from ..utils.signals import StopRequest
from ..utils.writes import writing
from .batching import BucketBatcher, EpochBatches, collate_raw, prepare_sample
from .buckets import parse_buckets
from .config import normalize_data_cfg
from .images import SkipCounter, SkipSample
from .records import SamplePreparer
from .sources import make_source
from .transforms import SDXLTransform

log = logging.getLogger("koala.data")
FORMAT = "koala-cache/2"  # 2: family-aware (fingerprint.family, tensors)
_VOLATILE_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"}
BOOKKEEPING = ("original_size", "crop_top_left", "target_size", "flipped")
LATENTS = ("sample", "mean")  # what a cache stores of the VAE's latent distribution


def tensor_names(family: Family) -> tuple[str, ...]:
    """What a cache of ``family`` stores per sample: latents, the family's conditioning, size/crop bookkeeping."""
    return ("latents", *family.cond_keys, *BOOKKEEPING)


# ---------------------------------------------------------------- fingerprint
def _file_digest(path: str, h) -> None:
    name = os.path.basename(path)
    if name.endswith(".json"):
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                data = {k: v for k, v in data.items() if k not in _VOLATILE_KEYS}
            h.update(name.encode() + json.dumps(data, sort_keys=True).encode())
            return
        except ValueError:
            pass
    size = os.path.getsize(path)
    h.update(f"{name}:{size}".encode())
    with open(path, "rb") as f:  # quick content hash: 1 MiB from the middle and the end (weights differ there)
        for off in (size // 2, max(0, size - (1 << 20))):
            f.seek(off)
            h.update(f.read(1 << 20))


def pipeline_fingerprint(pipeline_dir: str) -> dict:
    """Per-component hash of the VAE, text encoders and tokenizers (configs + weight sizes and content samples)."""
    fam = family_of(pipeline_dir)
    out = {}
    for comp in fam.components:
        d = os.path.join(pipeline_dir, comp)
        if not os.path.isdir(d):
            raise KoalaError(
                f"{pipeline_dir}: no {comp}/ folder; give a {fam.label} pipeline directory (save_pretrained)"
            )
        h = hashlib.sha256()
        for f in sorted(os.listdir(d)):
            if os.path.isfile(os.path.join(d, f)):
                _file_digest(os.path.join(d, f), h)
        out[comp] = h.hexdigest()[:16]
    return {"family": fam.name, "components": out, "pipeline_dir": os.path.abspath(pipeline_dir)}


def read_cache_config(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, "cache_config.json")
    if not os.path.isfile(path):
        raise KoalaError(f"{cache_dir}: not a koala cache (no cache_config.json); build one with `koala cache`")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("format") == "koala-cache/1":  # made before families: SDXL, the same tensors as /2 records
        fam = get_family("sdxl")
        cfg = {
            **cfg,
            "format": FORMAT,
            "tensors": list(tensor_names(fam)),
            "fingerprint": {**cfg["fingerprint"], "family": fam.name},
        }
    if cfg.get("format") != FORMAT:
        raise KoalaError(f"{path}: format {cfg.get('format')!r}, expected {FORMAT!r}; rebuild the cache")
    return cfg


def check_cache_compatible(cache_dir: str, pipeline_dir: str) -> dict:
    """Raise KoalaError unless ``pipeline_dir``'s VAE/text encoders/tokenizers are the ones that built the cache."""
    cfg = read_cache_config(cache_dir)
    made, now = cfg["fingerprint"]["components"], pipeline_fingerprint(pipeline_dir)["components"]
    bad = sorted(c for c in set(made) | set(now) if made.get(c) != now.get(c))
    if bad:
        raise KoalaError(
            f"{cache_dir} was built with different {', '.join(bad)} than {pipeline_dir} "
            f"(cache made from {cfg['fingerprint']['pipeline_dir']}); rebuild it with "
            f"this pipeline ({pipeline_dir}) or train with the pipeline that made it"
        )
    return cfg


# ---------------------------------------------------------------- encoding
@torch.no_grad()
def encode_batch(batch: dict, parts: Parts, latent: str = "sample", generator: torch.Generator | None = None) -> dict:
    """Raw batch -> cached-batch tensors (what the cache stores; also the trainer's on-the-fly path):
    ``latents`` (scaled) and the family's conditioning (``parts.family.cond_keys``), all float32."""
    vae, fam = parts.vae, parts.family
    px = batch["pixel_values"].to(parts.device, next(vae.parameters()).dtype)
    dist = vae.encode(px).latent_dist
    lat = dist.sample(generator) if latent == "sample" else dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        lat = lat - shift
    out = {"latents": (lat * vae.config.scaling_factor).float()}
    out.update(
        {k: v.float() for k, v in fam.encode_prompts(batch["captions"], parts.tokenizers, parts.text_encoders).items()}
    )
    out.update({k: v.float() for k, v in fam.micro_conditions(batch).items()})
    return out


# ---------------------------------------------------------------- building
def _units(source, shard_size: int) -> list:
    if source.kind == "indexed":
        n = len(source)
        return [range(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    return [[s] for s in source.shards]


def _iter_unit(source, unit):
    return source.iter_indices(unit) if source.kind == "indexed" else source.iter_shards(unit)


def _shard_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, "shards", f"{k:05d}.safetensors")


_COMPARED = (
    "format",
    "fingerprint",
    "resolution",
    "buckets",
    "center_crop",
    "random_flip",
    "latent",
    "dtype",
    "seed",
    "shard_size",
    "num_units",
    "source",
)


# what of the data config the cache records (the source's identity and its filters)
_SOURCE_KEYS = (
    "type",
    "path",
    "caption_column",
    "syncap_column",
    "syncap",
    "image_column",
    "image_root",
    "split",
    "min_size",
    "max_aspect",
)


def _cache_meta(cfg, fingerprint, fam, resolution, buckets, latent, store, seed, shard_size, source, units) -> dict:
    """cache_config.json: what makes the cache (see module doc)."""
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "tensors": list(tensor_names(fam)),
        "resolution": resolution,
        "buckets": buckets,
        "center_crop": cfg["center_crop"],
        "random_flip": cfg["random_flip"],
        "latent": latent,
        "dtype": str(store).replace("torch.", ""),
        "seed": seed,
        "shard_size": shard_size if source.kind == "indexed" else None,
        "num_units": len(units),
        "source": {
            **{k: cfg[k] for k in _SOURCE_KEYS},
            **({"syncap_file": os.path.abspath(cfg["syncap_file"])} if cfg.get("syncap_file") else {}),
            **({k: cfg[k] for k in ("nsfw_model", "nsfw_label", "nsfw_threshold")} if cfg.get("nsfw_model") else {}),
        },
    }


def _units_to_do(out_dir: str, num_units: int, rank: int, world_size: int, limit_units: int | None) -> list[int]:
    """This rank's work units (``k % world_size == rank``) whose shard is not written yet, at most ``limit_units``."""
    mine = [k for k in range(num_units) if k % world_size == rank]
    todo = [k for k in mine if not os.path.isfile(_shard_path(out_dir, k))]
    if limit_units is not None:
        todo = todo[:limit_units]
    log.info("cache rank %d/%d: %d of %d shards to do", rank, world_size, len(todo), len(mine))
    return todo


def _write_or_check_config(out_dir: str, meta: dict) -> None:
    """Write cache_config.json, or (resuming) refuse unless the one there was made with the same settings."""
    cfg_path = os.path.join(out_dir, "cache_config.json")
    if not os.path.isfile(cfg_path):
        atomic_write_json(cfg_path, meta)
        return
    old = read_cache_config(out_dir)
    old_cmp = json.loads(json.dumps({k: old.get(k) for k in _COMPARED}))
    new_cmp = json.loads(json.dumps({k: meta.get(k) for k in _COMPARED}))
    old_cmp["fingerprint"] = old_cmp["fingerprint"]["components"]
    new_cmp["fingerprint"] = new_cmp["fingerprint"]["components"]
    diff = [k for k in _COMPARED if old_cmp[k] != new_cmp[k]]
    if diff:
        raise KoalaError(
            f"{out_dir} holds a cache made with other settings ({', '.join(diff)}); "
            "resume with the same settings, or choose another output folder"
        )


def build_cache(
    data_cfg: dict,
    pipeline_dir: str,
    out_dir: str,
    *,
    resolution: int,
    batch_size: int = 8,
    shard_size: int = 256,
    latent: str = "sample",
    dtype: str = "fp16",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cpu",
    vae_dtype: str = "fp32",
    limit_units: int | None = None,
    progress: bool = True,
) -> dict:
    """Encode ``data_cfg`` into ``out_dir`` (resumable, multi-process safe); returns the index (see module doc).

    Crops/flips are drawn per sample from ``seed`` exactly as ``make_dataloader(..., seed=seed)`` draws them
    in its first epoch, so the cache holds the crop the raw loader would have used.
    """
    from ..utils.console import progress_bar

    if latent not in LATENTS:
        raise KoalaError(f"latent must be 'sample' or 'mean', got {latent!r}")
    store = parse_dtype(dtype)
    cfg = normalize_data_cfg({**data_cfg, "shuffle": False, "repeat": False})
    if cfg["type"] == "cache":
        raise KoalaError("cannot build a cache from a cache; give the raw source")
    if cfg["control"]:
        raise KoalaError(
            f"data.control: {cfg['control']!r}: the cache stores latents and text conditioning only, not control "
            "images; remove data.control to build the cache, and train with control images from the raw source",
            option="data.control",
        )
    source = make_source(cfg)
    units = _units(source, shard_size)
    buckets = parse_buckets(cfg["buckets"], resolution)
    fingerprint = pipeline_fingerprint(pipeline_dir)
    fam = get_family(fingerprint["family"])
    meta = _cache_meta(cfg, fingerprint, fam, resolution, buckets, latent, store, seed, shard_size, source, units)
    fam.check_pipeline_dir(pipeline_dir)  # missing or corrupt components: refused before anything is written
    check_output_folder(out_dir, "the cache")
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    with writing("the cache settings", f"the cache folder {out_dir}"):
        _write_or_check_config(out_dir, meta)

    enc = fam.load_parts(pipeline_dir, "fp32", vae_dtype, device)
    preparer = SamplePreparer(cfg)
    transform = SDXLTransform(resolution, cfg["center_crop"], cfg["random_flip"], buckets)
    todo = _units_to_do(out_dir, len(units), rank, world_size, limit_units)
    total_skips = SkipCounter()
    bar = progress_bar(todo, desc=f"cache rank {rank}", unit="shard", disable=not progress)
    with StopRequest() as stop:
        for k in bar:
            skips = _build_shard(
                k, units[k], source, preparer, transform, enc, out_dir, batch_size, latent, store, seed
            )
            total_skips.update(skips)
            bar.set_postfix_str(total_skips.summary())
            if stop.requested:
                break
    bar.close()
    with writing("index.json", f"the cache folder {out_dir}", "the finished shards are kept"):
        index = write_index(out_dir)
    if stop.requested:
        index = {**index, "stopped_by": stop.requested}
    if progress:
        print(
            f"cache {out_dir}: {index['num_samples']} samples in {len(index['shards'])}/{index['num_units']} "
            f"shards ({'complete' if index['complete'] else 'incomplete'}); {SkipCounter(index['skipped']).summary()}"
        )
    return index


def _build_shard(k, unit, source, preparer, transform, enc, out_dir, batch_size, latent, store, seed) -> dict:
    skips = SkipCounter()
    if hasattr(source, "skips"):
        source.skips.clear()
    groups: dict[str, dict[str, list]] = {}
    gen = torch.Generator(device="cpu").manual_seed(seed * 100003 + k)

    names = tensor_names(enc.family)
    full_precision = set(names) - {"latents", *enc.family.text_cond_keys}  # small: time ids, bookkeeping

    def collate(samples):
        b = collate_raw(samples)
        b["flipped"] = torch.tensor([s["flipped"] for s in samples], dtype=torch.uint8)
        return b

    def encode(batch):
        out = encode_batch(batch, enc, latent, gen if latent == "sample" else None)
        g = groups.setdefault(
            "%dx%d" % tuple(batch["target_size"][0].tolist()), {n: [] for n in names + ("captions", "keys")}
        )
        for name, t in out.items():
            g[name].append(t.cpu() if name in full_precision else t.to(store).cpu())
        for name in BOOKKEEPING:
            g[name].append(batch[name])
        g["captions"] += batch["captions"]
        g["keys"] += batch["keys"]

    batcher = BucketBatcher(batch_size, collate)
    for rec in _iter_unit(source, unit):
        try:
            s = prepare_sample(preparer, transform, rec, seed, 0)
        except SkipSample as err:
            skips[err.reason] += 1
            continue
        b = batcher.add(s, s["target_size"])
        if b is not None:
            encode(b)
    for b in batcher.flush():
        encode(b)
    skips.update(getattr(source, "skips", {}))
    tensors = {f"{g}/{n}": torch.cat(v[n]).contiguous() for g, v in groups.items() for n in names}
    metadata = {
        "captions": json.dumps({g: v["captions"] for g, v in groups.items()}),
        "keys": json.dumps({g: v["keys"] for g, v in groups.items()}),
        "skipped": json.dumps(dict(skips)),
        "unit": str(k),
    }
    final = _shard_path(out_dir, k)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{os.getpid()}")
    kept = "the finished shards are kept and nothing half-written is left"
    try:
        with writing(f"cache shard {final}", f"the cache folder {out_dir}", kept, "run the same command again"):
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, final)  # atomic: a shard file exists only when complete
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dict(skips)


def write_index(out_dir: str) -> dict:
    """Scan finished shards (headers only) and (re)write index.json atomically; any rank may call it."""
    cfg = read_cache_config(out_dir)
    shards, total, skipped = [], 0, SkipCounter()
    for path in sorted(glob.glob(os.path.join(out_dir, "shards", "*.safetensors"))):
        with safe_open(path, "pt") as f:
            md = f.metadata() or {}
            counts = {g: len(v) for g, v in json.loads(md.get("keys", "{}")).items()}
        sk = json.loads(md.get("skipped", "{}"))
        skipped.update(sk)
        shards.append(
            {
                "file": os.path.relpath(path, out_dir),
                "num_samples": sum(counts.values()),
                "groups": counts,
                "skipped": sk,
            }
        )
        total += sum(counts.values())
    index = {
        "format": FORMAT,
        "num_units": cfg["num_units"],
        "complete": len(shards) == cfg["num_units"],
        "num_samples": total,
        "skipped": dict(skipped),
        "shards": shards,
    }
    atomic_write_json(os.path.join(out_dir, "index.json"), index)
    return index


# ---------------------------------------------------------------- reading
def read_index(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, "index.json")
    if not os.path.isfile(path):
        raise KoalaError(f"{cache_dir}: no index.json; finish building the cache (`koala cache` resumes)")
    with open(path) as f:
        return json.load(f)


class _ShardTensors:
    """A cache shard's tensors, read on first use (a skipped shard is never read) and released after its items."""

    def __init__(self, path: str):
        self.path, self.data = path, None

    def get(self) -> dict:
        if self.data is None:
            self.data = load_file(self.path)
        return self.data

    def release(self) -> None:
        self.data = None


class CachedBatches(EpochBatches):
    """Batches from cache shards; one shard in memory at a time (plus partial per-size batches).

    An item is ``(shard, group, index, caption, key)``; its stand-in the same with the shard's path."""

    def __init__(
        self,
        cfg: dict,
        batch_size: int,
        resolution: int,
        seed: int,
        rank: int,
        world_size: int,
        pipeline_dir: str | None = None,
        skip_batches: int = 0,
    ):
        self.dir = cfg["path"]
        self.meta = check_cache_compatible(self.dir, pipeline_dir) if pipeline_dir else read_cache_config(self.dir)
        self.tensors = tuple(self.meta["tensors"])
        if self.meta["resolution"] != resolution:
            raise KoalaError(
                f"{self.dir} was built at resolution {self.meta['resolution']}, the trainer asks for "
                f"{resolution}; rebuild the cache or change the resolution"
            )
        self.index = read_index(self.dir)
        if not self.index["complete"]:
            log.warning(
                "%s: cache is incomplete (%d of %d shards); training on what exists",
                self.dir,
                len(self.index["shards"]),
                self.index["num_units"],
            )
        self.shards = [s["file"] for s in self.index["shards"] if s["num_samples"]]
        if not self.shards:
            raise KoalaError(f"{self.dir}: the cache holds no samples")
        super().__init__(cfg, batch_size, seed, rank, world_size, skip_batches)  # a skip reads no tensors

    def epoch_items(self, split: int, nsplits: int, epoch: int):
        shards = list(self.shards)
        if self.cfg["shuffle"]:
            random.Random(f"{self.seed}:{epoch}:cache").shuffle(shards)
        by_shard = len(shards) >= nsplits
        rng = random.Random(f"{self.seed}:{epoch}:{split}")
        for j, name in enumerate(shards[split::nsplits] if by_shard else shards):
            shard = _ShardTensors(os.path.join(self.dir, name))
            with safe_open(shard.path, "pt") as f:
                md = f.metadata()
            caps, keys = json.loads(md["captions"]), json.loads(md["keys"])
            items = [(g, i) for g in caps for i in range(len(caps[g]))]
            if not by_shard:
                items = [it for n, it in enumerate(items) if (n + j) % nsplits == split]
            if self.cfg["shuffle"]:
                rng.shuffle(items)
            for g, i in items:
                yield shard, g, i, caps[g][i], keys[g][i]
            shard.release()

    def stand_in(self, item):
        shard, g, i, caption, key = item
        return (shard.path, g, i, caption, key), g

    def sample(self, item):
        shard, g, i, caption, key = item
        data = shard.get()
        s = {n: data[f"{g}/{n}"][i] for n in self.tensors}
        s["caption"], s["key"] = caption, key
        return s, g

    def load_stand_in(self, stand_in):
        path, g, i, caption, key = stand_in
        with safe_open(path, "pt") as f:
            s = {n: f.get_slice(f"{g}/{n}")[i] for n in self.tensors}
        s["caption"], s["key"] = caption, key
        return s

    def collate(self, samples):
        out = {n: torch.stack([s[n] for s in samples]) for n in self.tensors}
        out["captions"] = [s["caption"] for s in samples]
        out["keys"] = [s["key"] for s in samples]
        return out
