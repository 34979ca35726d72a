"""train.teacher_worker: the teacher in a second process, a micro-batch ahead (koala.distill.teacher_worker)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from koala import KoalaError
from koala.distill import FeatureRecorder, load_config


def _cfg(pipe_dir, out, *extra):
    return load_config(
        "tiny",
        [
            f"teacher.pipeline={pipe_dir}",
            f"train.output_dir={out}",
            "train.progress=false",
            "validation.every=0",
            "data.num_samples=4",
            "train.log_every=1",
            "train.cpu_threads=1",
            *extra,
        ],
    )


def _weights(ckpt):
    return load_file(os.path.join(ckpt, "unet", "diffusion_pytorch_model.safetensors"))


def _losses(out):
    return [
        {k: v for k, v in json.loads(line).items() if k.startswith(("loss", "feat"))}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_teacher_worker_trains_the_same_weights_and_resumes_exactly(tiny_pipe_dir, tmp_path):
    """With the worker (teacher one micro-batch ahead in another process) the run logs the same losses and ends
    on the same weights as the in-process teacher, bit for bit; stopped and resumed, it ends there too."""
    from koala.distill.trainer import train

    common = (
        "train.max_steps=2",
        "train.grad_accum=2",
        "train.batch_size=1",
        "train.caption_dropout=0.5",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=0",
        "train.ema.decay=0.9",
    )
    plain = train(_cfg(tiny_pipe_dir, tmp_path / "plain", *common))
    worker = train(_cfg(tiny_pipe_dir, tmp_path / "worker", *common, "train.teacher_worker=true"))
    assert plain["step"] == worker["step"] == 2 and plain["feature_pairs"] == worker["feature_pairs"] > 0
    logged = _losses(tmp_path / "plain")
    assert len(logged) == 2 and logged == _losses(tmp_path / "worker")
    wa, wb = _weights(plain["checkpoint"]), _weights(worker["checkpoint"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    mid = os.path.join(tmp_path / "worker", "checkpoints", "step-0000001")
    resumed = train(
        _cfg(tiny_pipe_dir, tmp_path / "resumed", *common, "train.teacher_worker=true", f"train.resume={mid}")
    )
    wr = _weights(resumed["checkpoint"])
    assert resumed["step"] == 2 and all(torch.equal(wa[k], wr[k]) for k in wa)


def test_teacher_worker_reports_failures(tiny_teacher):
    """A failing forward comes back as the worker's traceback; a dead worker is named; hooks must come after."""
    from koala.distill.teacher_worker import TeacherWorker

    c = tiny_teacher.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cond = {
        "prompt_embeds": torch.randn(1, 7, c.cross_attention_dim),
        "pooled_prompt_embeds": torch.randn(1, pooled),
        "add_time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]),
    }
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    w = TeacherWorker(tiny_teacher, "sdxl", names, torch.float32, threads=1)
    try:
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
        w.submit(x, t, cond)
        out, feats = w.result()
        # what the worker computed is the in-process forward, features included (one thread in both)
        rec = FeatureRecorder(tiny_teacher, names, "teacher")
        with torch.no_grad(), rec.capture():
            ref = tiny_teacher(
                x,
                t,
                encoder_hidden_states=cond["prompt_embeds"],
                added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]},
            ).sample
        ref_feats = rec.pop()
        assert torch.equal(out, ref) and set(feats) == set(names) and torch.equal(feats[names[0]], ref_feats[names[0]])
        rec.remove()
        w.submit(torch.randn(1, 3, 8, 8), torch.tensor([10]), cond)  # 3 channels: the U-Net's conv_in refuses
        with pytest.raises(KoalaError, match="teacher worker process .* failed:(.|\n)*channels"):
            w.result()
        w.process.kill()
        w.process.join(10)
        with pytest.raises(KoalaError, match="ended unexpectedly"):
            w.submit(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond)
            w.result()
    finally:
        w.close()
    rec = FeatureRecorder(tiny_teacher, names, "teacher")
    with pytest.raises(RuntimeError, match="before registering hooks"):
        TeacherWorker(tiny_teacher, "sdxl", names, torch.float32)
    rec.remove()
    with pytest.raises(KoalaError, match="train.teacher_worker"):
        TeacherWorker(tiny_teacher.to("meta"), "sdxl", names, torch.float32)


@pytest.mark.slow
def test_unclosed_teacher_worker_does_not_hold_up_exit():
    """A worker its owner never closed ends with the interpreter (multiprocessing joins its children at exit)."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom koala import KoalaError\nfrom koala.distill.teacher_worker import TeacherWorker\n"
        "w = TeacherWorker(torch.nn.Linear(2, 2), 'sdxl', [], torch.float32, threads=1)\n"
        "w.submit(torch.zeros(1, 2), torch.zeros(1), {})\n"
        "try:\n    w.result()\nexcept KoalaError:\n    print('started', flush=True)\n"
    )
    # the worker has answered once (a failed forward), so it is up and waiting for the next input
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-2000:]
