"""Shapes-world ControlNet: layouts drawn from the scene masks, control images in koala.data batches, the
`koala lab train-controlnet` trainer (resume bit-exact, loss falls, diffusers-loadable) and the layout IoU score."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from koala.data import make_dataloader
from koala.errors import KoalaError
from koala.lab.control import layout_iou, score_control_images
from koala.lab.layout import LAYOUT_BACKGROUND, draw_layout, object_masks
from koala.lab.shapes import BACKGROUND, PALETTE, generate_scenes, render, write_shapes_dataset


def test_layout_is_each_scene_mask_in_its_colour(tmp_path):
    scenes = generate_scenes(12, "val", seed=1, size=32)
    for sc in scenes:
        lay, img = draw_layout(sc.objects, 32), render(sc.objects, 32)
        covered = np.zeros((32, 32), bool)
        for o, m in zip(sc.objects, object_masks(sc.objects, 32)):
            assert m.sum() > 20 and (lay[m] == PALETTE[o.color]).all()
            covered |= m
        assert (lay[~covered] == LAYOUT_BACKGROUND).all()
        # the image is the same scene: object pixels agree, the background differs (white vs black)
        assert (img[covered] == lay[covered]).all() and (img[~covered] == BACKGROUND).all()
    d = write_shapes_dataset(str(tmp_path / "s"), num_train=3, num_val=2, size=32, progress=False)
    rows = [json.loads(line) for line in open(os.path.join(d, "val", "metadata.jsonl"))]
    for i, row in enumerate(rows):
        lay = np.asarray(Image.open(os.path.join(d, "val", f"{i:06d}.layout.png")))
        assert (lay == draw_layout(generate_scenes(2, "val", seed=0, size=32)[i].objects, 32)).all()


def _folder(tmp_path, n=4, control=True):
    """Non-square images (so batches get a real resize + random crop + flip) with ``x.inv.png``: the inverted image."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        arr = (rng.random((40, 52, 3)) * 255).astype(np.uint8)
        arr[:, : 10 + 5 * i] = 0  # something a flip / crop moves
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        if control:
            Image.fromarray(255 - arr).save(tmp_path / f"{i}.inv.png")
        rows.append({"file_name": f"{i}.png", "text": f"image {i}"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path)


def _batch(path, control, **kw):
    cfg = {"type": "folder", "path": path, "control": control, "repeat": False, "shuffle": False, **kw}
    return next(iter(make_dataloader(cfg, batch_size=4, resolution=32, seed=3)))


def test_control_file_gets_the_image_crop_and_flip(tmp_path):
    b = _batch(_folder(tmp_path), "inv", random_flip=True, center_crop=False)
    assert b["control_image"].shape == (4, 3, 32, 32) and b["control_image"].dtype == torch.float32
    assert b["crop_top_left"][:, 1].max() > 0  # a random crop happened
    img01 = (b["pixel_values"] + 1) / 2
    # resize (linear), flip and crop of the inverted file = the inverted cropped image, up to rounding
    assert torch.allclose(b["control_image"], 1 - img01, atol=1.5 / 255)
    assert not torch.allclose(b["control_image"][0], 1 - img01[1], atol=0.1)


def test_canny_is_computed_on_the_cropped_image(tmp_path):
    import cv2

    b = _batch(_folder(tmp_path, control=False), "canny", random_flip=True)
    for px, ctrl in zip(b["pixel_values"], b["control_image"]):
        u8 = ((px + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        edges = cv2.Canny(cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY), 100, 200)
        assert edges.any() and (ctrl[0].numpy() * 255 == edges).all() and (ctrl[0] == ctrl[2]).all()


def test_missing_control_file_and_cache_are_refused(tmp_path, tiny_pipe_dir):
    from koala.data.cache import build_cache

    path = _folder(tmp_path)
    os.remove(os.path.join(path, "2.inv.png"))
    with pytest.raises(KoalaError, match=r"2\.inv\.png: control image missing"):
        _batch(path, "inv")
    with pytest.raises(KoalaError, match="data.control"):
        _batch(path, "no/such")
    out = str(tmp_path / "cache")
    with pytest.raises(KoalaError, match="not control images"):
        build_cache({"type": "folder", "path": path, "control": "inv"}, tiny_pipe_dir, out, resolution=32)
    assert not os.path.exists(out)


def test_layout_iou_is_one_on_renders_and_zero_on_blanks():
    scenes = generate_scenes(8, "val", seed=2, size=32)
    renders = [render(s.objects, 32) for s in scenes]
    good = score_control_images(renders, scenes)
    assert good["iou"] == 1.0 and good["fg_iou"] == 1.0 and good["binding"] == 1.0
    blank = score_control_images([np.full((32, 32, 3), 255, np.uint8)] * 8, scenes)
    assert blank["iou"] == 0.0 and blank["fg_iou"] == 0.0 and blank["binding"] == 0.0
    # a render of another scene: partial overlap at most
    assert layout_iou(renders[1], scenes[0])["iou"] < 1.0


def _train(out, **kw):
    from koala.lab.controlnet import ControlNetConfig, train_controlnet

    cfg = {"num_train": 8, "batch_size": 4, "lr": 3e-3, "warmup": 1, "save_every": 3, "threads": 2, **kw}
    return train_controlnet(ControlNetConfig(out=out, **cfg), log=lambda *_: None)


def test_train_controlnet_resumes_bit_exactly_and_loads_in_diffusers(tmp_path, tiny_pipe_dir):
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _train(a, teacher=tiny_pipe_dir, steps=6, ema_decay=0.9)
    _train(b, teacher=tiny_pipe_dir, steps=3, ema_decay=0.9)  # stopped after 3 ...
    assert json.load(open(os.path.join(b, "koala_controlnet.json")))["step"] == 3
    _train(b, teacher=tiny_pipe_dir, steps=6, ema_decay=0.9)  # ... and continued
    for f in ("diffusion_pytorch_model.safetensors", "train_state/controlnet.safetensors"):
        ta, tb = load_file(os.path.join(a, f)), load_file(os.path.join(b, f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(KoalaError, match="lr differ"):
        _train(b, teacher=tiny_pipe_dir, steps=7, ema_decay=0.9, lr=1e-4)
    cn = ControlNetModel.from_pretrained(a)
    assert cn.config.conditioning_embedding_out_channels == [16, 32]
    from diffusers import StableDiffusionXLPipeline

    from koala.lab.control import generate_with_layouts

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir)
    scenes = generate_scenes(2, "val", 0, 32)
    sampling = {"num_inference_steps": 2, "guidance_scale": 2.0, "height": 32, "width": 32}
    with_cn = generate_with_layouts(pipe, cn, scenes, sampling, progress=False)
    without = generate_with_layouts(pipe, None, scenes, sampling, progress=False)
    assert with_cn[0].shape == (32, 32, 3) and not np.array_equal(with_cn[0], without[0])


def test_train_controlnet_loss_falls(tmp_path, tiny_pipe_dir):
    from diffusers import ControlNetModel, DDPMScheduler

    from koala.lab.controlnet import ControlNetConfig, Trainer, load_teacher, training_data

    out = str(tmp_path / "c")
    _train(out, teacher=tiny_pipe_dir, steps=20, save_every=0, cond_dropout=0.0)
    cfg = ControlNetConfig(out=out, teacher=tiny_pipe_dir, num_train=8, batch_size=8, cond_dropout=0.0)
    pipe = load_teacher(tiny_pipe_dir)
    data = training_data(pipe, cfg)
    tid = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 8)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(cn):  # the same batches, noise and timesteps for both ControlNets
        tr = Trainer(cn.eval(), pipe.unet, cfg, sched, tid)
        with torch.no_grad():
            return float(np.mean([tr.loss(data).item() for _ in range(4)]))

    before = loss(ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)))
    after = loss(ControlNetModel.from_pretrained(out))
    assert after < 0.9 * before, (before, after)


