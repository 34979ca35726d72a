"""Data that changes under a running loader: a webdataset shard cut short while it is read, image files removed
mid-epoch. The samples are skipped and counted (each batch carries its ``skipped`` counts; a distill run logs them
as data/skipped and in its summary) and the stream goes on."""

import json
import os
from collections import Counter

import numpy as np
from PIL import Image

from koala.data import make_dataloader
from koala.testing.images import write_folder

RES = 16


def _take(it, n):
    keys, skipped = [], Counter()
    for _ in range(n):
        b = next(it)
        assert b["pixel_values"].shape[1:] == (3, RES, RES)  # every sample that comes out is whole
        keys += b["keys"]
        skipped.update(b["skipped"])
    return keys, skipped


def test_webdataset_shard_truncated_while_read_is_skipped_and_counted(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    for s in range(2):  # noisy 96x96 JPEGs: each shard far larger than the tar reader's buffer
        with wds.TarWriter(str(tmp_path / f"shard-{s}.tar")) as w:
            for i in range(8):
                img = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
                path = tmp_path / "img.jpg"
                img.save(path, quality=95)
                w.write({"__key__": f"{s}-{i}", "jpg": path.read_bytes(), "txt": f"sample {s} {i}"})
    shard0 = tmp_path / "shard-0.tar"
    cfg = {"type": "webdataset", "path": str(tmp_path / "shard-{0..1}.tar"), "shuffle": False}
    it = iter(make_dataloader(cfg, batch_size=2, resolution=RES))
    first, skipped = _take(it, 1)
    assert first == ["shard-0.tar/0-0", "shard-0.tar/0-1"] and not skipped
    with open(shard0, "r+b") as f:  # cut in the middle of the shard the loader is reading
        f.truncate(shard0.stat().st_size // 2)
    keys, skipped = _take(it, 10)  # past the first epoch: the stream goes on
    shard1 = [f"shard-1.tar/1-{i}" for i in range(8)]
    end1 = keys.index(shard1[-1]) + 1
    epoch1, epoch2 = first + keys[:end1], keys[end1:]
    # the cut shard gave only the samples before the cut, the next shard all of its samples
    cut = len(epoch1) - 8
    assert epoch1 == [f"shard-0.tar/0-{i}" for i in range(cut)] + shard1 and 2 <= cut < 8
    # the second epoch reads the cut shard again: the same whole samples, then the next shard
    assert len(epoch2) > cut and epoch2 == epoch1[: len(epoch2)]
    assert dict(skipped) == {"truncated_shard": 2}  # counted once per pass over the cut shard, by its reason
    os.remove(shard0)  # the shard is gone altogether: the next passes read the other one, counting it as missing
    keys, skipped = _take(it, 8)
    assert set(keys[-4:]) <= set(shard1) and skipped["missing_shard"] >= 1


def test_image_folder_files_removed_mid_epoch_are_skipped_and_counted(tmp_path):
    rows = write_folder(str(tmp_path), 8)  # images + .txt sidecars
    cfg = {"type": "folder", "path": str(tmp_path), "shuffle": False}
    it = iter(make_dataloader(cfg, batch_size=2, resolution=RES))
    first, skipped = _take(it, 1)
    assert first == ["00000.jpg", "00001.jpg"] and not skipped
    gone = [r["file_name"] for r in rows[3:7]]
    for name in gone:  # the image and its caption vanish mid-epoch
        os.remove(tmp_path / name)
        os.remove(tmp_path / name.replace(".jpg", ".txt"))
    keys, skipped = _take(it, 4)  # the rest of epoch 1 (1 batch), epoch 2 (2 batches), a batch of epoch 3
    left = ["00000.jpg", "00001.jpg", "00002.jpg", "00007.jpg"]
    assert keys == [*left[2:], *left, *left[:2]]
    assert dict(skipped) == {"missing_file": 2 * len(gone)}  # epochs 1 and 2; named as missing, not uncaptioned


def test_distill_counts_files_removed_mid_run(tiny_pipe_dir, tmp_path, monkeypatch, capsys):
    """A tiny `koala distill` on an image folder whose files are removed after step 1: it finishes, logs
    data/skipped in metrics.jsonl and names the count in its summary line."""
    from koala.cli import main
    from koala.distill import trainer

    rows = write_folder(str(tmp_path / "images"), 6)
    step = trainer.TrainingRun.train_step

    def train_step(run):
        step(run)
        if run.step == 1:
            for r in rows[2:5]:
                os.remove(tmp_path / "images" / r["file_name"])

    monkeypatch.setattr(trainer.TrainingRun, "train_step", train_step)
    argv = [
        "distill",
        "--config",
        "tiny",
        f"teacher.pipeline={tiny_pipe_dir}",
        f"train.output_dir={tmp_path / 'run'}",
        "data.type=folder",
        f"data.path={tmp_path / 'images'}",
        "data.shuffle=false",
        "train.max_steps=4",
        "train.batch_size=1",
        "train.grad_accum=1",
        "train.log_every=1",
        "train.progress=false",
        "train.log_with=none",
        "validation.every=0",
        "train.checkpoint_every=0",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    # files 0, 1 trained steps 1-2; then 2, 3, 4 are gone: step 3 takes file 5 after skipping 3 files
    assert [m["data/skipped"] for m in logged] == [0, 0, 3, 3]
    assert "data [rank 0]: skipping samples (missing_file) from step 3 on" in out
    assert "finished at step 4" in out and "data: skipped 3: missing_file=3" in out
