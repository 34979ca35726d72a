"""`koala plan` and `koala bench train` for step distillation (fewstep.method lcm / dmd): the objective's models as
separate plan lines, their order against the KD step, the FSDP estimate, and the benchmark's phases and forwards."""

import math

import pytest

from koala import KoalaError
from koala.bench.plan import plan_markdown, plan_memory
from koala.distill import load_config

TINY = "tiny-sdxl-base"
COMMON = ["teacher.pipeline=x", "train.resolution=64", "train.batch_size=2", "train.ema.enabled=false"]
TWO_STAGE = ["fewstep.teacher=student", "loss.task=0", "loss.out=0", "loss.feat=0"]


def _plan(recipe, *ov, teacher=TINY, **kw):
    return plan_memory(load_config(recipe, [*COMMON, *ov]), teacher=teacher, **kw)


@pytest.fixture(scope="module")
def plans():
    """The KD step, two-stage LCM (on an 80 GiB device: fits) and two-stage DMD (on a 1 MiB one over 4 processes:
    does not fit), planned once (each simulated step takes seconds on meta, tiny or not)."""
    return {
        "kd": _plan("tiny"),
        "lcm": _plan("tiny-fewstep", *TWO_STAGE, device_gib=80),
        "dmd": _plan("tiny-dmd", *TWO_STAGE, device_gib=1e-3, processes=4),
    }


def test_fewstep_parts_are_separate_lines_and_dmd_above_lcm_above_kd(plans):
    kd, lcm, dmd = plans["kd"], plans["lcm"], plans["dmd"]
    assert "fewstep" not in kd and lcm["fewstep"]["method"] == "lcm" and dmd["fewstep"]["method"] == "dmd"
    p_s, p_t = lcm["params"]["student"], lcm["params"]["teacher"]
    b = lcm["bytes"]
    # LCM: a frozen copy of the student as step teacher (teacher.dtype fp32 in the tiny recipes), the fp32 target
    assert b["step_teacher"] == 4 * p_s and b["lcm_target"] == 4 * p_s and b["fake_score"] == 0
    assert b["teacher_weights"] == 4 * p_t  # the Distiller keeps the big teacher on the device
    assert set(lcm["fewstep"]["phases"]) == {"student"} and b["step_activations_and_grads"] > 0
    # DMD: the fake score (an fp32 copy of the step teacher) with its AdamW states and the GAN head
    d, f = dmd["bytes"], dmd["fewstep"]["params"]
    assert d["fake_score"] == 4 * p_s and d["gan_head"] == 4 * f["gan_head"] > 0
    assert d["fake_optimizer_states"] == 8 * (p_s + f["gan_head"]) and d["lcm_target"] == 0
    assert set(dmd["fewstep"]["phases"]) == {"fake_score_update", "generator"}
    assert d["step_activations_and_grads"] == max(dmd["fewstep"]["phases"].values())
    for p in (lcm, dmd):
        b = p["bytes"]
        parts = [k for k in b if k not in ("step_activations_and_grads", "optimizer_step", "total")]
        assert b["total"] == sum(b[k] for k in parts) + max(b["step_activations_and_grads"], b["optimizer_step"])
    assert dmd["bytes"]["total"] > lcm["bytes"]["total"] > kd["bytes"]["total"]
    text = plan_markdown(dmd)
    assert "DMD fake score (fp32, trained)" in text and "DMD fake-score update" in text
    assert "step teacher (frozen copy, fp32)" in plan_markdown(lcm) and "LCM target network" in plan_markdown(lcm)


def test_step_teacher_counted_once_when_it_is_the_teacher(plans):
    one = _plan("tiny-fewstep")  # fewstep.teacher=teacher, KD terms alongside
    assert one["bytes"]["step_teacher"] == 0 and one["fewstep"]["params"]["step_teacher"] == 0
    assert one["bytes"]["teacher_weights"] == plans["lcm"]["bytes"]["teacher_weights"] == 4 * one["params"]["teacher"]
    assert "step teacher" not in plan_markdown(one)
    assert one["feature_pairs"] > 0  # the one-stage KD terms' feature pairs are simulated too
    dmd = _plan("tiny-dmd", "fewstep.teacher=teacher", "fewstep.gan_weight=0")  # the fake score copies the teacher
    assert dmd["bytes"]["fake_score"] == 4 * dmd["params"]["teacher"] and dmd["bytes"]["step_teacher"] == 0
    assert dmd["bytes"]["gan_head"] == 0 and "GAN head (fp32)" not in plan_markdown(dmd)
    no_target = _plan("tiny-fewstep", *TWO_STAGE, "fewstep.target_decay=0")
    assert no_target["bytes"]["lcm_target"] == 0 and "LCM target" not in plan_markdown(no_target)