def test_train_controlnet_cli_refuses_bad_settings_and_foreign_out(tmp_path, capsys):
    from koala.cli import main

    out = tmp_path / "cn"
    assert main(["lab", "train-controlnet", "--out", str(out), "stepz=3"]) == 2
    assert "stepz=3" in capsys.readouterr().err and not out.exists()
    assert main(["lab", "train-controlnet", "--out", str(out), "ema_decay=2"]) == 2
    assert "ema_decay" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "x.txt").write_text("mine")
    assert main(["lab", "train-controlnet", "--out", str(out), "steps=1"]) == 2
    assert "koala_controlnet.json missing" in capsys.readouterr().err and os.listdir(out) == ["x.txt"]


def test_canny_without_opencv_falls_back_to_a_pil_edge_map(monkeypatch):
    import sys

    from koala.data.control import canny

    arr = np.full((32, 32, 3), 255, np.uint8)
    arr[8:24, 8:24] = (30, 60, 220)
    with_cv = np.asarray(canny(Image.fromarray(arr)))[..., 0] > 0
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    edges = np.asarray(canny(Image.fromarray(arr)))[..., 0] > 0
    assert edges[7:25, 7:25].any() and not edges[12:20, 12:20].any() and not edges[:5].any()
    assert with_cv[7:25, 7:25].any() and not with_cv[12:20, 12:20].any()


def test_control_files_are_not_read_as_images_of_a_sidecar_folder(tmp_path):
    path = _folder(tmp_path)
    os.remove(os.path.join(path, "metadata.jsonl"))
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    assert _batch(path, None)["skipped"] == {"no_caption": 4}  # without control: x.inv.png are uncaptioned images
    b = _batch(path, "inv", random_flip=False)
    assert b["keys"] == [f"{i}.png" for i in range(4)] and b["skipped"] == {}
    assert torch.allclose(b["control_image"], 1 - (b["pixel_values"] + 1) / 2, atol=1.5 / 255)
