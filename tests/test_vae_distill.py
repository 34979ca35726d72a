"""koala vae distill: a tiny AutoencoderTiny decoder learns the teacher VAE's decodes, resumes bit-exactly, loads
with diffusers, decodes inside a pipeline (generate --vae, PNG parameters); bad input is refused, nothing written."""

import os

import pytest
import torch
from safetensors.torch import load_file

from koala.cli import main
from koala.distill.vae import distill_vae, load_vae_config
from koala.errors import KoalaError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _overrides(teacher: str, out: str, steps: int, **extra) -> list[str]:
    kw = {
        "teacher": teacher,
        "out": out,
        "model.decoder_channels": "[8,8]",
        "model.decoder_blocks": "[1,1]",
        "data.type": "synthetic",
        "data.num_samples": 12,
        "train.resolution": 32,
        "train.batch_size": 4,
        "train.max_steps": steps,
        "train.lr": 3e-3,
        "train.checkpoint_every": 5,
        "train.keep_checkpoints": 0,
        "train.log_every": 1,
        "train.progress": "false",
        "train.cpu_threads": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def trained(tiny_pipe_dir, tmp_path_factory):
    """A tiny decoder trained 10 steps in one go: (output folder, run summary)."""
    out = str(tmp_path_factory.mktemp("tiny_vae") / "vae")
    return out, distill_vae(load_vae_config(None, _overrides(tiny_pipe_dir, out, 10)), log=lambda *_: None)


def test_loss_falls_and_resume_is_bit_exact(trained, tiny_pipe_dir, tmp_path):
    out, full = trained
    losses = full["losses"]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    part = str(tmp_path / "vae")
    first = distill_vae(load_vae_config(None, _overrides(tiny_pipe_dir, part, 5)), log=lambda *_: None)
    second = distill_vae(
        load_vae_config(None, _overrides(tiny_pipe_dir, part, 10, **{"train.resume": "latest"})), log=lambda *_: None
    )
    assert first["losses"] + second["losses"] == losses  # the same batches, noise and learning rates
    assert os.path.isfile(os.path.join(part, "config.json"))  # the 5-step model was replaced by the 10-step one
    a, b = load_file(os.path.join(out, WEIGHTS)), load_file(os.path.join(part, WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_loads_with_diffusers_and_decodes_like_the_run(trained, tiny_pipe_dir):
    from diffusers import AutoencoderKL, AutoencoderTiny

    from koala.distill.vae import teacher_decode, tiny_decode

    out, _ = trained
    tiny = AutoencoderTiny.from_pretrained(out)
    teacher = AutoencoderKL.from_pretrained(tiny_pipe_dir, subfolder="vae")
    assert tiny.config.latent_channels == teacher.config.latent_channels == 4
    assert tiny.config.scaling_factor == 1.0 and len(tiny.config.block_out_channels) == 2  # pipeline factor 2
    assert os.path.isfile(os.path.join(out, "README.md")) and os.path.isfile(os.path.join(out, "koala_vae.json"))
    ckpt = load_file(os.path.join(out, "checkpoints", "step-0000010", "vae", WEIGHTS))
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in ckpt.items())
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img, ref = tiny_decode(tiny, z), teacher_decode(teacher, z)
    assert img.shape == ref.shape == (2, 3, 32, 32)


def test_generate_with_tiny_vae_decodes_the_pipeline_latents_and_names_it(trained, tiny_pipe_dir, tmp_path):
    from koala.distill.vae import tiny_decode
    from koala.inference import load_pipeline, read_png_params

    out, _ = trained
    lp = load_pipeline(tiny_pipe_dir, vae=out, device="cpu")
    assert type(lp.pipe.vae).__name__ == "AutoencoderTiny" and "tiny VAE (AutoencoderTiny)" in lp.modes
    kw = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=3.5)
    lat = lp.pipe(**kw, generator=torch.Generator().manual_seed(3), output_type="latent").images
    img = lp.pipe(**kw, generator=torch.Generator().manual_seed(3), output_type="pt").images
    with torch.no_grad():  # the pipeline hands the tiny decoder its latents as the run trained it to take them
        assert torch.allclose(img, (tiny_decode(lp.pipe.vae, lat) / 2 + 0.5).clamp(0, 1), atol=1e-5)
    imgs = tmp_path / "imgs"
    code = main(["generate", "a red circle", "--model", tiny_pipe_dir, "--vae", out, "--steps", "1", "--out",
                 str(imgs), "--no-progress"])  # fmt: skip
    assert code == 0
    params = read_png_params(str(imgs / os.listdir(imgs)[0]))
    assert params["vae"] == f"{os.path.basename(out)} (AutoencoderTiny)"


def _other_latent_size(path: str) -> str:
    from diffusers import AutoencoderTiny

    AutoencoderTiny(latent_channels=8, decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1),
                    encoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1)).save_pretrained(path)  # fmt: skip
    return path


