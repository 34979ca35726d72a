"""Reliability: every command refuses bad input with one line naming the file or key (no traceback, nothing
written); distill and cache stop cleanly on SIGTERM / Ctrl-C and resume exactly; failed writes keep the last good
state."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from koala.cli import main
from koala.distill import load_config
from koala.errors import KoalaError


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_pipe_dir):
    """Copies of the tiny pipeline, each broken in one way."""
    root = tmp_path_factory.mktemp("broken")

    def copy(name):
        dst = root / name
        shutil.copytree(tiny_pipe_dir, dst)
        return dst

    unet = copy("truncated_unet")
    w = unet / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    te = copy("corrupt_text_encoder")
    w = next((te / "text_encoder").glob("*.safetensors"))
    w.write_bytes(b"\x00" * 64)
    js = copy("bad_config_json")
    (js / "unet" / "config.json").write_text("{not json")
    novae = copy("no_vae")
    shutil.rmtree(novae / "vae")
    (root / "a_file").write_text("x")
    (root / "bad.yaml").write_text("train: [\n")
    (root / "empty_images").mkdir()
    from koala.testing.images import random_image

    (root / "images").mkdir()
    random_image(40, 40, 0).save(root / "images" / "0.png")
    (root / "images" / "0.txt").write_text("a red circle")
    (root / "corrupt_images").mkdir()
    for i in range(3):
        (root / "corrupt_images" / f"{i}.png").write_bytes(b"\x89PNG not really")
        (root / "corrupt_images" / f"{i}.txt").write_text("a caption")
    (root / "lightning_unet.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    return root


# (case, argv with {B}=broken root / {P}=tiny pipeline / {O}=an output path, what the message must name)
CASES = [
    (
        "compress truncated U-Net",
        ["compress", "--teacher", "{B}/truncated_unet", "--student", "koala-700m", "--out", "{O}"],
        "truncated_unet/unet/diffusion_pytorch_model.safetensors",
    ),
    (
        "compress corrupt text encoder",
        ["compress", "--teacher", "{B}/corrupt_text_encoder", "--student", "koala-700m", "--out", "{O}"],
        "corrupt_text_encoder/text_encoder/",
    ),
    (
        "compress bad config",
        ["compress", "--teacher", "{B}/bad_config_json", "--student", "koala-700m", "--out", "{O}"],
        "bad_config_json/unet/config.json",
    ),
    (
        "compress missing vae",
        ["compress", "--teacher", "{B}/no_vae", "--student", "koala-700m", "--out", "{O}"],
        "no vae/",
    ),
    (
        "compress out is a file",
        ["compress", "--teacher", "{P}", "--student", "koala-700m", "--out", "{B}/a_file"],
        "a_file",
    ),
    (
        "compress corrupt single-file teacher U-Net",
        [
            "compress",
            "--teacher",
            "{P}",
            "--teacher-unet",
            "{B}/lightning_unet.safetensors",
            "--student",
            "koala-700m",
            "--out",
            "{O}",
        ],
        "lightning_unet.safetensors",
    ),
    (
        "compress out not writable",
        ["compress", "--teacher", "{P}", "--student", "koala-700m", "--out", "{B}/a_file/sub"],
        "a_file",
    ),
    (
        "compress wrong family preset",
        ["compress", "--teacher", "{P}", "--student", "bk-sdm-small", "--out", "{O}"],
        "bk-sdm-small",
    ),
    (
        "generate truncated U-Net",
        ["generate", "a cat", "--model", "{B}/truncated_unet", "--device", "cpu", "--steps", "1", "--out", "{O}"],
        "truncated_unet/unet/",
    ),
    (
        "generate corrupt text encoder",
        ["generate", "a cat", "--model", "{B}/corrupt_text_encoder", "--device", "cpu", "--out", "{O}"],
        "corrupt_text_encoder/text_encoder/",
    ),
    ("generate unknown device", ["generate", "a cat", "--model", "{P}", "--device", "tpu", "--out", "{O}"], "tpu"),
    ("generate cuda absent", ["generate", "a cat", "--model", "{P}", "--device", "cuda:3", "--out", "{O}"], "cuda:3"),
    (
        "generate out is a file",
        ["generate", "a cat", "--model", "{P}", "--device", "cpu", "--out", "{B}/a_file"],
        "a_file",
    ),
    (
        "distill corrupt text encoder",
        ["distill", "--config", "tiny", "teacher.pipeline={B}/corrupt_text_encoder", "train.output_dir={O}"],
        "corrupt_text_encoder/text_encoder/",
    ),
    ("distill recipe not YAML", ["distill", "--config", "{B}/bad.yaml", "teacher.pipeline={P}"], "bad.yaml"),
    (
        "distill unknown key",
        ["distill", "--config", "tiny", "teacher.pipeline={P}", "train.learning_rate=1"],
        "train.learning_rate",
    ),
    (
        "distill wrong type",
        ["distill", "--config", "tiny", "teacher.pipeline={P}", "train.max_steps=many"],
        "train.max_steps",
    ),
    (
        "distill missing data",
        [
            "distill",
            "--config",
            "tiny",
            "teacher.pipeline={P}",
            "data.type=folder",
            "data.path={B}/nope",
            "train.output_dir={O}",
        ],
        "nope",
    ),
    (
        "distill empty data",
        [
            "distill",
            "--config",
            "tiny",
            "teacher.pipeline={P}",
            "data.type=folder",
            "data.path={B}/empty_images",
            "train.output_dir={O}",
        ],
        "empty_images",
    ),
    (
        "distill nothing usable in the data",
        [
            "distill",
            "--config",
            "tiny",
            "teacher.pipeline={P}",
            "data.type=folder",
            "data.path={B}/corrupt_images",
            "train.output_dir={O}",
        ],
        "corrupt_images",
    ),
    (
        "cache corrupt encoder",
        ["cache", "{B}/images", "--type", "folder", "--pipeline", "{B}/corrupt_text_encoder", "--out", "{O}"],
        "corrupt_text_encoder/text_encoder/",
    ),
    ("bench unknown model", ["bench", "--models", "no-such-model", "--device", "cpu"], "no-such-model"),
    ("bench unknown device", ["bench", "--models", "tiny-koala-700m", "--device", "tpu"], "tpu"),
    ("bench train unknown device", ["bench", "train", "--teacher", "tiny-sdxl-base", "--device", "npu"], "npu"),
    ("plan unknown teacher", ["plan", "--teacher", "no-such-teacher"], "no-such-teacher"),
    ("data stats missing", ["data", "stats", "{B}/nope"], "nope"),
]


@pytest.mark.parametrize("case, argv, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(case, argv, names, broken, tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [a.replace("{B}", str(broken)).replace("{P}", tiny_pipe_dir).replace("{O}", str(out)) for a in argv]
    before = sorted(os.listdir(broken))
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, (case, rc, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("koala ")]
    assert len(errors) == 1 and " error: " in errors[0], err  # one line (progress bars may precede it)
    assert names in errors[0], err
    assert not out.exists()  # a refused command writes nothing
    assert sorted(os.listdir(broken)) == before


def test_error_boundary_in_a_real_process_and_debug_flag(broken):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    bad = str(broken / "truncated_unet")
    p = subprocess.run(
        [sys.executable, "-m", "koala.cli", "generate", "x", "--model", bad, "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "truncated or corrupt" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "koala.cli", "--debug", "generate", "x", "--model", bad, "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode != 0 and "Traceback" in p.stderr and "KoalaError" in p.stderr


def test_unexpected_errors_are_one_line_with_a_debug_hint(monkeypatch, capsys):
    import koala.cli.presets as presets

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(presets, "run", boom)  # main builds its parser per call, so it picks this up
    assert main(["presets"]) == 1
    err = capsys.readouterr().err
    assert "unexpected ZeroDivisionError" in err and "--debug" in err and "Traceback" not in err


def test_safetensors_header_check(tmp_path):
    from safetensors.torch import save_file

    from koala.utils.weights import check_safetensors

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(3, 3)}, str(good))
    check_safetensors(str(good))
    data = good.read_bytes()
    for name, blob in (("cut", data[:-4]), ("longer", data + b"xx"), ("tiny", data[:5]), ("garbage", b"\xff" * 64)):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(KoalaError, match=f"{name}.safetensors: not a valid safetensors file"):
            check_safetensors(str(p))


# --------------------------------------------------------------------------- preemption
def _weights(ckpt):
    return load_file(os.path.join(ckpt, "unet", "diffusion_pytorch_model.safetensors"))


COMMON = [
    "train.checkpoint_every=1000",
    "train.log_every=1",
    "data.num_samples=64",
    "validation.every=0",
    "train.log_with=none",
    "train.progress=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_is_exact(sig, tiny_pipe_dir, tmp_path):
    """A running `koala distill` gets SIGTERM (or one Ctrl-C): it finishes the step, writes a checkpoint, exits
    with status 3; `--resume latest` then ends bit-equal to an uninterrupted run of the same length."""
    from koala.distill.trainer import train

    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "koala.cli",
        "distill",
        "--config",
        "tiny",
        f"teacher.pipeline={tiny_pipe_dir}",
        f"train.output_dir={out}",
        "train.max_steps=100000",
        *COMMON,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 3, log[-2000:]
    assert "Continue exactly with --resume latest" in log
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert len(ckpts) == 1 and not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]
    k = int(ckpts[0].split("-")[1])
    assert k >= 2
    target = k + 2
    resumed = train(
        load_config(
            "tiny",
            [
                f"teacher.pipeline={tiny_pipe_dir}",
                f"train.output_dir={out}",
                "train.resume=latest",
                f"train.max_steps={target}",
                *COMMON,
            ],
        )
    )
    straight = train(
        load_config(
            "tiny",
            [
                f"teacher.pipeline={tiny_pipe_dir}",
                f"train.output_dir={tmp_path / 'ref'}",
                f"train.max_steps={target}",
                *COMMON,
            ],
        )
    )
    a, b = _weights(resumed["checkpoint"]), _weights(straight["checkpoint"])
    assert resumed["step"] == target and all(torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------- failed writes
def test_failed_checkpoint_write_keeps_the_last_good_one(tiny_pipe_dir, tmp_path, monkeypatch):
    from koala.distill import checkpoint as ck
    from koala.distill.trainer import train

    out = tmp_path / "run"
    cfg = load_config(
        "tiny",
        [
            f"teacher.pipeline={tiny_pipe_dir}",
            f"train.output_dir={out}",
            "train.max_steps=3",
            "train.checkpoint_every=1",
            "validation.every=0",
            "train.log_with=none",
            "train.progress=false",
        ],
    )
    real_save, calls = ck.save_tensor_file, []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the step-2 checkpoint's trainer state: the disk is full half-way through the write
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path)

    monkeypatch.setattr(ck, "save_tensor_file", full_disk)
    with pytest.raises(
        KoalaError,
        match=r"disk full: writing the step-2 checkpoint under .*checkpoints failed \(No space left on device\); "
        r"nothing partial was kept.*last good checkpoint is .*step-0000001",
    ):
        train(cfg)
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-0000001"]  # no step-2 folder, no temporary left behind
    monkeypatch.setattr(ck, "save_tensor_file", real_save)
    resumed = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="latest")))
    assert resumed["step"] == 3


def test_low_disk_space_is_refused_before_writing(tiny_pipe_dir, tmp_path, monkeypatch):
    from koala.distill import trainer

    cfg = load_config(
        "tiny",
        [
            f"teacher.pipeline={tiny_pipe_dir}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.checkpoint_every=1",
            "validation.every=0",
            "train.log_with=none",
            "train.progress=false",
        ],
    )
    monkeypatch.setattr(trainer, "_free_bytes", lambda path: 1000)
    with pytest.raises(
        KoalaError,
        match=r"not enough disk space for the step-1 checkpoint.*last good checkpoint is "
        r"none yet",
    ):
        trainer.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_failed_cache_shard_write_keeps_finished_shards(tiny_pipe_dir, tmp_path, monkeypatch):
    from koala.data import build_cache
    from koala.data import cache as cache_mod
    from koala.testing.images import random_caption, random_image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(6):
        random_image(40, 40, i).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(random_caption(i, 3))
    out = tmp_path / "cache"
    real, calls = cache_mod.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache_mod, "save_file", failing)
    kw = dict(resolution=32, batch_size=2, shard_size=2, latent="mean", progress=False)
    with pytest.raises(
        KoalaError,
        match=r"disk full: writing cache shard .*00001.safetensors under the cache folder .*cache failed.*run the "
        r"same command",
    ):
        build_cache({"type": "folder", "path": str(src)}, tiny_pipe_dir, str(out), **kw)
    assert sorted(os.listdir(out / "shards")) == ["00000.safetensors"]  # the partial file was removed
    load_file(str(out / "shards" / "00000.safetensors"))
    monkeypatch.setattr(cache_mod, "save_file", real)
    idx = build_cache({"type": "folder", "path": str(src)}, tiny_pipe_dir, str(out), **kw)
    assert idx["complete"] and idx["num_samples"] == 6


def test_cache_stops_after_the_current_shard_on_sigterm_and_resumes(tiny_pipe_dir, tmp_path, monkeypatch, capsys):
    from koala.data import cache as cache_mod
    from koala.testing.images import random_caption, random_image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(6):
        random_image(40, 40, i).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(random_caption(i, 3))
    real, calls = cache_mod._build_shard, []

    def shard_then_signal(*a, **kw):
        calls.append(a[0])
        out = real(*a, **kw)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; handled, not fatal
        return out

    monkeypatch.setattr(cache_mod, "_build_shard", shard_then_signal)
    out = tmp_path / "cache"
    argv = [
        "cache",
        str(src),
        "--type",
        "folder",
        "--pipeline",
        tiny_pipe_dir,
        "--out",
        str(out),
        "--resolution",
        "32",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 3
    assert "stopped by SIGTERM" in capsys.readouterr().out
    assert sorted(os.listdir(out / "shards")) == ["00000.safetensors"]
    monkeypatch.setattr(cache_mod, "_build_shard", real)
    assert main(argv) == 0
    assert json.loads((out / "index.json").read_text())["complete"]
