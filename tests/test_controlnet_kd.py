"""ControlNet KD in koala distill (issue 29, item 2): losses finite and falling, bit-exact resume, the trained
ControlNet loads and runs in the student's ControlNet pipeline, refusals name the key and write nothing."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from koala.errors import KoalaError
from koala.testing.controlnet import save_tiny_controlnet
from tiny_runs import tiny_run_config

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def teacher_cn(tiny_pipe_dir, tmp_path_factory):
    return save_tiny_controlnet(tiny_pipe_dir, str(tmp_path_factory.mktemp("cnkd") / "teacher_cn"))


def _cfg(pipe, teacher_cn, out, *extra):
    """tiny-controlnet on the synthetic source with Canny edges of each image as its control image."""
    return tiny_run_config(
        "tiny-controlnet", pipe, out, f"controlnet.teacher={teacher_cn}", "data.control=canny", *extra
    )


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_controlnet_kd_trains_the_controlnet_and_its_losses_fall(tiny_pipe_dir, teacher_cn, tmp_path):
    from koala.distill.trainer import train
    from koala.inference.controlnet import load_controlnet
    from koala.lab.shapes import write_shapes_dataset

    data = write_shapes_dataset(str(tmp_path / "shapes"), num_train=8, num_val=0, size=32, progress=False)
    assert os.path.isfile(os.path.join(data, "train", "000000.layout.png"))
    shapes = [f"data.path={data}/train", "data.type=folder", "data.control=layout"]
    out = tmp_path / "run"
    summary = train(_cfg(tiny_pipe_dir, teacher_cn, out, *shapes, "train.max_steps=8", "train.lr=1e-3"))
    rows = _metrics(out)
    kd = [r["loss/out"] + r["loss/feat"] + r["loss/cn_res"] for r in rows]
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    assert sum(kd[-3:]) < sum(kd[:3]), kd
    ckpt = summary["checkpoint"]
    assert summary["controlnet"] == os.path.join(ckpt, "controlnet")
    # only the ControlNet trained (controlnet.train_unet=false): the student U-Net is the initial one
    from koala.compress import compress

    init = compress(tiny_pipe_dir, "koala-700m", str(tmp_path / "student")).out_dir
    u0, u1 = load_file(os.path.join(init, "unet", WEIGHTS)), load_file(os.path.join(ckpt, "unet", WEIGHTS))
    assert all(torch.equal(u0[k], u1[k]) for k in u0)
    cn = load_controlnet(summary["controlnet"])
    assert type(cn).__name__ == "KoalaControlNetModel"
    assert os.path.isfile(os.path.join(ckpt, "controlnet", "README.md"))
    # it runs in the student's ControlNet pipeline, and the control image changes the output
    from koala.inference.pipeline import load_pipeline

    unet = os.path.join(ckpt, "unet")
    pipe = load_pipeline(unet=unet, base=tiny_pipe_dir, controlnet=summary["controlnet"], device="cpu").pipe
    imgs = [torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)]
    outs = [
        pipe("a red circle", image=im, num_inference_steps=2, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images[0]
        for im in imgs
    ]  # fmt: skip
    assert not torch.allclose(torch.from_numpy(outs[0]), torch.from_numpy(outs[1]))


def test_resume_is_bit_exact(tiny_pipe_dir, teacher_cn, tmp_path):
    """4 steps = 2 + resume 2, training the U-Net too: the student U-Net, the student ControlNet and the optimizer's
    moments are equal bit for bit."""
    from koala.distill.trainer import train

    common = ("controlnet.train_unet=true", "train.checkpoint_every=2", "train.lr=1e-3")
    full = train(_cfg(tiny_pipe_dir, teacher_cn, tmp_path / "a", "train.max_steps=4", *common))
    train(_cfg(tiny_pipe_dir, teacher_cn, tmp_path / "b", "train.max_steps=2", *common))
    resume = ("train.max_steps=4", "train.resume=latest")
    resumed = train(_cfg(tiny_pipe_dir, teacher_cn, tmp_path / "b", *resume, *common))
    assert full["step"] == resumed["step"] == 4
    for sub in ("unet", "controlnet"):
        wa = load_file(os.path.join(full["checkpoint"], sub, WEIGHTS))
        wb = load_file(os.path.join(resumed["checkpoint"], sub, WEIGHTS))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
    t0 = load_file(os.path.join(tmp_path / "b" / "checkpoints" / "step-0000002", "controlnet", WEIGHTS))
    assert any(not torch.equal(t0[k], wa[k]) for k in wa)  # the ControlNet kept training after the resume
    state = [torch.load(os.path.join(r["checkpoint"], "trainer_state.pt"), weights_only=True) for r in (full, resumed)]
    sa, sb = state
    moments = list(zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()))
    assert moments and all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in moments)


def test_no_control_images_refused_naming_the_key(tiny_pipe_dir, teacher_cn, tmp_path, capsys, monkeypatch):
    """koala distill with controlnet.teacher and no data.control: exit 2, data.control named, no traceback, nothing
    written; a loader whose batches carry no control image anyway is refused before anything is written too."""
    from koala.cli import main
    from koala.distill import trainer

    out = tmp_path / "run"
    args = ["distill", "--config", "tiny-controlnet", f"teacher.pipeline={tiny_pipe_dir}", f"train.output_dir={out}"]
    args += [f"controlnet.teacher={teacher_cn}", "train.max_steps=1", "train.progress=false", "data.num_samples=4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.control" in err and "Traceback" not in err
    make = trainer.make_dataloader
    strip = lambda batches: ({k: v for k, v in b.items() if k != "control_image"} for b in batches)  # noqa: E731
    monkeypatch.setattr(trainer, "make_dataloader", lambda *a, **kw: strip(make(*a, **kw)))
    with pytest.raises(KoalaError, match=r"data\.control"):
        trainer.train(_cfg(tiny_pipe_dir, teacher_cn, out, "train.max_steps=1"))
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("controlnet.residual_kd=-1", "controlnet.residual_kd"),
        ("train.teacher_worker=true", "train.teacher_worker"),
        ("fewstep.method=lcm", "fewstep.method"),
        ("train.ema.enabled=true", "train.ema.enabled"),
    ],
)
def test_bad_config_refused_with_the_key(tiny_pipe_dir, teacher_cn, tmp_path, override, key):
    with pytest.raises(KoalaError, match=key.replace(".", r"\.")):
        _cfg(tiny_pipe_dir, teacher_cn, tmp_path / "run", override)
    assert not (tmp_path / "run").exists()


def test_controlnet_of_another_model_refused(tiny_pipe_dir, tiny_sd_pipe_dir, teacher_cn, tmp_path):
    """A teacher ControlNet of another family, and a student ControlNet whose encoder is not the student's, are
    refused naming the folder, before anything is written."""
    from koala.distill.trainer import train

    sd_cn = save_tiny_controlnet(tiny_sd_pipe_dir, str(tmp_path / "sd_cn"))
    out = tmp_path / "run"
    with pytest.raises(KoalaError, match="another model family or size"):
        train(_cfg(tiny_pipe_dir, sd_cn, out, "train.max_steps=1"))
    with pytest.raises(KoalaError, match=r"controlnet\.student .*not the student U-Net's"):
        train(_cfg(tiny_pipe_dir, teacher_cn, out, "train.max_steps=1", f"controlnet.student={teacher_cn}"))
    assert not out.exists()
