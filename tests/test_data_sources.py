"""Every source type yields the same batch interface; rank/worker splits are disjoint; stats count skips."""

import argparse
import json

import pandas as pd
import pytest
import torch

from koala.data import data_stats, make_dataloader
from koala.errors import KoalaError
from koala.testing.images import odd_images, write_folder

RES = 16


def _all(loader):
    batches = list(loader)
    return batches, [k for b in batches for k in b["keys"]], [c for b in batches for c in b["captions"]]


def _check_raw(b, bs):
    assert b["pixel_values"].shape[1:] == (3, RES, RES) and b["pixel_values"].dtype == torch.float32
    assert b["pixel_values"].min() >= -1 and b["pixel_values"].max() <= 1
    n = b["pixel_values"].shape[0]
    assert 1 <= n <= bs and len(b["captions"]) == n
    for k in ("original_size", "crop_top_left", "target_size"):
        assert b[k].shape == (n, 2) and b[k].dtype == torch.long
    assert (b["target_size"] == RES).all()


def test_folder_sidecar_with_odd_files(tmp_path):
    rows = write_folder(str(tmp_path), 7)
    for name, data in odd_images().items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).with_suffix(".txt").write_text(f"odd {name}")
    cfg = {"type": "folder", "path": str(tmp_path), "repeat": False, "shuffle": False}
    batches, keys, caps = _all(make_dataloader(cfg, batch_size=4, resolution=RES))
    for b in batches:
        _check_raw(b, 4)
    assert len(keys) == 7 + 6 and "truncated.jpg" not in keys and "not_an_image.jpg" not in keys
    assert caps[keys.index("00003.jpg")] == rows[3]["text"]
    sizes = {k: tuple(s) for b in batches for k, s in zip(b["keys"], b["original_size"].tolist())}
    assert sizes["00001.jpg"] == (64, 48) and sizes["exif_rot.jpg"] == (48, 40)
    st = data_stats(cfg, progress=False)
    assert st["images"] == 13 and st["skipped"] == {"truncated": 1, "not_an_image": 1}


def test_metadata_jsonl_syncap_and_filters(tmp_path):
    rows = write_folder(str(tmp_path), 6, sidecar=False)
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"file_name": r["file_name"], "text": r["text"], "llava": r["syncap"]}) + "\n")
    cfg = {"type": "folder", "path": str(tmp_path), "syncap_column": "llava", "repeat": False, "shuffle": False}
    _, keys, caps = _all(make_dataloader(cfg, batch_size=2, resolution=RES))
    assert caps[0] == f"{rows[0]['text']}, {rows[0]['syncap']}"  # synCap append (KOALA)
    # min_size 40 drops (36, 36); max_aspect 1.35 drops 40x56 (1.4), keeps 64x48 (1.33)
    st = data_stats({**cfg, "min_size": 40, "max_aspect": 1.35}, progress=False)
    assert st["images"] == 2 and st["skipped"] == {"too_small": 2, "bad_aspect": 2}
    assert st["avg_resolution"] == [64.0, 48.0]


def test_parquet_and_csv_sources(tmp_path):
    rows = write_folder(str(tmp_path / "img"), 5, sidecar=False)
    df = pd.DataFrame(
        {
            "path": ["img/" + r["file_name"] for r in rows],
            "caption": [r["text"] for r in rows],
            "syn": [r["syncap"] for r in rows],
        }
    )
    df.loc[2, "caption"] = None
    df.to_parquet(tmp_path / "data.parquet")
    df.to_csv(tmp_path / "data.csv", index=False)
    for kind in ("parquet", "csv"):
        cfg = {
            "type": kind,
            "path": str(tmp_path / f"data.{kind}"),
            "image_column": "path",
            "caption_column": "caption",
            "repeat": False,
            "shuffle": False,
        }
        batches, keys, caps = _all(make_dataloader(cfg, batch_size=3, resolution=RES))
        assert keys == ["img/00000.jpg", "img/00001.jpg", "img/00003.jpg", "img/00004.jpg"], (
            kind
        )  # no caption: skipped
        assert caps[0] == rows[0]["text"]
        _, _, caps = _all(
            make_dataloader({**cfg, "syncap": "replace", "syncap_column": "syn"}, batch_size=8, resolution=RES)
        )
        assert caps[2] == rows[2]["syncap"] and len(caps) == 5
    with pytest.raises(KoalaError, match="image_column"):
        make_dataloader(
            {"type": "parquet", "path": str(tmp_path / "data.parquet"), "image_column": "nope"},
            batch_size=1,
            resolution=RES,
        )


