"""`koala demo --fast`: the whole method end to end in the embedded shapes world (seconds, CPU)."""

import json
import os

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from PIL import Image

from koala.arch import LayerMap
from koala.cli import main


def test_demo_few_step_adds_the_step_stage_and_its_rows(tmp_path, capsys):
    """``koala demo --few-step``: a step-distillation stage from the KD student (LCM, the KD student as step teacher),
    and rows, each with its stage and sampling steps: the KD student at 4 / 2 / 1 Euler steps and the few-step
    student at 4 / 2 / 1 steps of its recorded sampler (LCMScheduler, cfg 1); the grid shows the same rows."""
    from koala.families.sampling import sampling_defaults_of

    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--few-step", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    got = [(r["stage"], r["sample_steps"], r["guidance"]) for r in res["rows"]]
    kd = [("kd", n, 5.0) for n in (4, 2, 1)]
    few = [("few-step", n, 1.0) for n in (4, 2, 1)]
    assert got == [("teacher", 2, 5.0), ("before-kd", 2, 5.0), ("kd", 2, 5.0), *kd, *few]
    assert len({r["latency_ms"] for r in res["rows"] if r["stage"] == "few-step"}) == 1  # one model, timed once
    few_dir = res["few_step_student"]
    rec = sampling_defaults_of(few_dir)
    assert (rec.scheduler, rec.steps, rec.guidance_scale) == ("LCMScheduler", 4, 1.0)
    recipe = yaml.safe_load((out / "fewstep" / "config.yaml").read_text())
    assert recipe["fewstep"]["method"] == "lcm" and recipe["student"]["path"] == res["student"]
    assert recipe["loss"] == {"task": 0.0, "out": 0.0, "feat": 0.0}
    assert Image.open(out / "grid.png").size[1] >= 9 * 96
    assert "few-step" in capsys.readouterr().out


def test_demo_fast_end_to_end(tmp_path, capsys):
    from koala.lab.models import shapes_teacher_dir

    try:
        teacher = shapes_teacher_dir()
    except Exception as err:  # the packaged teacher is part of the repo; its absence is a real failure
        pytest.fail(f"packaged shapes teacher missing: {err}")
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread settings do not leak into the caller
    printed = capsys.readouterr().out
    assert "binding" in printed and str(out) in printed
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"teacher", "student, before KD", "student, after KD"}
    t, s = rows["teacher"], rows["student, after KD"]
    assert s["params"] < 0.5 * t["params"] and s["latency_ms"] > 0
    for r in rows.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("color", "shape", "binding", "spatial"))
    grid = Image.open(out / "grid.png").convert("L")
    head = grid.size[1] - 3 * 96  # the prompts, wrapped, above the image columns
    assert 0 < head < 96 and min(grid.crop((150, 0, 150 + 96, head)).getdata()) < 128  # text drawn there
    # the student trained on the images encoded once (koala.data's cache), all of them
    index = json.loads((out / "cache" / "index.json").read_text())
    assert index["complete"] and index["num_samples"] == res["settings"]["num_train"]
    recipe = yaml.safe_load((out / "distill" / "config.yaml").read_text())
    assert recipe["data"]["type"] == "cache" and recipe["train"]["fused_optimizer"] is True
    # with 2 or more cores the teacher ran in a process of its own (train.teacher_worker), one core each
    two_cores = (os.cpu_count() or 1) >= 2
    assert recipe["train"]["teacher_worker"] is two_cores and res["settings"]["teacher_worker"] is two_cores
    assert recipe["train"]["cpu_threads"] == max(1, (os.cpu_count() or 1) // (2 if two_cores else 1))
    student = UNet2DConditionModel.from_pretrained(res["student"])
    assert student.mid_block is None  # KOALA-700M topology
    teacher_unet = UNet2DConditionModel.from_pretrained(os.path.join(teacher, "unet"))
    LayerMap.load(res["student"]).validate(teacher_unet, student)
    # the student checkpoint's model card lists the measured shapes-world results
    from koala.card import read_card

    meta, body = read_card(os.path.join(os.path.dirname(res["student"]), "README.md"))
    assert meta["pipeline_tag"] == "text-to-image" and "## Results" in body
    assert f"| student, after KD | kd | 2 | {s['params']} |" in body and f"{100 * t['color']:.1f}%" in body
    assert [(r["stage"], r["sample_steps"]) for r in res["rows"]] == [("teacher", 2), ("before-kd", 2), ("kd", 2)]
    # A second run into the same directory is refused without --overwrite, and leaves it intact.
    assert main(["demo", "--fast", "--out", str(out)]) == 2
    assert (out / "results.json").exists()


@pytest.mark.slow
def test_demo_trains_on_two_processes(tmp_path, capfd):
    """--processes 2: the distillation runs under `accelerate launch` on 2 CPU processes, each with half the batch
    (without teacher workers: the fast run above covers those)."""
    out = tmp_path / "demo2"
    assert main(["demo", "--fast", "--processes", "2", "--no-teacher-worker", "--out", str(out)]) == 0
    log = capfd.readouterr()
    log = log.out + log.err
    assert "[rank 0/2]: finished at step 4" in log and "[rank 1/2]: finished at step 4" in log
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["processes"] == 2 and res["student"].endswith(os.path.join("step-0000004", "unet"))
    # the trained student differs from its initialisation (the launched run really trained it)
    init = UNet2DConditionModel.from_pretrained(str(out / "student-init" / "unet")).state_dict()
    trained = UNet2DConditionModel.from_pretrained(res["student"]).state_dict()
    assert max(float((init[k] - trained[k]).abs().max()) for k in init) > 1e-6


@pytest.mark.parametrize("option", [["--processes", "0"], ["--threads", "-1"]])
def test_demo_refuses_bad_process_and_thread_counts(tmp_path, capsys, option):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out), *option]) == 2
    assert option[0].lstrip("-") in capsys.readouterr().err and not out.exists()
