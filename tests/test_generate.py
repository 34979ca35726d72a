"""koala generate: metadata round trip, seeds, equality with plain diffusers, memory modes, NSFW filter, CLI."""

import numpy as np
import pytest
import torch

from koala.errors import KoalaError
from koala.inference import NSFWFilter, generate, load_pipeline, read_png_params, save_images

FAST = dict(steps=2, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def loaded(tiny_pipe_dir):
    return load_pipeline(tiny_pipe_dir, device="cpu")


def _arr(img):
    return np.asarray(img).astype(np.int16)


def test_png_metadata_round_trip(loaded, tmp_path):
    res = generate(loaded, ["a red circle", "a blue square"], seed=7, cfg=2.0, **FAST)
    paths = save_images(res, str(tmp_path), grid=True)
    assert len(paths) == 3 and paths[-1].endswith("grid.png")
    p0, p1 = read_png_params(paths[0]), read_png_params(paths[1])
    assert (p0["prompt"], p0["seed"], p1["prompt"], p1["seed"]) == ("a red circle", 7, "a blue square", 8)
    assert p0["steps"] == 2 and p0["cfg"] == 2.0 and p0["scheduler"] == "euler" and p0["model"] == "pipe"
    from PIL import Image

    with Image.open(paths[0]) as im:  # individual tEXt chunks, readable by any PNG tool
        assert im.text["prompt"] == "a red circle" and im.text["seed"] == "7" and im.text["steps"] == "2"
        w, h = im.size
    with Image.open(paths[-1]) as grid:
        assert grid.size == (2 * w, h)


def test_seed_reproducible_across_batching(loaded):
    batched = generate(loaded, ["a red circle", "a blue square"], seed=3, batch_size=2, **FAST).images
    alone = generate(loaded, "a blue square", seed=4, **FAST).images[0]
    assert np.abs(_arr(batched[1]) - _arr(alone)).max() <= 1
    other = generate(loaded, "a blue square", seed=5, **FAST).images[0]
    assert np.abs(_arr(other) - _arr(alone)).max() > 5


def test_equals_plain_diffusers(loaded, tiny_pipe_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a red circle", negative_prompt="blue", num_inference_steps=3, guidance_scale=3.5)
    expected = ref(**kw, generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    ours = generate(
        loaded, kw["prompt"], negative_prompt="blue", steps=3, cfg=3.5, seed=11, progress=False, log=lambda *_: None
    ).images[0]
    assert np.array_equal(np.asarray(ours), (expected * 255).round().astype("uint8"))


@pytest.mark.parametrize("mode", [dict(vae_slicing=True), dict(channels_last=True), dict(attention="classic")])
def test_memory_modes_match_baseline(loaded, tiny_pipe_dir, mode):
    base = generate(loaded, ["a red circle", "a blue square"], seed=1, batch_size=2, **FAST).images
    lp = load_pipeline(tiny_pipe_dir, device="cpu", **mode)
    got = generate(lp, ["a red circle", "a blue square"], seed=1, batch_size=2, **FAST).images
    assert all(np.abs(_arr(a) - _arr(b)).max() <= 2 for a, b in zip(base, got))


def test_vae_tiling_runs_and_tiles(tiny_pipe_dir):
    lp = load_pipeline(tiny_pipe_dir, device="cpu", vae_tiling=True)
    assert lp.pipe.vae.use_tiling and "VAE tiling" in lp.modes
    img = generate(lp, "a red circle", width=64, height=64, **FAST).images[0]  # latent 32 > tile size 16
    assert img.size == (64, 64) and _arr(img).std() > 0


def test_offload_on_cpu_is_a_note_not_a_crash(tiny_pipe_dir):
    lp = load_pipeline(tiny_pipe_dir, device="cpu", offload="model")
    assert any("does not apply" in n for n in lp.notes)
    logs = []
    generate(lp, "a red circle", steps=1, progress=False, log=logs.append)
    assert any("does not apply" in m for m in logs) and any("no NSFW filter" in m for m in logs)


def test_unet_plus_base(tiny_pipe_dir, tmp_path):
    from koala.compress import compress

    student = str(tmp_path / "student")
    compress(tiny_pipe_dir + "/unet", "koala-700m", student)
    lp = load_pipeline(unet=student, base=tiny_pipe_dir, device="cpu")
    assert lp.pipe.unet.config.mid_block_type is None and "student" in lp.model
    assert generate(lp, "a red circle", steps=1, progress=False, log=lambda *_: None).images[0].size == (32, 32)
    with pytest.raises(KoalaError, match=r"is a model \(U-Net / transformer\) directory") as err:
        load_pipeline(student, device="cpu")  # a U-Net dir is not a pipeline
    assert err.value.option == "model"


def test_nsfw_filter_withholds_and_reports(loaded, nsfw_dir, tmp_path):
    logs = []
    res = generate(
        loaded,
        ["a red circle", "a blue square"],
        safety=NSFWFilter(nsfw_dir, threshold=0.5),
        steps=1,
        progress=False,
        log=logs.append,
    )
    assert len(res.withheld) == 2 and res.images == [] and res.withheld[0].nsfw_score > 0.9
    assert sum("withheld" in m for m in logs) == 2 and not any("no NSFW filter" in m for m in logs)
    assert save_images(res, str(tmp_path)) == []
    kept = generate(
        loaded,
        "a red circle",
        safety=NSFWFilter(nsfw_dir, threshold=0.999),
        steps=1,
        progress=False,
        log=lambda *_: None,
    )
    assert len(kept.images) == 1 and not kept.withheld
    with pytest.raises(KoalaError, match="id2label"):
        NSFWFilter(nsfw_dir, label="porn")


def test_cli_generate(tiny_pipe_dir, tmp_path, capsys):
    from koala.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# comment\n\na blue square\n")
    out = tmp_path / "imgs"
    rc = main(
        [
            "generate",
            "--prompts-file",
            str(prompts),
            "--model",
            tiny_pipe_dir,
            "--steps",
            "1",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--offload",
            "sequential",
            "--vae-slicing",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "does not apply" in text
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000-s5.png", "0001-s6.png"]
    assert read_png_params(str(out / files[1]))["prompt"] == "a blue square"
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    # library errors speak in library terms; the CLI points at its flag
    capsys.readouterr()
    assert main(["generate", "x", "--model", tiny_pipe_dir, "--device", "cpu", "--width", "33"]) == 2
    err = capsys.readouterr().err
    assert "width 33 must be a positive multiple" in err and err.rstrip().endswith("(option --width)")
    with pytest.raises(KoalaError, match="^timestep spacing 'odd'") as info:
        load_pipeline(tiny_pipe_dir, device="cpu", timestep_spacing="odd")
    assert info.value.option == "timestep_spacing" and "--" not in str(info.value)


def test_sd_pipeline_generates_equal_to_plain_diffusers(tiny_sd_pipe_dir, tmp_path, capsys):
    """The SD-1.x family through koala generate: default size from the U-Net, equal to StableDiffusionPipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from koala.cli import main

    lp = load_pipeline(tiny_sd_pipe_dir, device="cpu")
    assert lp.family == "sd" and type(lp.pipe).__name__ == "StableDiffusionPipeline"
    ours = generate(lp, "a red circle", steps=3, cfg=3.5, seed=4, progress=False, log=lambda *_: None).images[0]
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_pipe_dir, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = ref(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=3.5,
        height=ours.size[1],
        width=ours.size[0],
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).images[0]
    assert ours.size == (32, 32) and np.array_equal(np.asarray(ours), (expected * 255).round().astype("uint8"))
    assert (
        main(
            [
                "generate",
                "a blue square",
                "--model",
                tiny_sd_pipe_dir,
                "--steps",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert read_png_params(str(next((tmp_path / "o").glob("*.png"))))["prompt"] == "a blue square"
