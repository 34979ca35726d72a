"""Model cards: compress and every distill checkpoint write a README.md in the Hugging Face model-card format."""

import os
import shutil

from koala.card import read_card


def test_compress_writes_a_card_with_the_teachers_license(tiny_pipe_dir, tmp_path):
    from koala.compress import compress

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pipe_dir, teacher)
    (teacher / "README.md").write_text(
        "---\nlicense: openrail++\nbase_model: stabilityai/stable-diffusion-xl-base-1.0"
        "\n---\n# the teacher's own card\n"
    )
    res = compress(str(teacher), "koala-700m", str(tmp_path / "student"))
    meta, body = read_card(str(tmp_path / "student" / "README.md"))
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "openrail++" and meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "koala" in meta["tags"] and "sdxl" in meta["tags"]
    assert "the teacher's own card" not in body  # the student's card replaces the copied one
    assert f"{res.student_params:,} | {res.teacher_params:,}" in body and "| DW-3 |" in body
    assert "Euler, 10 steps, guidance scale 3.5" in body and "Not trained yet" in body and "--model THIS_DIR" in body
    # a U-Net alone: the card sits beside its config.json; no teacher card, so no license is claimed
    compress(os.path.join(tiny_pipe_dir, "unet"), "koala-1b", str(tmp_path / "unet-only"))
    meta, _ = read_card(str(tmp_path / "unet-only" / "README.md"))
    assert "license" not in meta and meta["base_model"] == "unet"


def test_distill_checkpoints_carry_a_card(tiny_pipe_dir, tmp_path):
    from koala.distill import load_config
    from koala.distill.trainer import train

    out = train(
        load_config(
            "tiny",
            [
                f"teacher.pipeline={tiny_pipe_dir}",
                f"train.output_dir={tmp_path / 'run'}",
                "train.max_steps=2",
                "train.batch_size=2",
                "train.progress=false",
                "validation.every=0",
            ],
        )
    )
    meta, body = read_card(os.path.join(out["checkpoint"], "README.md"))
    assert meta["pipeline_tag"] == "text-to-image"
    assert "for 2 steps at a global batch of 4" in body and "feature KD: SA at" in body  # 2 x grad_accum 2
    assert "# koala-700m" in body and "--unet THIS_DIR/unet --base TEACHER_PIPELINE" in body


def test_results_section_is_added_and_replaced(tiny_pipe_dir, tmp_path):
    from koala.card import add_results
    from koala.compress import compress

    compress(tiny_pipe_dir, "koala-700m", str(tmp_path / "s"))
    rows = [{"model": "student", "binding": "42.0%"}]
    add_results(str(tmp_path / "s"), rows, ["model", "binding", "spatial"], "Measured by a test.")
    add_results(str(tmp_path / "s"), [{"model": "student", "binding": "50.0%"}], ["model", "binding"], "Again.")
    meta, body = read_card(str(tmp_path / "s" / "README.md"))
    assert meta["library_name"] == "diffusers" and body.count("## Results") == 1
    assert "| student | 50.0% |" in body and "42.0%" not in body and "Again." in body and "## Layer map" in body
