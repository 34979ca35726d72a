"""Robust decoding, transforms with SDXL size/crop bookkeeping, captions and buckets."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from koala.data.buckets import make_buckets, nearest_bucket, parse_buckets
from koala.data.captions import CaptionBuilder, CaptionLengths
from koala.data.images import SkipSample, decode_image
from koala.data.transforms import SDXLTransform, resize_to_cover, sample_rng, sdxl_crop, to_tensor
from koala.errors import KoalaError
from koala.families.sdxl import time_ids
from koala.testing.images import odd_images, random_image


def test_odd_images_convert_or_skip():
    imgs = odd_images(h=40, w=48)
    with pytest.raises(SkipSample) as e:
        decode_image(imgs["truncated.jpg"])
    assert e.value.reason == "truncated"
    with pytest.raises(SkipSample) as e:
        decode_image(imgs["not_an_image.jpg"])
    assert e.value.reason == "not_an_image"
    with pytest.raises(SkipSample) as e:
        decode_image("/nonexistent/x.jpg")
    assert e.value.reason == "missing_file"
    for name in ("cmyk.jpg", "palette_alpha.png", "gray16.png", "gray.png", "animated.gif", "exif_rot.jpg"):
        img = decode_image(imgs[name])
        assert img.mode == "RGB", name
    assert decode_image(imgs["cmyk.jpg"]).size == (48, 40)
    assert decode_image(imgs["exif_rot.jpg"]).size == (40, 48)  # orientation 6: displayed rotated, w<->h
    pal = np.asarray(decode_image(imgs["palette_alpha.png"]))
    assert (pal[:20] == 255).all() and not (pal[20:] == 255).all()  # transparent half composited on white
    g16 = np.asarray(decode_image(imgs["gray16.png"]))
    assert g16[0, 0, 0] == 0 and g16[-1, -1, 0] == 255 and (g16[..., 0] == g16[..., 1]).all()  # rescaled, not clipped
    gif = np.asarray(decode_image(imgs["animated.gif"]))
    assert tuple(gif[5, 5]) == (255, 0, 0)  # first frame


def test_decode_check_runs_before_full_decode():
    imgs = odd_images()

    def too_small(h, w):
        raise SkipSample("too_small")

    with pytest.raises(SkipSample) as e:  # even a truncated file is rejected by size first (header only)
        decode_image(imgs["truncated.jpg"], check=too_small)
    assert e.value.reason == "too_small"


def test_crop_flip_bookkeeping_matches_pixels():
    img = random_image(60, 90, seed=3)  # h=60, w=90
    target = (32, 32)
    for seed in range(6):
        c = sdxl_crop(img, target, random.Random(seed), center_crop=False, random_flip=True)
        assert c.original_size == (60, 90) and c.target_size == target
        resized = resize_to_cover(img, target)
        assert resized.size == (48, 32)  # short side -> 32
        if c.flipped:
            resized = resized.transpose(Image.FLIP_LEFT_RIGHT)  # flip happens before the crop
        top, left = c.crop_top_left
        assert top == 0 and 0 <= left <= 16
        ref = np.asarray(resized)[top : top + 32, left : left + 32]
        assert np.array_equal(np.asarray(c.image), ref)
    flips = {sdxl_crop(img, target, random.Random(s), random_flip=True).flipped for s in range(20)}
    assert flips == {True, False}
    cc = sdxl_crop(img, target, random.Random(0), center_crop=True, random_flip=False)
    assert cc.crop_top_left == (0, 8) and not cc.flipped


def test_sample_rng_is_per_key_and_deterministic():
    t = SDXLTransform(32, center_crop=False, random_flip=True)
    img = random_image(50, 80, 1)
    a = t(img, sample_rng(0, 0, "k1"))
    b = t(img, sample_rng(0, 0, "k1"))
    assert a.crop_top_left == b.crop_top_left and a.flipped == b.flipped
    outs = {(t(img, sample_rng(0, e, "k1")).crop_top_left, t(img, sample_rng(0, e, "k1")).flipped) for e in range(12)}
    assert len(outs) > 1  # a new epoch draws new crops


def test_to_tensor_range_and_time_ids():
    img = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    x = to_tensor(img)
    assert x.shape == (3, 1, 1) and x[0, 0, 0] == -1 and x[1, 0, 0] == 1
    ids = time_ids(torch.tensor([[60, 90]]), torch.tensor([[0, 7]]), torch.tensor([[32, 32]]))
    assert ids.tolist() == [[60, 90, 0, 7, 32, 32]]


def test_buckets():
    b = make_buckets(1024)
    assert (1024, 1024) in b and all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 for h, w in b)
    assert nearest_bucket(1457, 1274, b) == (1088, 960)  # LAION-POP's average image (portrait)
    assert nearest_bucket(500, 1000, b) == (704, 1472)
    assert parse_buckets(False, 512) is None and parse_buckets([[16, 32]], 16) == [(16, 32)]
    t = SDXLTransform(512, buckets=make_buckets(512))
    c = t(random_image(300, 600, 0), random.Random(0))
    assert c.target_size == (320, 768) and c.image.size == (768, 320)


def test_captions_syncap_and_lengths():
    row = {"text": "Why Visit New York.?", "llava": "The image is a panoramic view"}
    assert CaptionBuilder(syncap_column="llava")(row) == "Why Visit New York.?, The image is a panoramic view"
    assert CaptionBuilder(syncap="replace", syncap_column="llava")(row) == "The image is a panoramic view"
    assert CaptionBuilder(syncap="original", syncap_column="llava")(row) == "Why Visit New York.?"
    assert CaptionBuilder(caption_column=["alt", "text"])(row) == "Why Visit New York.?"  # first non-empty
    b = CaptionBuilder(syncap_column="llava")
    assert b({"text": "only original"}) == "only original" and b.notes == {"syncap_missing": 1}
    with pytest.raises(SkipSample):
        CaptionBuilder()({"other": "x"})
    with pytest.raises(KoalaError):
        CaptionBuilder(syncap="append")
    lengths = CaptionLengths()
    lengths.add("a b c")
    lengths.add(" ".join(["w"] * 80))
    d = lengths.as_dict()
    assert d["avg_caption_words"] == 41.5 and d["captions_over_77_tokens"] == 1
