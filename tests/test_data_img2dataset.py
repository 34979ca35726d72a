"""img2dataset's webdataset layout: images resized on download, each sample's .json holding original_width /
original_height (and LAION-POP's llava_caption). SDXL's original_size micro-condition and the min_size filter use
the recorded original size; a sample without it falls back to the decoded image's size."""

import io
import json

import numpy as np
import pytest

from koala.data import data_stats, make_dataloader
from koala.data.config import normalize_data_cfg
from koala.data.images import SkipSample
from koala.data.records import SamplePreparer, original_size
from koala.data.sources import make_source

# (decoded h, w) after img2dataset's resize, (original h, w) in the .json (None: not recorded)
SAMPLES = [
    ((32, 48), (768, 1152)),
    ((48, 32), (1536, 1024)),
    ((32, 32), (40, 40)),  # small originally: below min_size 64 although ...
    ((32, 48), None),  # no original size recorded: the decoded size counts (below min_size 64)
    ((40, 40), (640, 640)),
    ((32, 64), (512, 1024)),
]


@pytest.fixture()
def shard(tmp_path):
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    path = str(tmp_path / "00000.tar")
    with wds.TarWriter(path) as w:
        for i, ((h, w_), orig) in enumerate(SAMPLES):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8)).save(buf, format="JPEG")
            meta = {"url": f"http://x/{i}.jpg", "key": f"{i:09d}", "status": "success", "error_message": None}
            meta |= {"width": w_, "height": h, "caption": f"alt text {i}", "llava_caption": f"a detailed photo {i}"}
            if orig:
                meta |= {"original_height": orig[0], "original_width": orig[1]}
            w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"alt text {i}", "json": meta})
    return path


def _cfg(path, **kw):
    return {"type": "webdataset", "path": path, "repeat": False, "shuffle": False, **kw}


def test_original_size_is_the_micro_condition(shard):
    batches = list(make_dataloader(_cfg(shard), batch_size=1, resolution=32))
    got = {b["keys"][0]: tuple(b["original_size"][0].tolist()) for b in batches}
    expected = {f"00000.tar/{i:09d}": orig or dec for i, (dec, orig) in enumerate(SAMPLES)}
    assert got == expected
    assert all(tuple(b["pixel_values"].shape[2:]) == (32, 32) for b in batches)  # the crop is of the decoded image


def test_min_size_filters_on_the_original_size(shard):
    cfg = _cfg(shard, min_size=64, caption_column="llava_caption")
    keys = [k for b in make_dataloader(cfg, batch_size=1, resolution=32) for k in b["keys"]]
    assert keys == [f"00000.tar/{i:09d}" for i in (0, 1, 4, 5)]  # every decoded image is under 64 px
    st = data_stats(cfg, progress=False)
    kept = [SAMPLES[i][1] for i in (0, 1, 4, 5)]
    assert st["images"] == 4 and st["skipped"] == {"too_small": 2}
    assert st["avg_resolution"] == [sum(h for h, _ in kept) / 4, sum(w for _, w in kept) / 4]
    assert st["avg_caption_words"] == 4.0  # "a detailed photo N": the LMM caption from the json
    # resume skipping (probe, no pixel decode) decides as load does
    prep = SamplePreparer(normalize_data_cfg(cfg))
    recs = list(make_source(normalize_data_cfg(cfg)).iter_shards([shard]))
    for rec, (dec, orig) in zip(recs, SAMPLES):
        small = min(orig or dec) < 64
        for decide in (prep.load, prep.probe):
            if small:
                with pytest.raises(SkipSample, match="min_size"):
                    decide(rec)
            else:
                decide(rec)


def test_original_size_needs_positive_integers():
    assert original_size({"original_height": 10, "original_width": 20}) == (10, 20)
    for bad in (
        {"original_height": 10},
        {"original_height": "10", "original_width": 20},
        {"original_height": 0, "original_width": 20},
        {"original_height": True, "original_width": 2},
        {"original_height": None, "original_width": None},
    ):
        assert original_size(bad) is None, json.dumps(bad)


def test_the_cache_stores_the_original_size(shard, tiny_pipe_dir, tmp_path):
    from koala.data import build_cache

    out = str(tmp_path / "cache")
    build_cache(_cfg(shard, min_size=64), tiny_pipe_dir, out, resolution=32, progress=False)
    batches = list(make_dataloader({"type": "cache", "path": out, "repeat": False}, batch_size=8, resolution=32))
    got = {k: tuple(o.tolist()) for b in batches for k, o in zip(b["keys"], b["original_size"])}
    assert got == {f"00000.tar/{i:09d}": SAMPLES[i][1] for i in (0, 1, 4, 5)}
