"""Students say how to sample them: ``meta.sampling`` in the layer map (koala.families.sampling.SamplingDefaults),
read back by koala generate, eval run, app and bench, shown on the model card and kept in single-file exports."""

import json

import pytest

from koala.arch.layer_map import LayerMap
from koala.errors import KoalaError
from koala.families.sampling import (
    SamplingDefaults,
    paper_defaults,
    record_sampling,
    sampling_defaults_of,
)
from koala.inference import generate, load_pipeline, read_png_params, save_images

LCM = SamplingDefaults("LCMScheduler", steps=2, guidance_scale=1.0)
QUIET = dict(progress=False, log=lambda *_: None)


def _student(tiny_pipe_dir, out, defaults=None, kind="base", pipeline=False):
    """A tiny KOALA-700M student (a U-Net dir, or a pipeline dir) with ``defaults`` recorded in its layer map."""
    from koala.compress import compress

    compress(tiny_pipe_dir if pipeline else tiny_pipe_dir + "/unet", "koala-700m", str(out), teacher_kind=kind)
    if defaults is not None:
        path = LayerMap.find(str(out))
        lm = LayerMap.load(path)
        record_sampling(lm.meta, defaults)
        lm.save(path.rsplit("/", 1)[0])
    return str(out)


def _write_record(student, record):
    path = LayerMap.find(student)
    with open(path) as f:
        d = json.load(f)
    d["meta"]["sampling"] = record
    with open(path, "w") as f:
        json.dump(d, f)
    return path


