"""A full disk at the moment of writing: the failed write is read by its errno (Python's OSError, safetensors'
``(os error N)``, torch's writer error with the OSError behind it) and every writer stops with exit 2, "disk
full", the folder and the last good state, leaving nothing half-written.

The errors are made for real: ``/dev/full`` answers every write with ENOSPC (any user), and the end-to-end tests
write onto a small tmpfs mounted for the test (conftest's ``small_disk``: root only, skipped otherwise; CI runs as
root)."""

import errno
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from koala.cli import main
from koala.errors import KoalaError
from koala.utils.files import append_lines, atomic_file
from koala.utils.weights import save_tensor_file
from koala.utils.writes import WriteFailed, write_failure, writing

TENSORS = {"a": torch.arange(4096, dtype=torch.float32)}


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the error itself is what is tested
        return err
    raise AssertionError("the write did not fail")


def test_classifier_reads_python_and_torch_errors_by_errno():
    # /dev/full answers every write with ENOSPC; only file objects are pointed at it (safetensors and torch.save
    # given a path write a temporary beside it and rename it over the target: those run on a tmpfs below)
    with open("/dev/full", "wb") as f:
        plain = _raised(lambda: f.write(b"x" * 65536) and f.flush())
    via_file = _raised(lambda: save_tensor_file(TENSORS, "/dev/full"))  # torch.save into a Python file object
    assert isinstance(plain, OSError) and plain.errno == errno.ENOSPC
    assert isinstance(via_file, (OSError, RuntimeError))  # torch's writer error, or the OSError itself
    full = ("disk full", os.strerror(errno.ENOSPC))
    assert write_failure(plain) == full
    assert write_failure(via_file) == full  # the OSError behind torch's RuntimeError
    # over a quota the system says EDQUOT: no quota can be filled here, so the error is made as the system makes it
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert write_failure(quota) == ("quota exceeded", os.strerror(errno.EDQUOT))


def test_classifier_reads_safetensors_and_torch_path_errors(small_disk):
    disk = small_disk(64 * 1024)
    big = {"a": torch.zeros(100_000)}
    st = _raised(lambda: save_file(big, os.path.join(disk, "x.safetensors")))
    to_path = _raised(lambda: torch.save(big, os.path.join(disk, "x.pt")))
    os.remove(os.path.join(disk, "x.pt"))
    assert type(st).__name__ == "SafetensorError" and "os error 28" in str(st)
    assert write_failure(st) == ("disk full", os.strerror(errno.ENOSPC))
    assert isinstance(to_path, RuntimeError) and write_failure(to_path)[0] == "write failed"  # torch tells no errno
    quota = type(st)(str(st).replace(os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)).replace("28", "122"))
    assert write_failure(quota) == ("quota exceeded", os.strerror(errno.EDQUOT))
    # an atomic file says it, and an outer writer says it again in its own terms
    target = os.path.join(disk, "model.safetensors")
    with pytest.raises(WriteFailed, match=r"disk full: writing .*model.safetensors under .* failed \(No space left"):
        with atomic_file(target, ".safetensors") as tmp:
            save_file(big, tmp)
    with pytest.raises(KoalaError, match=r"disk full: writing the weights under DIR failed.*; the old file is kept\."):
        with writing("the weights", "DIR", "the old file is kept"), atomic_file(target, ".safetensors") as tmp:
            save_file(big, tmp)
    assert os.listdir(disk) == []