def test_laion_pop_recipe_appends_the_lmm_description(tmp_path):
    """The LAION-POP recipes' data section: alt text + ", " + CogVLM's description, else LLaVA's (Sec. 3.2)."""
    from koala.distill import load_config

    rows = write_folder(str(tmp_path / "img"), 4, sidecar=False)
    df = pd.DataFrame(
        {
            "url": ["img/" + r["file_name"] for r in rows],
            "alt_txt": ["alt 0", "alt 1", None, "alt 3"],
            "cogvlm_caption": ["cog 0", None, "cog 2", ""],
            "llava_caption": ["llava 0", "llava 1", "llava 2", None],
        }
    )
    df.to_parquet(tmp_path / "pop.parquet")
    data = load_config("koala-lightning-700m", []).data
    cfg = {
        **data,
        "type": "parquet",
        "path": str(tmp_path / "pop.parquet"),
        "image_column": "url",
        "repeat": False,
        "shuffle": False,
    }
    _, keys, caps = _all(make_dataloader(cfg, batch_size=4, resolution=RES))
    assert caps == ["alt 0, cog 0", "alt 1, llava 1", "cog 2", "alt 3"]
    st = data_stats(cfg, progress=False)
    assert st["images"] == 4 and st["caption_notes"] == {"syncap_missing": 1}  # row 3: neither description set


def test_hf_load_from_disk(tmp_path):
    import datasets

    rows = write_folder(str(tmp_path / "img"), 4, sidecar=False)
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "img" / r["file_name"]) for r in rows], "text": [r["text"] for r in rows]}
    ).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    cfg = {"path": str(tmp_path / "ds"), "repeat": False, "shuffle": False}  # type guessed: hf_disk
    batches, keys, caps = _all(make_dataloader(cfg, batch_size=4, resolution=RES))
    assert caps == [r["text"] for r in rows] and batches[0]["original_size"][1].tolist() == [64, 48]


def test_webdataset_roundtrip_split_and_repeat(tmp_path):
    import webdataset as wds

    rows = write_folder(str(tmp_path / "img"), 12, sidecar=False)
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as w:
            for r in rows[s * 4 : (s + 1) * 4]:
                sample = {"__key__": r["file_name"][:-4], "jpg": (tmp_path / "img" / r["file_name"]).read_bytes()}
                if s == 0:
                    sample["txt"] = r["text"]
                else:
                    sample["json"] = {"caption": r["text"], "syncap": r["syncap"]}
                w.write(sample)
    pattern = str(tmp_path / "shard-{000..002}.tar")
    cfg = {"type": "webdataset", "path": pattern, "caption_column": ["text", "caption"], "repeat": False}
    batches, keys, caps = _all(make_dataloader(cfg, batch_size=5, resolution=RES, seed=1))
    assert sorted(caps) == sorted(r["text"] for r in rows)
    for b in batches:
        _check_raw(b, 5)
    # two ranks x two workers: disjoint, complete
    seen = []
    for rank in range(2):
        _, k, _ = _all(
            make_dataloader(
                {**cfg, "shuffle": False}, batch_size=2, resolution=RES, rank=rank, world_size=2, num_workers=2
            )
        )
        seen.append(k)
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 12
    inf = iter(make_dataloader({**cfg, "repeat": True}, batch_size=5, resolution=RES))
    assert sum(len(next(inf)["keys"]) for _ in range(6)) == 30  # infinite: runs past one epoch (12 samples)