def test_a_vae_of_another_latent_size_is_refused_with_nothing_written(tiny_pipe_dir, tmp_path, capsys):
    other = _other_latent_size(str(tmp_path / "other"))
    out = tmp_path / "vae"
    with pytest.raises(KoalaError, match="another latent size") as err:
        distill_vae(load_vae_config(None, _overrides(tiny_pipe_dir, str(out), 2, **{"model.init": other})))
    assert err.value.option == "model.init" and not out.exists()
    imgs = tmp_path / "imgs"
    code = main(["generate", "a red circle", "--model", tiny_pipe_dir, "--vae", other, "--out", str(imgs)])
    assert code == 2 and "another latent size" in capsys.readouterr().err and not imgs.exists()


def test_unknown_recipe_key_and_missing_teacher_are_refused(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "vae"
    code = main(["vae", "distill", "--teacher", tiny_pipe_dir, "--out", str(out), "model.decoder_width=16"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key 'model.decoder_width'" in err and not out.exists()
    code = main(["vae", "distill", "--teacher", str(tmp_path / "nope"), "--out", str(out)])
    assert code == 2 and "no such directory" in capsys.readouterr().err and not out.exists()
    with pytest.raises(KoalaError, match="3 stages but the teacher VAE has 2"):
        distill_vae(load_vae_config(None, _overrides(tiny_pipe_dir, str(out), 2, **{
            "model.decoder_channels": "[8,8,8]", "model.decoder_blocks": "[1,1,1]"})))  # fmt: skip
    assert not out.exists()


def test_trains_from_a_latent_cache(tiny_pipe_dir, tmp_path):
    from koala.data import build_cache

    cache = str(tmp_path / "cache")
    build_cache({"type": "synthetic", "num_samples": 8}, tiny_pipe_dir, cache, resolution=32, dtype="fp32",
                progress=False)  # fmt: skip
    out = str(tmp_path / "vae")
    res = distill_vae(
        load_vae_config(None, _overrides(tiny_pipe_dir, out, 2, **{"data.type": "cache", "data.path": cache})),
        log=lambda *_: None,
    )
    assert res["finished"] and len(res["losses"]) == 2 and os.path.isfile(os.path.join(out, "config.json"))
    with pytest.raises(KoalaError, match="needs images"):  # the encoder cannot train on latents alone
        load_vae_config(None, _overrides(tiny_pipe_dir, out, 2, **{"data.type": "cache", "data.path": cache,
                                                                    "model.encoder": "true"}))  # fmt: skip


def test_bench_and_app_use_the_tiny_vae(trained, tiny_pipe_dir, tmp_path):
    from diffusers import AutoencoderTiny

    from koala.app import ModelSpec, load_models
    from koala.bench import BenchSettings, run_bench

    out, _ = trained
    kw = dict(models=["tiny-koala-700m"], resolution=64, steps=1, device="cpu", dtype="fp32", warmup=0, repeats=1)
    res = run_bench(BenchSettings(components=["unet", "vae"], vae=out, **kw), log=lambda *_: None)
    row = res["models"][0]
    tiny = AutoencoderTiny.from_pretrained(out)
    assert row["params"]["vae_decoder"] == sum(p.numel() for p in tiny.decoder.parameters())
    assert row["times_ms"]["vae_decode"]["median"] > 0 and res["settings"]["vae"] == out
    other = _other_latent_size(str(tmp_path / "other"))
    with pytest.raises(KoalaError, match="another latent size") as err:
        run_bench(BenchSettings(components=["unet", "vae"], vae=other, **kw), log=lambda *_: None)
    assert err.value.option == "vae"
    (slot,) = load_models([ModelSpec("tiny + vae", model=tiny_pipe_dir, vae=out)], device="cpu", log=lambda *_: None)
    assert slot.error is None and type(slot.pipe.pipe.vae).__name__ == "AutoencoderTiny"
    assert slot.pipe.vae == f"{os.path.basename(out)} (AutoencoderTiny)"


def test_encoder_trains_too_when_asked(tiny_pipe_dir, tmp_path):
    import json

    from diffusers import AutoencoderTiny

    out = str(tmp_path / "vae")
    extra = {"model.encoder": "true", "model.encoder_channels": "[8,8]", "model.encoder_blocks": "[1,1]"}
    distill_vae(load_vae_config(None, _overrides(tiny_pipe_dir, out, 3, **extra)), log=lambda *_: None)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss/latent"] > 0 for r in rows)
    tiny = AutoencoderTiny.from_pretrained(out)
    with torch.no_grad():
        assert tiny.encode(torch.zeros(1, 3, 32, 32)).latents.shape == (1, 4, 16, 16)
