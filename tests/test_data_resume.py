"""``make_dataloader(skip_batches=k)``: the stream from batch k of the unskipped one, without decoding (raw)
or reading (cache) the skipped samples; across epochs, workers, aspect buckets and sources."""

import itertools
import json
import os

import pytest
import torch

import koala.data.records as records
from koala.data import build_cache, make_dataloader
from koala.testing.images import random_caption, random_image, write_folder

RES = 16
BUCKETS = [[16, 16], [16, 32], [32, 16]]
FIELDS = ("pixel_values", "original_size", "crop_top_left", "target_size")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 tiny PNGs of four shapes (three buckets) + metadata.jsonl."""
    d = str(tmp_path_factory.mktemp("resume_src"))
    with open(os.path.join(d, "metadata.jsonl"), "w") as f:
        for i in range(12):
            h, w = ((40, 56), (64, 48), (36, 36), (32, 80))[i % 4]
            random_image(h, w, i).save(os.path.join(d, f"{i:03d}.png"))
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": random_caption(i, 4)}) + "\n")
    return d


def _take(cfg, n, **kw):
    return list(itertools.islice(iter(make_dataloader(cfg, batch_size=2, resolution=RES, seed=3, **kw)), n))


def _same(a, b, fields=FIELDS):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"]
        for f in fields:
            assert torch.equal(x[f], y[f]), f


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("buckets", [False, BUCKETS])
def test_skip_equals_unskipped_stream_across_epochs(folder, num_workers, buckets):
    cfg = {"type": "folder", "path": folder, "buckets": buckets}
    full = _take(cfg, 16, num_workers=num_workers)  # 6 batches per epoch: runs into the third epoch
    assert len({k for b in full for k in b["keys"]}) == 12
    for k in (1, 5, 7):
        _same(_take(cfg, 16 - k, num_workers=num_workers, skip_batches=k), full[k:])


def _counting(monkeypatch):
    calls = {"decode": 0, "header": 0}
    decode, header = records.decode_image, records._open

    def counted_decode(*a, **kw):
        calls["decode"] += 1
        return decode(*a, **kw)

    def counted_header(*a, **kw):
        calls["header"] += 1
        return header(*a, **kw)

    monkeypatch.setattr(records, "decode_image", counted_decode)
    monkeypatch.setattr(records, "_open", counted_header)
    return calls


def test_skipped_images_are_not_decoded(folder, monkeypatch):
    calls = _counting(monkeypatch)
    cfg = {"type": "folder", "path": folder}
    _take(cfg, 1, skip_batches=9)  # 18 samples skipped (1.5 epochs)
    assert calls == {"decode": 2, "header": 0}  # only the batch returned; no header read without buckets
    calls.update(decode=0)
    _take({**cfg, "buckets": BUCKETS}, 1, skip_batches=9)
    # buckets need the size: headers of skipped images are read, pixels decoded only for the returned batch
    # and for what waits in partial buckets (< one batch per bucket)
    assert 2 <= calls["decode"] <= 2 + 3 and calls["header"] >= 18


def test_skip_with_filters_and_missing_files(folder, tmp_path):
    meta = tmp_path / "metadata.jsonl"
    lines = open(os.path.join(folder, "metadata.jsonl")).read().splitlines()
    rows = [json.loads(x) for x in lines]
    for r in rows:
        r["file_name"] = os.path.join(folder, r["file_name"])
    rows[2]["text"] = ""  # no caption
    rows += [{"file_name": os.path.join(folder, "gone.png"), "text": "missing"}]
    meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = {"type": "folder", "path": str(tmp_path), "min_size": 40, "random_flip": False}
    full = _take(cfg, 10)
    _same(_take(cfg, 7, skip_batches=3), full[3:])
    _same(_take({**cfg, "min_size": 0}, 7, skip_batches=3), _take({**cfg, "min_size": 0}, 10)[3:])


def test_skip_repeat_false_first_pass_only(folder):
    cfg = {"type": "folder", "path": folder, "repeat": False, "buckets": BUCKETS}
    full = list(make_dataloader(cfg, batch_size=4, resolution=RES, seed=3))
    assert 3 < len(full)  # partial bucket batches are flushed at the end
    for k in (2, len(full) - 1):
        loader = make_dataloader(cfg, batch_size=4, resolution=RES, seed=3, skip_batches=k)
        _same(list(loader), full[k:])
        _same(list(loader), full)  # the next pass starts from the beginning


def test_skip_webdataset_without_decoding(tmp_path, monkeypatch):
    import webdataset as wds

    rows = write_folder(str(tmp_path / "img"), 12, sidecar=False)
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as w:
            for r in rows[s * 4 : (s + 1) * 4]:
                w.write(
                    {
                        "__key__": r["file_name"][:-4],
                        "jpg": (tmp_path / "img" / r["file_name"]).read_bytes(),
                        "txt": r["text"],
                    }
                )
    cfg = {"type": "webdataset", "path": str(tmp_path / "shard-{000..002}.tar"), "shuffle_buffer": 5}
    full = _take(cfg, 12)
    calls = _counting(monkeypatch)
    skipped = _take(cfg, 5, skip_batches=7)
    assert calls == {"decode": 10, "header": 0}
    _same(skipped, full[7:])
    _same(_take(cfg, 6, skip_batches=3, num_workers=2), _take(cfg, 9, num_workers=2)[3:])


def test_skip_cache_reads_no_skipped_tensors(folder, tmp_path, tiny_pipe_dir, monkeypatch):
    out = str(tmp_path / "cache")
    build_cache(
        {"type": "folder", "path": folder, "buckets": BUCKETS},
        tiny_pipe_dir,
        out,
        resolution=RES,
        batch_size=4,
        shard_size=3,
        latent="mean",
        dtype="fp32",
        progress=False,
    )
    cfg = {"type": "cache", "path": out}
    fields = ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids", "crop_top_left", "target_size")
    for nw in (0, 2):
        full = _take(cfg, 14, num_workers=nw)
        for k in (1, 7):
            _same(_take(cfg, 14 - k, num_workers=nw, skip_batches=k), full[k:], fields)
    import koala.data.cache as cache

    loads, load_file = [], cache.load_file
    monkeypatch.setattr(cache, "load_file", lambda p, *a, **kw: loads.append(p) or load_file(p, *a, **kw))
    _take(cfg, 9)
    assert len(loads) >= 5  # 4 shards per epoch: batch 9 is in the second epoch
    loads.clear()
    _take(cfg, 1, skip_batches=8)  # only the shard(s) of the returned batch (a bucket may span two)
    assert 1 <= len(loads) <= 2