def test_errors_that_are_not_failed_writes_pass(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    read_err = _raised(lambda: load_file(str(bad)))
    assert type(read_err).__name__ == "SafetensorError" and write_failure(read_err) is None
    truncated = tmp_path / "cut.pt"
    torch.save(TENSORS, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    torch_read = _raised(lambda: torch.load(truncated, weights_only=True))
    assert isinstance(torch_read, RuntimeError) and write_failure(torch_read) is None
    truncated.unlink()
    shape = _raised(lambda: torch.nn.Linear(2, 2).load_state_dict({"weight": torch.zeros(3, 3)}, strict=False))
    assert write_failure(shape) is None
    with pytest.raises(RuntimeError, match="size mismatch"), writing("x", str(tmp_path)):
        torch.nn.Linear(2, 2).load_state_dict({"weight": torch.zeros(3, 3)}, strict=False)
    # an atomic file's block that fails on a read (not a write) keeps its own error
    with pytest.raises(FileNotFoundError), atomic_file(str(tmp_path / "out.bin")):
        open(tmp_path / "missing.bin", "rb")
    assert os.listdir(tmp_path) == ["bad.safetensors"]


def test_a_failed_append_says_what_is_kept():
    # what the trainer does for metrics.jsonl: the last good checkpoint is looked up only when a write fails
    asked = []

    def kept():
        asked.append(1)
        return "training stopped; the last good checkpoint is RUN/checkpoints/step-0000003"

    with writing("metrics.jsonl", "RUN", kept, "resume with --resume latest"):
        pass
    assert not asked
    with pytest.raises(WriteFailed) as err:
        with writing("metrics.jsonl", "RUN", kept, "resume with --resume latest"):
            append_lines("/dev/full", ['{"step": 4}'])  # a character device: appended to, never replaced
    assert str(err.value) == (
        "disk full: writing metrics.jsonl under RUN failed (No space left on device); training stopped; the last "
        "good checkpoint is RUN/checkpoints/step-0000003. Free some space there (or write elsewhere) and resume "
        "with --resume latest"
    )


def test_append_lines_cuts_a_half_written_line_back(small_disk):
    disk = small_disk(8192)
    path = os.path.join(disk, "index.jsonl")
    append_lines(path, ['{"key": 1}'])
    with pytest.raises(OSError) as err:
        append_lines(path, ['{"key": 2, "pad": "' + "x" * 20000 + '"}'])
    assert err.value.errno == errno.ENOSPC
    with open(path) as f:
        assert f.read() == '{"key": 1}\n'  # no half line for the next append to run into


def _distill(out, *extra):
    return [
        "distill",
        "--config",
        "tiny",
        f"train.output_dir={out}",
        "train.max_steps=3",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=0",
        "validation.every=0",
        "train.log_with=none",
        "train.progress=false",
        "data.num_samples=4",
        *extra,
    ]


def test_distill_on_a_disk_that_fills(tiny_pipe_dir, small_disk, monkeypatch, capsys):
    from koala.distill import trainer

    estimates = []
    real_bytes = trainer.checkpoint_bytes
    monkeypatch.setattr(trainer, "checkpoint_bytes", lambda d: estimates.append(real_bytes(d)) or estimates[-1])
    disk = small_disk(22 * 2**20)  # one tiny checkpoint (about 14 MiB) and half of the next
    out = os.path.join(disk, "run")
    pipe = f"teacher.pipeline={tiny_pipe_dir}"
    # 1. the start-of-run warning (3 checkpoints kept, room for 1.5), then the check before the step-2 write
    assert main(_distill(out, pipe)) == 2
    captured = capsys.readouterr()
    assert "warning:" in captured.out + captured.err and "3 checkpoint(s)" in captured.out + captured.err
    first = os.path.join(out, "checkpoints", "step-0000001")
    assert "not enough disk space for the step-2 checkpoint" in captured.err and first in captured.err
    written = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(first) for f in fs)
    assert written <= estimates[0] <= 1.1 * written  # the EMA copy in trainer_state.pt is counted
    # 2. the disk fills during the write itself (the check passed: another writer took the room meanwhile)
    monkeypatch.setattr(trainer, "_free_bytes", lambda path: 2**40)
    assert main(_distill(out, pipe, "train.resume=latest")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err
    assert "disk full: writing the step-2 checkpoint under " + os.path.join(out, "checkpoints") in err
    assert f"the last good checkpoint is {first}" in err
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-0000001"]  # nothing half-written left
    # 3. room again: the run resumes from the last good checkpoint and finishes
    small_disk.resize(disk, 64 * 2**20)
    assert main(_distill(out, pipe, "train.resume=latest")) == 0
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-000000{i}" for i in (1, 2, 3)]


def test_cache_on_a_disk_that_fills(tiny_pipe_dir, small_disk, tmp_path, capsys):
    from koala.testing.images import random_caption, random_image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(6):
        random_image(40, 40, i).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(random_caption(i, 3))
    disk = small_disk(32 * 1024)  # the settings and one shard of about 15 KB (tmpfs counts 4 KiB pages)
    out = os.path.join(disk, "cache")
    args = ["--type", "folder", "--pipeline", tiny_pipe_dir, "--resolution", "32", "--batch-size", "2"]
    argv = ["cache", str(src), *args, "--shard-size", "2", "--latent", "mean", "--device", "cpu", "--out"]
    assert main([*argv, out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "corrupt" not in err
    assert f"disk full: writing cache shard {out}/shards/00001.safetensors under the cache folder {out}" in err
    assert "the finished shards are kept" in err
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["00000.safetensors"]
    small_disk.resize(disk, 1 << 20)
    assert main([*argv, out]) == 0
    assert main([*argv, str(tmp_path / "ref")]) == 0  # the same cache on a disk with room
    for name in ("00000", "00001", "00002"):
        a = load_file(os.path.join(out, "shards", f"{name}.safetensors"))
        b = load_file(str(tmp_path / "ref" / "shards" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compress_and_export_on_a_full_disk(tiny_pipe_dir, small_disk, capsys):
    disk = small_disk(256 * 1024)
    cases = [
        (["compress", "--teacher", tiny_pipe_dir, "--student", "koala-700m", "--out", f"{disk}/student"], "student"),
        (["export", tiny_pipe_dir, "--out", f"{disk}/model.safetensors"], "model.safetensors"),
        (["export", tiny_pipe_dir, "--format", "diffusers", "--out", f"{disk}/copy"], "copy"),
    ]
    for argv, name in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"disk full: writing {disk}/{name} under {disk} failed (No space left on device)" in err, err
        assert f"nothing half-written is left at {disk}/{name}" in err
        assert os.listdir(disk) == []
