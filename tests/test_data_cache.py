"""Cache: round trip equals on-the-fly encoding for the same crop; resume; disjoint ranks; fingerprint check."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from koala.data import build_cache, check_cache_compatible, encode_batch, make_dataloader
from koala.errors import KoalaError
from koala.families import family_of
from koala.testing.images import odd_images, write_folder

RES = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_src")
    write_folder(str(d), 9)
    (d / "broken.jpg").write_bytes(odd_images()["truncated.jpg"])
    (d / "broken.txt").write_text("broken")
    return str(d)


def _cfg(folder, **kw):
    return {"type": "folder", "path": folder, **kw}


def test_cache_roundtrip_equals_on_the_fly(folder, tmp_path, tiny_pipe_dir):
    out = str(tmp_path / "cache")
    idx = build_cache(
        _cfg(folder),
        tiny_pipe_dir,
        out,
        resolution=RES,
        batch_size=3,
        shard_size=4,
        latent="mean",
        dtype="fp32",
        seed=7,
        progress=False,
    )
    assert idx["complete"] and idx["num_samples"] == 9 and idx["skipped"] == {"truncated": 1}
    assert len(idx["shards"]) == 3  # 10 rows / shard_size 4
    cached = {}
    for b in make_dataloader(
        {"type": "cache", "path": out, "repeat": False}, batch_size=4, resolution=RES, pipeline_dir=tiny_pipe_dir
    ):
        assert b["latents"].shape[1:] == (4, RES // 2, RES // 2) and b["add_time_ids"].shape[1:] == (6,)
        for i, k in enumerate(b["keys"]):
            cached[k] = {n: b[n][i] for n in ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")}
            cached[k]["caption"] = b["captions"][i]
    assert len(cached) == 9
    # on the fly: raw loader with the same seed (epoch 0) draws the same random crop/flip per sample
    enc = family_of(tiny_pipe_dir).load_parts(tiny_pipe_dir)
    n = 0
    for raw in make_dataloader(_cfg(folder, repeat=False), batch_size=4, resolution=RES, seed=7):
        ref = encode_batch(raw, enc, latent="mean")
        for i, k in enumerate(raw["keys"]):
            assert cached[k]["caption"] == raw["captions"][i]
            for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids"):
                torch.testing.assert_close(cached[k][name], ref[name][i], rtol=1e-5, atol=1e-5)
            n += 1
    assert n == 9
    scale = enc.vae.config.scaling_factor  # latents are scaled
    raw = next(iter(make_dataloader(_cfg(folder, repeat=False, shuffle=False), batch_size=2, resolution=RES, seed=7)))
    unscaled = enc.vae.encode(raw["pixel_values"]).latent_dist.mean
    torch.testing.assert_close(encode_batch(raw, enc, "mean")["latents"], unscaled * scale)


def test_resume_fp16_and_two_ranks(folder, tmp_path, tiny_pipe_dir):
    out = str(tmp_path / "cache")
    kw = dict(resolution=RES, batch_size=4, shard_size=3, dtype="fp16", seed=1, progress=False)
    idx = build_cache(_cfg(folder), tiny_pipe_dir, out, rank=0, world_size=2, **kw)
    assert not idx["complete"] and [s["file"] for s in idx["shards"]] == [
        "shards/00000.safetensors",
        "shards/00002.safetensors",
    ]
    # simulate an interrupted rank 1: a leftover temp file and one shard done
    open(os.path.join(out, "shards", ".00001.safetensors.tmp-999"), "wb").write(b"partial")
    idx = build_cache(_cfg(folder), tiny_pipe_dir, out, rank=1, world_size=2, limit_units=1, **kw)
    assert not idx["complete"] and len(idx["shards"]) == 3
    mtimes = {
        f: os.path.getmtime(os.path.join(out, "shards", f))
        for f in os.listdir(os.path.join(out, "shards"))
        if not f.startswith(".")
    }
    idx = build_cache(_cfg(folder), tiny_pipe_dir, out, rank=1, world_size=2, **kw)  # resume: only 00003 left
    assert idx["complete"] and idx["num_samples"] == 9 and len(idx["shards"]) == 4
    for f, t in mtimes.items():
        assert os.path.getmtime(os.path.join(out, "shards", f)) == t, f"{f} was rewritten"
    with safe_open(os.path.join(out, "shards", "00000.safetensors"), "pt") as f:
        assert f.get_tensor(f"{RES}x{RES}/latents").dtype == torch.float16
        assert f.get_tensor(f"{RES}x{RES}/add_time_ids").dtype == torch.float32
    keys = [
        k
        for r in range(2)
        for b in make_dataloader(
            {"type": "cache", "path": out, "repeat": False}, batch_size=2, resolution=RES, rank=r, world_size=2
        )
        for k in b["keys"]
    ]
    assert len(keys) == 9 == len(set(keys))
    with pytest.raises(KoalaError, match="other settings"):
        build_cache(_cfg(folder), tiny_pipe_dir, out, **{**kw, "seed": 2})


def test_fingerprint_mismatch_and_resolution(folder, tmp_path, tiny_pipe_dir):
    from koala.testing.tiny import save_tiny_pipeline

    out = str(tmp_path / "cache")
    build_cache(
        _cfg(folder, buckets=[[16, 16], [16, 24]]), tiny_pipe_dir, out, resolution=RES, shard_size=100, progress=False
    )
    check_cache_compatible(out, tiny_pipe_dir)
    other = str(tmp_path / "other_pipe")
    shutil.copytree(tiny_pipe_dir, other)
    check_cache_compatible(out, other)  # same files elsewhere: compatible
    save_tiny_pipeline(str(tmp_path / "p2"), seed=5, words=["a", "red", "blue", "circle", "square", "photo", "of"])
    shutil.rmtree(os.path.join(other, "vae"))
    shutil.copytree(str(tmp_path / "p2" / "vae"), os.path.join(other, "vae"))  # same config, other weights
    with pytest.raises(KoalaError, match="vae"):
        check_cache_compatible(out, other)
    with pytest.raises(KoalaError, match="vae"):
        make_dataloader({"type": "cache", "path": out}, batch_size=2, resolution=RES, pipeline_dir=other)
    with pytest.raises(KoalaError, match="resolution"):
        make_dataloader({"type": "cache", "path": out}, batch_size=2, resolution=32)
    it = iter(make_dataloader({"type": "cache", "path": out}, batch_size=2, resolution=RES))  # infinite, bucketed
    shapes = set()
    for _ in range(12):
        b = next(it)
        assert (b["target_size"] == b["target_size"][0]).all()
        shapes.add(tuple(b["latents"].shape[2:]))
    assert shapes == {(8, 8), (8, 12)}
    cfg = json.load(open(os.path.join(out, "cache_config.json")))
    assert cfg["latent"] == "sample" and cfg["fingerprint"]["pipeline_dir"] == os.path.abspath(tiny_pipe_dir)


def test_cli_cache_from_webdataset(tmp_path, tiny_pipe_dir, capsys):
    import argparse

    import webdataset as wds

    from koala.cli import data as cli_data

    rows = write_folder(str(tmp_path / "img"), 5, sidecar=False)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"s{s}.tar")) as w:
            for r in rows[s * 3 : (s + 1) * 3]:
                w.write(
                    {
                        "__key__": r["file_name"][:-4],
                        "jpg": (tmp_path / "img" / r["file_name"]).read_bytes(),
                        "txt": r["text"],
                        "syncap.txt": r["syncap"],
                    }
                )
    p = argparse.ArgumentParser()
    cli_data.register(p.add_subparsers())
    out = str(tmp_path / "cache")
    args = p.parse_args(
        [
            "cache",
            str(tmp_path / "s{0..1}.tar"),
            "--pipeline",
            tiny_pipe_dir,
            "--out",
            out,
            "--resolution",
            str(RES),
            "--syncap-column",
            "syncap",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    idx = json.load(open(os.path.join(out, "index.json")))
    assert idx["complete"] and idx["num_samples"] == 5 and len(idx["shards"]) == 2  # one cache shard per tar
    caps = [
        c
        for b in make_dataloader({"type": "cache", "path": out, "repeat": False}, batch_size=8, resolution=RES)
        for c in b["captions"]
    ]
    assert sorted(caps) == sorted(f"{r['text']}, {r['syncap']}" for r in rows)
    capsys.readouterr()
    args = p.parse_args(["data", "stats", out, "--json"])
    assert args.func(args) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["type"] == "cache" and st["images"] == 5 and st["complete"]


def test_cache_made_before_families_reads_as_sdxl(folder, tmp_path, tiny_pipe_dir):
    """A koala-cache/1 (SDXL-only format: no family, no tensor list) still trains; its tensors are SDXL's."""
    out = str(tmp_path / "cache")
    build_cache(_cfg(folder), tiny_pipe_dir, out, resolution=RES, shard_size=100, progress=False)
    path = os.path.join(out, "cache_config.json")
    cfg = json.load(open(path))
    new = next(
        iter(
            make_dataloader(
                {"type": "cache", "path": out, "shuffle": False},
                batch_size=2,
                resolution=RES,
                pipeline_dir=tiny_pipe_dir,
            )
        )
    )
    old = {
        **cfg,
        "format": "koala-cache/1",
        "fingerprint": {k: v for k, v in cfg["fingerprint"].items() if k != "family"},
    }
    del old["tensors"]
    json.dump(old, open(path, "w"))
    again = next(
        iter(
            make_dataloader(
                {"type": "cache", "path": out, "shuffle": False},
                batch_size=2,
                resolution=RES,
                pipeline_dir=tiny_pipe_dir,
            )
        )
    )
    assert set(again) == set(new) and all(torch.equal(again[k], new[k]) for k in ("latents", "add_time_ids"))
    old["format"] = "koala-cache/0"
    json.dump(old, open(path, "w"))
    with pytest.raises(KoalaError, match="rebuild the cache"):
        make_dataloader({"type": "cache", "path": out}, batch_size=2, resolution=RES)