def test_indexed_rank_split_disjoint_and_buckets(tmp_path):
    write_folder(str(tmp_path), 10, sizes=((32, 64), (64, 32), (32, 32)))
    cfg = {"type": "folder", "path": str(tmp_path), "repeat": False, "buckets": [[16, 32], [32, 16], [16, 16]]}
    keys = [
        _all(make_dataloader(cfg, batch_size=2, resolution=RES, rank=r, world_size=3, seed=5))[1] for r in range(3)
    ]
    assert sum(map(len, keys)) == 10 and len(set().union(*map(set, keys))) == 10
    batches, _, _ = _all(make_dataloader(cfg, batch_size=2, resolution=RES))
    for b in batches:  # every batch is one bucket; target_size is the bucket
        h, w = b["target_size"][0].tolist()
        assert b["pixel_values"].shape[2:] == (h, w) and (b["target_size"] == b["target_size"][0]).all()
    assert {tuple(b["target_size"][0].tolist()) for b in batches} == {(16, 32), (32, 16), (16, 16)}


def test_bad_config_errors(tmp_path):
    with pytest.raises(KoalaError, match="unknown key"):
        make_dataloader({"path": str(tmp_path), "captoin_column": "x"}, batch_size=1, resolution=RES)
    with pytest.raises(KoalaError, match="no images"):
        make_dataloader({"type": "folder", "path": str(tmp_path)}, batch_size=1, resolution=RES)
    with pytest.raises(KoalaError, match="not found"):
        make_dataloader({"type": "webdataset", "path": str(tmp_path / "x-{0..1}.tar")}, batch_size=1, resolution=RES)


def test_cli_data_stats_json(tmp_path, capsys):
    from koala.cli import data as cli_data

    write_folder(str(tmp_path), 3, sizes=((40, 60),))
    (tmp_path / "broken.jpg").write_bytes(odd_images()["truncated.jpg"])
    (tmp_path / "broken.txt").write_text("x")
    p = argparse.ArgumentParser()
    cli_data.register(p.add_subparsers())
    args = p.parse_args(["data", "stats", str(tmp_path), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 3 and out["avg_resolution"] == [40.0, 60.0] and out["skipped"] == {"truncated": 1}
    args = p.parse_args(["data", "stats", str(tmp_path)])
    assert args.func(args) == 0
    assert "#Imgs" in capsys.readouterr().out


def test_optional_packages_are_named_by_their_extra(tmp_path, monkeypatch):
    """Parquet, webdataset and plots come with extras; a missing one is a KoalaError naming the extra to install.
    Image folders with metadata.jsonl / .csv need none of them (the demo and most users)."""
    import sys

    from koala.bench import plot

    pd.DataFrame({"file_name": ["a.png"], "text": ["x"]}).to_parquet(tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setitem(sys.modules, "webdataset.shardlists", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        KoalaError, match=r"reading parquet needs the pyarrow package: pip install 'koala-diffusion\[data\]'"
    ):
        make_dataloader({"type": "parquet", "path": str(tmp_path / "t.parquet")}, batch_size=1, resolution=16)
    (tmp_path / "s.tar").write_bytes(b"")
    with pytest.raises(KoalaError, match=r"koala-diffusion\[data\]"):
        make_dataloader({"type": "webdataset", "path": str(tmp_path / "s.tar")}, batch_size=1, resolution=16)
    with pytest.raises(KoalaError, match=r"koala-diffusion\[plots\]"):
        plot({"models": []}, str(tmp_path / "p.png"))
    folder = tmp_path / "f"
    write_folder(str(folder), 2, sidecar=False)
    (folder / "metadata.csv").write_text("file_name,text\n00000.jpg,a red circle\n00001.jpg,\n")
    batch = next(
        iter(make_dataloader({"type": "folder", "path": str(folder), "repeat": False}, batch_size=1, resolution=16))
    )
    assert batch["captions"] == ["a red circle"]  # the empty caption is skipped, as before
