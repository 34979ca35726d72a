"""The ``data_cfg`` schema: defaults, validation, and a readable description for ``--help`` and docs."""

from __future__ import annotations

import math

from ..errors import KoalaError

TYPES = ("folder", "parquet", "csv", "webdataset", "hf_disk", "cache", "synthetic")

DEFAULTS = {
    "type": None,  # one of TYPES; guessed from path when None
    "path": None,  # folder / file / glob / brace pattern (list allowed for webdataset) / cache dir
    "caption_column": None,  # str or list (first non-empty wins); None: text, caption, prompt, TEXT, alt, txt,
    # alt_txt, alt_text
    "syncap_column": None,  # field(s) with the synthetic (LMM) caption, str or list (first non-empty wins);
    # LAION-POP: [cogvlm_caption, llava_caption]
    "syncap": None,  # append (default when syncap_column is set; KOALA's choice) | replace | original
    "syncap_file": None,  # captions written by `koala data syncap` (key -> caption), joined to the source by key
    "nsfw_model": None,  # local image classifier (App. E): images it flags are skipped, counted as "nsfw"
    "nsfw_label": "nsfw",  # the classifier's class to filter on
    "nsfw_threshold": 0.5,  # skip when that class's probability exceeds this
    "image_column": None,  # parquet/csv/hf_disk: image path (or datasets.Image) column; guessed if None
    "image_root": None,  # base folder for relative image paths (default: the table's folder)
    "split": "train",  # hf_disk: split of a DatasetDict
    "min_size": 0,  # skip images whose short side is smaller (e.g. 1024 for Lightning recipes)
    "max_aspect": None,  # skip images with long/short side above this (e.g. 2.0)
    "center_crop": False,  # False: random crop (SDXL default)
    "random_flip": True,  # horizontal flip with p=0.5, applied before the crop
    "buckets": False,  # False | True | {step: 64, max_aspect: 4.0} | [[h, w], ...]
    "shuffle": True,
    "repeat": True,  # True: infinite iterator (count steps); False: one pass per iter()
    "drop_last": False,  # repeat=False: drop the last partial batch(es)
    "shuffle_buffer": 64,  # webdataset / cache: samples mixed across the stream
    "num_samples": 8,  # synthetic: how many generated images (smooth random colour fields, no files)
    "captions": None,  # synthetic: captions cycled over the images (None: a few built-in ones)
    "control": None,  # control images in batches (control_image): canny | NAME (<image stem>.NAME.png files)
    "size": 64,  # synthetic: side of the generated images in pixels (then resized/cropped as usual)
}


INT_MAX = 2**63 - 1
FLAGS = ("center_crop", "random_flip", "shuffle", "repeat", "drop_last")  # true / false
COUNTS = {"min_size": 0, "shuffle_buffer": 0, "num_samples": 1, "size": 8}  # whole numbers, with their lowest value
NUMBERS = {"nsfw_threshold": (0, 1), "max_aspect": (1, None)}  # numbers (max_aspect may be null)
NAMES = ("type", "control", "syncap", "syncap_file", "nsfw_model", "nsfw_label", "image_column", "image_root", "split")
NAME_LISTS = ("path", "caption_column", "syncap_column", "captions")  # a string or a list of strings


def _bad(key: str, what: str, value) -> KoalaError:
    return KoalaError(f"data.{key} must be {what}, got {value!r}", option=f"data.{key}")


def check_data_types(cfg: dict) -> None:
    """Each known key of a data config holds its kind of value (a flag, a whole number in range, a finite number,
    a non-empty name or list of names), named ``data.KEY`` when not."""
    for key in FLAGS:
        if key in cfg and not isinstance(cfg[key], bool):
            raise _bad(key, "true or false", cfg[key])
    for key, lo in COUNTS.items():
        v = cfg.get(key, DEFAULTS[key])
        if v is None and key == "min_size":  # null: no minimum
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= INT_MAX:
            raise _bad(key, f"a whole number from {lo} to {INT_MAX}", v)
    for key, (lo, hi) in NUMBERS.items():
        v = cfg.get(key, DEFAULTS[key])
        if v is None and DEFAULTS[key] is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (hi and v > hi):
            raise _bad(key, f"a finite number {f'from {lo} to {hi}' if hi else f'>= {lo} (or null)'}", v)
    for key in (*NAMES, *NAME_LISTS):
        v = cfg.get(key)
        items = v if key in NAME_LISTS and isinstance(v, list) else [v]
        if v is not None and not all(isinstance(x, str) and (x.strip() or key == "captions") for x in items):
            kind = "a non-empty string" + (" or a list of them" if key in NAME_LISTS else "") + " (or null)"
            raise _bad(key, kind, v)
    buckets = cfg.get("buckets", False)
    if not isinstance(buckets, (bool, dict, list)):
        raise _bad("buckets", "true, false, {step, max_aspect} or a list of [h, w] pairs", buckets)


def normalize_data_cfg(cfg: dict) -> dict:
    if not isinstance(cfg, dict):
        raise KoalaError(f"data config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise KoalaError(
            f"data config: unknown key(s) {', '.join(f'data.{k}' for k in unknown)}; known keys: {', '.join(DEFAULTS)}"
        )
    check_data_types(cfg)
    out = {**DEFAULTS, **cfg}
    if not out["path"] and out["type"] != "synthetic":
        raise KoalaError("data config: data.path is required (or data.type: synthetic for generated images)")
    if out["type"] is None:
        from .sources import guess_type

        out["type"] = guess_type(out["path"])
    if out["type"] not in TYPES:
        raise KoalaError(f"data config: data.type {out['type']!r} is not one of {', '.join(TYPES)}")
    if out["syncap_file"] and not out["syncap_column"]:
        out["syncap_column"] = "syncap"  # where the joined caption goes in each sample's row
    out["min_size"] = int(out["min_size"] or 0)
    from .control import check_control

    check_control(out)
    return out