def test_lora_mode_trains_only_the_adapters(plans):
    full = plans["lcm"]
    lora = _plan("tiny-fewstep", *TWO_STAGE, "fewstep.lora_rank=4")
    n = lora["fewstep"]["params"]["lora"]
    assert 0 < n < lora["params"]["student"]
    assert lora["bytes"]["optimizer_states"] == 8 * n and lora["bytes"]["student_weights"] == 4 * (
        lora["params"]["student"] + n
    )
    assert lora["bytes"]["total"] < full["bytes"]["total"]


def test_fsdp_estimate_when_it_does_not_fit(plans):
    p = plans["dmd"]
    est = p["fewstep"]["fsdp_estimate"]
    assert not p["fits"] and est["processes"] == 4 and est["supported"] is False
    assert est["full"] < est["grad_op"] < p["bytes"]["total"] and est["fits"] == {"grad_op": False, "full": False}
    text = plan_markdown(p)
    assert "with train.fsdp over 4 processes" in text and "refuses train.fsdp for now" in text
    fits = plans["lcm"]
    assert fits["fits"] and fits["fewstep"]["fsdp_estimate"]["processes"] == 8  # one process planned: 8 assumed
    assert "train.fsdp over" not in plan_markdown(fits)


def test_missing_student_path_names_the_fix():
    with pytest.raises(KoalaError, match="student.path=null"):
        _plan("tiny-fewstep", "student.path=runs/no-such-student/unet")


def test_dit_family_plans_lcm():
    p = _plan("tiny-dit", "fewstep.method=lcm", *TWO_STAGE, "student.preset=dit-m", teacher="tiny-pixart-sigma-xl")
    assert p["family"] == "pixart" and p["bytes"]["lcm_target"] == 4 * p["params"]["student"]


@pytest.mark.slow
def test_real_size_fewstep_plans():
    """The shipped recipes at 1024² against SDXL-Base (meta device, no weights): KOALA-700M's 782.8M parameters
    in each part that copies it, the one-stage DMD's fake score a copy of the 2.57B teacher."""
    p_s, p_t = 782_822_724, 2_567_463_684
    lcm = plan_memory(load_config("koala-700m-lcm", ["student.path=null"]), teacher="sdxl-base", device_gib=80)
    assert lcm["params"]["student"] == p_s and lcm["bytes"]["step_teacher"] == 2 * p_s  # fp16 copy
    assert lcm["bytes"]["lcm_target"] == 4 * p_s and lcm["fits"]
    dmd = plan_memory(
        load_config("koala-700m-dmd", ["student.path=null", "fewstep.teacher=teacher"]), teacher="sdxl-base"
    )
    assert dmd["bytes"]["fake_score"] == 4 * p_t and dmd["bytes"]["total"] > lcm["bytes"]["total"]


@pytest.mark.parametrize("recipe", ["tiny-fewstep", "tiny-dmd"])
def test_bench_train_times_the_step_objective(recipe):
    """`koala bench train` on random tiny models (no text encoders: a stand-in empty prompt for the guidance), two
    stages (the step teacher a copy of the student): finite losses, the objective's forwards in the MFU."""
    from koala.bench.train import TrainBenchSettings, objective_forwards, run_train_bench

    s = TrainBenchSettings(
        teacher=TINY,
        config=recipe,
        overrides=TWO_STAGE,
        resolution=64,
        batch=2,
        steps=1,
        warmup=1,
        device="cpu",
        threads=1,
        peak_tflops=1.0,
    )
    r = run_train_bench(s, log=lambda *_: None)
    assert r["models"]["fewstep"] == recipe.split("-")[1].replace("fewstep", "lcm")
    assert all(math.isfinite(x) for x in r["losses"]) and r["flops"]["mfu"] > 0
    fl = r["flops"]
    assert fl["step_teacher_forward"] == fl["student_forward"]  # fewstep.teacher=student
    assert fl["forwards"] == objective_forwards(load_config(recipe, TWO_STAGE), 2, False)
    assert fl["per_sample"] > 3 * fl["student_forward"] and r["times_ms"]["phases_median"]["teacher_forward"] < 50
