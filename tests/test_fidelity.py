"""Paper fidelity (App. A.2 / A.3): sampling by teacher kind, the global batch, and Table 10c's layer selection
initialising and matching alike."""

import json
import os

import pytest
import torch

from koala import KoalaError
from koala.arch import LayerMap
from koala.cli import main
from koala.compress import compress
from koala.distill import load_config
from koala.inference import load_pipeline

FAST = ["train.progress=false", "validation.every=0", "train.log_every=1"]


def test_lightning_student_is_sampled_with_euler_trailing(tiny_pipe_dir, tmp_path):
    out = tmp_path / "k700"
    assert (
        main(
            [
                "compress",
                "--teacher",
                tiny_pipe_dir,
                "--student",
                "koala-700m",
                "--out",
                str(out),
                "--teacher-kind",
                "lightning",
            ]
        )
        == 0
    )
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler" and sched["timestep_spacing"] == "trailing"
    assert LayerMap.load(str(out)).meta["teacher_kind"] == "lightning"
    lp = load_pipeline(str(out), device="cpu")
    assert lp.timestep_spacing == "trailing"
    # a student U-Net dropped into the (leading) teacher pipeline still gets trailing, from its layer map
    lp = load_pipeline(unet=str(out / "unet"), base=tiny_pipe_dir, device="cpu")
    assert lp.timestep_spacing == "trailing" and any("teacher is lightning" in n for n in lp.notes)
    assert (
        load_pipeline(
            unet=str(out / "unet"), base=tiny_pipe_dir, device="cpu", timestep_spacing="leading"
        ).timestep_spacing
        == "leading"
    )  # the flag wins
    base = tmp_path / "base"
    compress(tiny_pipe_dir, "koala-700m", str(base))  # a base teacher: the teacher's scheduler, unchanged
    assert (base / "scheduler" / "scheduler_config.json").read_text() == open(
        os.path.join(tiny_pipe_dir, "scheduler", "scheduler_config.json")
    ).read()
    assert load_pipeline(str(base), device="cpu").timestep_spacing == "leading"


def test_validation_samples_every_family_with_euler(tiny_sd_pipe_dir):
    from koala.distill.models import load_models
    from koala.distill.validation import _pipeline

    cfg = load_config(
        "tiny", [f"teacher.pipeline={tiny_sd_pipe_dir}", "student.preset=bk-sdm-small", "teacher.kind=turbo"]
    )
    teacher, student, lmap, frozen = load_models(cfg)
    assert type(frozen.parts.scheduler).__name__ == "PNDMScheduler"  # the SD pipeline's own
    sched = _pipeline(student, frozen, "turbo").scheduler
    assert type(sched).__name__ == "EulerDiscreteScheduler" and sched.config.timestep_spacing == "trailing"
    assert sched.config.beta_end == frozen.parts.scheduler.config.beta_end
    assert lmap.meta["teacher_kind"] == "turbo"


def test_global_batch_derives_grad_accum_or_refuses(tiny_pipe_dir, tmp_path):
    from koala.distill.trainer import train

    common = [f"teacher.pipeline={tiny_pipe_dir}", *FAST, "train.max_steps=1", "train.batch_size=2"]
    derived = ["train.global_batch=4", "train.grad_accum=1", f"train.output_dir={tmp_path / 'a'}"]
    res = train(load_config("tiny", common + derived))
    state = json.loads(open(os.path.join(res["checkpoint"], "state.json")).read())
    # the run's layout derives the accumulation (4 = 2 x 1 process x 2); the saved config is what the user wrote
    assert state["global_batch"] == 4 and state["grad_accum"] == 2 and state["config"]["train"]["grad_accum"] == 1
    with pytest.raises(KoalaError, match="global_batch 5 is not a multiple of batch_size 2 x 1 process"):
        train(load_config("tiny", common + ["train.global_batch=5", f"train.output_dir={tmp_path / 'b'}"]))
    with pytest.raises(KoalaError, match="grad_accum=3 disagrees with train.global_batch 4"):
        train(
            load_config(
                "tiny", common + ["train.global_batch=4", "train.grad_accum=3", f"train.output_dir={tmp_path / 'c'}"]
            )
        )
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_kd_layer_selection_initialises_and_matches(tiny_pipe_dir, tmp_path):
    """Table 10c: SA-up initialises the student from the teacher's top layers and matches it with them."""
    from koala.distill.hooks import feature_pairs
    from koala.distill.models import load_models

    cfg = load_config("tiny", [f"teacher.pipeline={tiny_pipe_dir}", "kd.layer_selection=up", "kd.features={SA: all}"])
    teacher, student, lmap, _ = load_models(cfg)
    assert lmap.layer_selection == "up"
    deep = [e for e in lmap.of_kind("transformer_layer") if e.student.startswith("up_blocks.0.attentions.0.")]
    assert [e.teacher_layer for e in deep] == [5, 6, 7, 8, 9]  # KOALA-700M keeps 5 of 10: the top five
    t_state = teacher.state_dict()
    for name, p in student.state_dict().items():  # initialised from exactly the layers it is matched with
        assert torch.equal(p, t_state[lmap.teacher_name(name)].to(p.dtype)), name
    pairs = feature_pairs(lmap, student, teacher, {"SA": "all"}, selection="up")
    assert {(p.student, p.teacher) for p in pairs} == {
        (f"{e.student}.attn1", f"{e.teacher}.attn1") for e in lmap.of_kind("transformer_layer")
    }
    # a student compressed from the bottom layers cannot be run as SA-up
    compress(tiny_pipe_dir, "koala-700m", str(tmp_path / "bottom"))
    with pytest.raises(KoalaError, match="initialised from the bottom teacher layers; compress it again"):
        load_models(
            load_config(
                "tiny",
                [f"teacher.pipeline={tiny_pipe_dir}", f"student.path={tmp_path / 'bottom'}", "kd.layer_selection=up"],
            )
        )
    with pytest.raises(KoalaError, match="disagree"):
        load_models(
            load_config(
                "tiny",
                [f"teacher.pipeline={tiny_pipe_dir}", "kd.layer_selection=up", "student.layer_selection=interleave"],
            )
        )