@pytest.fixture()
def unet_calls(monkeypatch):
    """Every denoiser call: (timestep, batch size)."""
    from diffusers import UNet2DConditionModel

    calls = []
    orig = UNet2DConditionModel.forward

    def counted(self, sample, timestep, *args, **kwargs):
        calls.append((int(timestep.flatten()[0]) if hasattr(timestep, "flatten") else int(timestep), sample.shape[0]))
        return orig(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    return calls


def test_record_round_trip():
    d = SamplingDefaults("LCMScheduler", {"timestep_spacing": "trailing"}, 4, 1.0, [999, 749, 499, 249])
    meta = {}
    record_sampling(meta, d)
    assert json.loads(json.dumps(meta))["sampling"]["timesteps"] == [999, 749, 499, 249]
    assert SamplingDefaults.from_meta(meta["sampling"]) == d
    assert SamplingDefaults.from_meta({"steps": 4}) == SamplingDefaults(steps=4)  # keys left out: the paper's
    assert SamplingDefaults() == paper_defaults() and paper_defaults("turbo").scheduler_config == {
        "timestep_spacing": "trailing"
    }


@pytest.mark.parametrize(
    "record, key, words",
    [
        ({"scheduler": "NoSuchScheduler"}, "scheduler", "not a diffusers scheduler class"),
        ({"scheduler": "UNet2DConditionModel"}, "scheduler", "not a diffusers scheduler class"),
        ({"steps": 0}, "steps", ">= 1"),
        ({"steps": 2.5}, "steps", ">= 1"),
        ({"guidance_scale": -1}, "guidance_scale", ">= 0"),
        ({"steps": 2, "timesteps": [499, 999]}, "timesteps", "strictly decreasing"),
        ({"steps": 2, "timesteps": [1000, 499]}, "timesteps", "[0, 1000)"),
        ({"steps": 4, "timesteps": [999, 499]}, "timesteps", "one timestep per step"),
        ({"scheduler_config": {"timestep_spacing": "sideways"}}, "scheduler_config", "timestep_spacing"),
        ({"stpes": 4}, "stpes", "unknown key"),
    ],
)
def test_bad_records_are_refused_with_the_key_named(record, key, words):
    with pytest.raises(KoalaError, match=rf"meta\.sampling(\.{key})?: .*") as err:
        SamplingDefaults.from_meta(record, "meta.sampling")
    assert words in str(err.value) and key in str(err.value) and err.value.option == f"sampling.{key}"
    if key != "stpes":  # the dataclass refuses the same values when built directly
        with pytest.raises(KoalaError, match=key):
            SamplingDefaults(**{**SamplingDefaults().to_meta(), **record})


def test_a_bad_record_in_a_file_names_the_file(tiny_pipe_dir, tmp_path):
    student = _student(tiny_pipe_dir, tmp_path / "s")
    path = _write_record(student, {"scheduler": "LCMScheduler", "steps": 0})
    with pytest.raises(KoalaError, match=r"koala_layer_map\.json: meta\.sampling\.steps: 0") as err:
        sampling_defaults_of(student)
    assert path in str(err.value) and "record_sampling" in str(err.value)
    with pytest.raises(KoalaError, match="meta.sampling.steps"):
        load_pipeline(unet=student, base=tiny_pipe_dir, device="cpu")


def test_no_record_derives_todays_defaults(tiny_pipe_dir, tmp_path):
    assert sampling_defaults_of(tiny_pipe_dir) == SamplingDefaults()  # a plain teacher: its own spacing
    assert sampling_defaults_of(_student(tiny_pipe_dir, tmp_path / "base")) == SamplingDefaults()
    turbo = sampling_defaults_of(_student(tiny_pipe_dir, tmp_path / "turbo", kind="lightning"))
    assert turbo == SamplingDefaults(scheduler_config={"timestep_spacing": "trailing"})
    lp = load_pipeline(unet=str(tmp_path / "turbo"), base=tiny_pipe_dir, device="cpu")
    assert lp.scheduler == "euler" and lp.timestep_spacing == "trailing" and lp.sampling == turbo
    assert any("the student's teacher is lightning" in n for n in lp.notes)


def test_card_shows_the_record(tiny_pipe_dir, tmp_path):
    from koala.card import model_card

    lm = LayerMap.load(_student(tiny_pipe_dir, tmp_path / "s"))
    assert "Euler, 10 steps, guidance scale 3.5, timestep spacing" in model_card(lm, 10)
    record_sampling(
        lm.meta, SamplingDefaults("LCMScheduler", steps=4, guidance_scale=1.0, timesteps=[999, 749, 499, 249])
    )
    card = model_card(lm, 10)
    assert "## Sampling (recorded with the student)" in card and "Euler, 10 steps" not in card
    assert "LCMScheduler, 4 steps, guidance scale 1 (no classifier-free guidance pass)" in card
    assert "timesteps 999, 749, 499, 249" in card


def test_generate_cli_reads_the_record_and_flags_override(tiny_pipe_dir, tmp_path, unet_calls):
    from diffusers import LCMScheduler

    from koala.cli import main

    student = _student(tiny_pipe_dir, tmp_path / "s", LCM)
    lp = load_pipeline(unet=student, base=tiny_pipe_dir, device="cpu")
    assert isinstance(lp.pipe.scheduler, LCMScheduler) and lp.scheduler == "lcm" and lp.sampling == LCM
    args = ["generate", "a red circle", "--unet", student, "--base", tiny_pipe_dir, "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "rec"), "--no-progress"]) == 0
    p = read_png_params(str(tmp_path / "rec" / "0000-s0.png"))
    assert (p["scheduler"], p["steps"], p["cfg"]) == ("lcm", 2, 1.0)
    assert [b for _, b in unet_calls] == [1, 1]  # 2 steps, cfg 1.0: no unconditional pass
    unet_calls.clear()
    assert main([*args, "--steps", "3", "--cfg", "2.0", "--out", str(tmp_path / "over"), "--no-progress"]) == 0
    p = read_png_params(str(tmp_path / "over" / "0000-s0.png"))
    assert (p["scheduler"], p["steps"], p["cfg"]) == ("lcm", 3, 2.0) and [b for _, b in unet_calls] == [2, 2, 2]
    unet_calls.clear()
    assert main([*args, "--scheduler", "euler", "--steps", "1", "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    assert read_png_params(str(tmp_path / "e" / "0000-s0.png"))["scheduler"] == "euler" and len(unet_calls) == 1


def test_recorded_timesteps_are_sampled_and_kept_in_the_png(tiny_pipe_dir, tmp_path, unet_calls):
    dmd = SamplingDefaults("LCMScheduler", steps=2, guidance_scale=1.0, timesteps=[999, 499])
    lp = load_pipeline(_student(tiny_pipe_dir, tmp_path / "s", dmd, pipeline=True), device="cpu")
    res = generate(lp, "a red circle", **QUIET)
    assert [t for t, _ in unet_calls] == [999, 499] and res.params[0]["timesteps"] == [999, 499]
    params = read_png_params(save_images(res, str(tmp_path / "out"))[0])
    assert params["timesteps"] == [999, 499] and params["steps"] == 2
    unet_calls.clear()
    res = generate(lp, "a red circle", steps=3, **QUIET)  # other steps: the scheduler's own timesteps
    assert len(unet_calls) == 3 and "timesteps" not in res.params[0]
    spaced = load_pipeline(str(tmp_path / "s"), device="cpu", timestep_spacing="trailing")
    assert spaced.sampling.timesteps is None and any("not used" in n for n in spaced.notes)


def test_a_student_without_a_record_samples_as_before(tiny_pipe_dir, unet_calls):
    lp = load_pipeline(tiny_pipe_dir, device="cpu")
    res = generate(lp, "a red circle", **QUIET)
    p = res.params[0]
    assert (p["scheduler"], p["steps"], p["cfg"]) == ("euler", 10, 3.5) and "timesteps" not in p
    assert len(unet_calls) == 10 and all(b == 2 for _, b in unet_calls)
    assert type(lp.pipe.scheduler).__name__ == "EulerDiscreteScheduler" and lp.sampling == SamplingDefaults()


def test_single_file_export_carries_the_record(tiny_pipe_dir, tmp_path):
    from safetensors import safe_open

    from koala.formats.single_file import export_single_file

    student = _student(tiny_pipe_dir, tmp_path / "s", LCM, pipeline=True)
    f = str(tmp_path / "s.safetensors")
    export_single_file(student, f, unet_only=True)
    with safe_open(f, "pt") as sf:
        meta = sf.metadata()
    assert json.loads(meta["koala.sampling"]) == LCM.to_meta()


def test_eval_and_bench_resolve_each_models_record(tiny_pipe_dir, tmp_path):
    from koala.bench import BenchSettings
    from koala.eval.run import EvalModel, EvalSettings, Prompt, image_key, model_settings

    student = _student(tiny_pipe_dir, tmp_path / "s", LCM, pipeline=True)
    s = EvalSettings()
    resolved, ts = model_settings(EvalModel("koala", model=student), s)
    assert (resolved.scheduler, resolved.steps, resolved.cfg, ts) == ("lcm", 2, 1.0, None)
    teacher = EvalModel("teacher", model=tiny_pipe_dir)
    paper, _ = model_settings(teacher, s)
    assert (paper.scheduler, paper.steps, paper.cfg) == ("euler", 10, 3.5)
    p = Prompt("all", 0, "a red circle")  # the key of a model without a record is what it was
    assert image_key(teacher, p, 0, paper) == image_key(
        teacher, p, 0, EvalSettings(steps=10, cfg=3.5, scheduler="euler")
    )
    assert model_settings(EvalModel("koala", model=student), EvalSettings(steps=5))[0].steps == 5
    b = BenchSettings(models=[student, "tiny-koala-700m"])
    assert (b.for_model(student).steps, b.for_model(student).cfg) == (2, 1.0)
    assert (b.for_model("tiny-koala-700m").steps, b.for_model("tiny-koala-700m").cfg) == (10, 3.5)
    assert BenchSettings(models=[student], steps=7).for_model(student).steps == 7
