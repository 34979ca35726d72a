"""Self-attention KD engine and trainer (issue #3) on tiny CPU models."""

import os

import pytest
import torch
from safetensors.torch import load_file

from koala import KoalaError
from koala.distill import FeatureRecorder, feature_pairs, kd_losses, load_config, prediction_target
from koala.distill.config import LossConfig
from koala.distill.losses import feature_losses
from koala.families import get_family
from koala.testing.tiny import tiny_unet
from tiny_runs import tiny_run_config

compress_unet, teacher_spec = get_family("sdxl").compress, get_family("sdxl").teacher_spec


ALL = {"SA": "all", "CA": "all", "FFN": "all", "Res": "all", "LF": "all"}


def _inputs(unet, batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor([10, 700][:batch]),
        encoder_hidden_states=torch.randn(batch, 7, c.cross_attention_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch),
        },
    )


def _run(student, teacher, pairs, inputs):
    s_rec = FeatureRecorder(student, [p.student for p in pairs], "student")
    t_rec = FeatureRecorder(teacher, [p.teacher for p in pairs], "teacher")
    with torch.no_grad(), t_rec.capture():
        t_out = teacher(**inputs).sample
    with s_rec.capture():
        s_out = student(**inputs).sample
    losses = kd_losses(
        s_out, torch.zeros_like(s_out), t_out, pairs, s_rec.pop(), t_rec.pop(), LossConfig(1.0, 1.0, 1.0)
    )
    s_rec.remove(), t_rec.remove()
    return losses


def test_featkd_exactly_zero_when_student_is_teacher(tiny_teacher):
    student, lmap = compress_unet(tiny_teacher, teacher_spec(dict(tiny_teacher.config)))
    pairs = feature_pairs(lmap, student, tiny_teacher, ALL)
    assert {p.type for p in pairs} == set(ALL) and len(pairs) > 40
    losses = _run(student, tiny_teacher, pairs, _inputs(tiny_teacher))
    assert float(losses.feat) == 0.0 and float(losses.out) == 0.0
    assert all(float(v) == 0.0 for v in losses.per_pair.values()) and len(losses.per_pair) == len(pairs)
    # a perturbed student is not zero (the test can fail)
    with torch.no_grad():
        student.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0].bias.add_(0.1)
    assert float(_run(student, tiny_teacher, pairs, _inputs(tiny_teacher)).feat) > 0


def test_default_pairs_are_sa_bottom_plus_lf_at_dw1_up3(tiny_teacher):
    student, lmap = compress_unet(tiny_teacher, "koala-700m")
    cfg = load_config("tiny", ["teacher.pipeline=x"])
    pairs = feature_pairs(lmap, student, tiny_teacher, cfg.kd.features)
    by = {}
    for p in pairs:
        by.setdefault((p.type, p.stage), []).append(p)
    # KOALA-700M: no mid block, so SA at DW-2, DW-3, UP-1, UP-2; LF where SA is absent (Table 10d).
    assert set(by) == {("SA", "DW-2"), ("SA", "DW-3"), ("SA", "UP-1"), ("SA", "UP-2"), ("LF", "DW-1"), ("LF", "UP-3")}
    up1 = by[("SA", "UP-1")]
    assert all(p.student.endswith(".attn1") for p in up1)
    assert [p.teacher.split(".")[-2] for p in up1[:5]] == ["0", "1", "2", "3", "4"]  # SA-bottom
    assert by[("LF", "DW-1")][0].student == "down_blocks.0" and by[("LF", "UP-3")][0].teacher == "up_blocks.2"
    inter = feature_pairs(lmap, student, tiny_teacher, {"SA": ["UP-1"]}, "interleave")
    assert [int(p.teacher.split(".")[-2]) for p in inter[:5]] == [0, 2, 4, 6, 8]
    up = feature_pairs(lmap, student, tiny_teacher, {"SA": ["UP-1"]}, "up")
    assert [int(p.teacher.split(".")[-2]) for p in up[:5]] == [5, 6, 7, 8, 9]
    with pytest.raises(KoalaError, match="DW-1"):
        feature_pairs(lmap, student, tiny_teacher, {"SA": ["DW-1"]})
    with pytest.raises(KoalaError, match="MID"):
        feature_pairs(lmap, student, tiny_teacher, {"SA": ["MID"]})
    # the features have the shapes the losses need, and the loss is finite and positive
    losses = _run(student, tiny_teacher, pairs, _inputs(tiny_teacher))
    assert torch.isfinite(losses.total) and float(losses.feat) > 0
    assert {k[5:] for k in losses.scalars(pairs) if k.startswith("feat/")} == {
        "DW-1",
        "DW-2",
        "DW-3",
        "UP-1",
        "UP-2",
        "UP-3",
    }
    # per-layer normalisation divides each pair's MSE by the teacher feature's mean square
    s_rec, t_rec = FeatureRecorder(student, [pairs[0].student]), FeatureRecorder(tiny_teacher, [pairs[0].teacher])
    x = _inputs(tiny_teacher)
    with torch.no_grad(), s_rec.capture(), t_rec.capture():
        student(**x), tiny_teacher(**x)
    sf, tf = s_rec.pop(), t_rec.pop()
    plain = feature_losses(pairs[:1], sf, tf)[pairs[0].name]
    normed = feature_losses(pairs[:1], sf, tf, "mse_teacher_norm")[pairs[0].name]
    torch.testing.assert_close(normed, plain / tf[pairs[0].teacher].pow(2).mean())
    cos = feature_losses(pairs[:1], sf, tf, "cosine")[pairs[0].name]
    ref = 1 - torch.nn.functional.cosine_similarity(sf[pairs[0].student], tf[pairs[0].teacher], dim=-1).mean()
    torch.testing.assert_close(cos, ref)
    assert float(feature_losses(pairs[:1], tf, tf, "cosine")[pairs[0].name]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KoalaError, match="kd.feature_loss"):
        feature_losses(pairs[:1], sf, tf, "l1")


def test_hooks_under_gradient_checkpointing_same_loss_and_grads(tiny_teacher):
    results = []
    for ckpt in (False, True):
        student, lmap = compress_unet(tiny_teacher, "koala-700m")
        student.train()
        if ckpt:
            student.enable_gradient_checkpointing()
        pairs = feature_pairs(lmap, student, tiny_teacher, ALL)
        s_rec = FeatureRecorder(student, [p.student for p in pairs], "student")
        t_rec = FeatureRecorder(tiny_teacher, [p.teacher for p in pairs], "teacher")
        inputs = _inputs(tiny_teacher)
        with torch.no_grad(), t_rec.capture():
            tiny_teacher(**inputs)
        with s_rec.capture():
            student(**inputs)
        per_pair = feature_losses(pairs, s_rec.pop(), t_rec.pop())
        loss = torch.stack(list(per_pair.values())).sum()
        loss.backward()  # recomputation re-runs the hooked modules: must not record or raise
        assert s_rec.features == {} and t_rec.features == {}
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
        s_rec.remove(), t_rec.remove()
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6) and set(g0) == set(g1) and len(g0) > 50
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_prediction_targets():
    from diffusers import DDPMScheduler

    lat, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([3, 900])
    assert prediction_target(DDPMScheduler(prediction_type="epsilon"), lat, noise, t) is noise
    assert prediction_target(DDPMScheduler(prediction_type="sample"), lat, noise, t) is lat
    s = DDPMScheduler(prediction_type="v_prediction")
    a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    b = (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(prediction_target(s, lat, noise, t), a * noise - b * lat)


# --------------------------------------------------------------------------- trainer (tiny pipeline) ------
def _cfg(pipe_dir, out, *extra):
    return tiny_run_config("tiny", pipe_dir, out, *extra)


def test_overfit_one_batch_loss_falls_teacher_frozen_and_dropout(tiny_pipe_dir, tmp_path):
    from accelerate import Accelerator

    from koala.data import make_dataloader
    from koala.distill.models import encode_batch
    from koala.distill.step import Distiller, sample_generators

    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", "train.lr=3e-4", "train.caption_dropout=0.0")
    d = Distiller(cfg, Accelerator(cpu=True))
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    batch = next(iter(make_dataloader(cfg.data, batch_size=2, resolution=32)))
    first = None
    for i in range(12):
        # same noise/timesteps every step; micro_step runs the backward
        losses = d.micro_step(d.kd_item(batch, sample_generators(0, 0, 0, 2, 1)))
        first = first if first is not None else losses
        d.optimizer.step()
        d.optimizer.zero_grad()
    assert float(losses.total) < 0.7 * float(first.total)
    assert float(losses.feat) < float(first.feat) and float(losses.out) < float(first.out)
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in d.teacher.parameters())
    # the raw path equals an independent reference: diffusers' own prompt encoding and VAE posterior sample
    from diffusers import StableDiffusionXLPipeline

    def gens(seed):
        return [torch.Generator().manual_seed(seed + i) for i in range(2)]

    lat, cond = encode_batch(batch, d.frozen, "cpu", gens(3))
    pe, pooled, ids = cond["prompt_embeds"], cond["pooled_prompt_embeds"], cond["add_time_ids"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir)
    ref_pe, _, ref_pooled, _ = pipe.encode_prompt(batch["captions"], do_classifier_free_guidance=False)
    with torch.no_grad():
        post = pipe.vae.encode(batch["pixel_values"]).latent_dist
    ref_lat = (
        torch.cat(
            [
                post.mean[i : i + 1] + post.std[i : i + 1] * torch.randn(post.mean.shape[1:], generator=g)
                for i, g in enumerate(gens(3))
            ]
        )
        * pipe.vae.config.scaling_factor
    )
    assert lat.dtype == pe.dtype == torch.float32
    assert torch.allclose(lat, ref_lat, atol=1e-6) and torch.equal(pe, ref_pe) and torch.equal(pooled, ref_pooled)
    ref_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1).float()
    assert torch.equal(ids, ref_ids)
    # caption dropout gives zero prompt and pooled embeddings (SDXL's empty-prompt uncond)
    _, dropped = encode_batch(batch, d.frozen, "cpu", gens(0), caption_dropout=1.0)
    assert not dropped["prompt_embeds"].any() and not dropped["pooled_prompt_embeds"].any()
    assert dropped["add_time_ids"].shape == (2, 6) and dropped["add_time_ids"].any()
    # a cached batch (latents + embeddings from koala.data's cache) is used as is
    lat, cond = encode_batch(batch, d.frozen, "cpu", gens(0))
    cached = {"latents": lat, **cond, "captions": batch["captions"]}
    lat2, cond2 = encode_batch(cached, d.frozen, "cpu", gens(0))
    assert torch.equal(lat2, lat) and all(torch.equal(cond2[k], cond[k]) for k in cond)
    assert torch.isfinite(d.micro_step(d.kd_item(cached, sample_generators(0, 1, 0, 2, 1))).total)
    d.s_rec.remove(), d.t_rec.remove()


def _launch(port: int) -> list[str]:
    """`accelerate launch` on 2 CPU processes (the script or `-m module` and its arguments follow)."""
    import sys

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "--main_process_port", str(port)]


def _launch_distill(port: int) -> list[str]:
    """`accelerate launch` of `koala distill --config tiny` on 2 CPU processes (the overrides follow)."""
    return [*_launch(port), "-m", "koala.cli", "distill", "--config", "tiny"]


def _weights(ckpt, sub="unet"):
    return load_file(os.path.join(ckpt, sub, "diffusion_pytorch_model.safetensors"))


def test_resume_equivalence(tiny_pipe_dir, tmp_path):
    from koala.distill.trainer import train

    common = ("train.grad_accum=2", "train.batch_size=1", "train.ema.decay=0.9", "train.caption_dropout=0.5")
    full = train(_cfg(tiny_pipe_dir, tmp_path / "a", "train.max_steps=6", *common))
    train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=3", *common))
    resumed = train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=6", "train.resume=latest", *common))
    assert full["step"] == resumed["step"] == 6
    for sub in ("unet", "unet_ema"):
        wa, wb = _weights(full["checkpoint"], sub), _weights(resumed["checkpoint"], sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (sub, k)
    # the saved student is a plain diffusers U-Net with its layer map
    from diffusers import UNet2DConditionModel

    from koala.arch import LayerMap

    UNet2DConditionModel.from_pretrained(os.path.join(resumed["checkpoint"], "unet"))
    assert LayerMap.load(os.path.join(resumed["checkpoint"], "unet")).of_kind("transformer_layer")
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"feat/UP-1"' in lines[-1]


def test_lr_schedules_warm_up_decay_and_resume_exactly(tiny_pipe_dir, tmp_path):
    """train.lr_schedule / lr_warmup_steps: the factor per update, the rate each step logs, and a run resumed
    mid-schedule from a checkpoint ends bit-equal to the uninterrupted run (the rate is a function of the step)."""
    import json
    import math
    from dataclasses import replace

    from koala.distill.checkpoint import list_checkpoints
    from koala.distill.config import TrainConfig
    from koala.distill.step import lr_factor
    from koala.distill.trainer import train

    t = TrainConfig(max_steps=10, lr_warmup_steps=2, lr_schedule="cosine")
    assert [lr_factor(s, t) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, t) == 1.0 and math.isclose(lr_factor(6, t), 0.5) and 0 < lr_factor(9, t) < 0.05
    assert [lr_factor(s, replace(t, lr_schedule="linear")) for s in (2, 6)] == [1.0, 0.5]
    assert {lr_factor(s, replace(t, lr_schedule="constant")) for s in range(2, 10)} == {1.0}
    with pytest.raises(KoalaError, match="train.lr_schedule"):
        _cfg(tiny_pipe_dir, tmp_path / "x", "train.lr_schedule=step")

    common = (
        "train.max_steps=8",
        "train.lr=1e-3",
        "train.lr_schedule=cosine",
        "train.lr_warmup_steps=2",
        "train.batch_size=1",
        "train.keep_checkpoints=0",
        "train.checkpoint_every=4",
    )
    full = train(_cfg(tiny_pipe_dir, tmp_path / "a", *common))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(
        [1e-3 * lr_factor(s, TrainConfig(max_steps=8, lr_warmup_steps=2, lr_schedule="cosine")) for s in range(8)]
    )
    mid = dict(list_checkpoints(str(tmp_path / "a")))[4]
    resumed = train(_cfg(tiny_pipe_dir, tmp_path / "b", *common, f"train.resume={mid}"))
    wa, wb = _weights(full["checkpoint"]), _weights(resumed["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_pipe_dir, tmp_path):
    from koala.distill.trainer import train

    cfg = _cfg(
        tiny_pipe_dir,
        tmp_path / "run",
        "train.max_steps=6",
        "train.checkpoint_every=1",
        "train.lr=1e30",
        "train.max_grad_norm=null",
        "train.ema.enabled=false",
    )
    with pytest.raises(KoalaError, match="non-finite loss") as err:
        train(cfg)
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts and all(c.startswith("step-") for c in ckpts)  # no half-written temp dirs
    assert ckpts[-1] in str(err.value)
    w = _weights(str(tmp_path / "run" / "checkpoints" / ckpts[-1]))
    assert all(torch.isfinite(v).all() for v in w.values())


def test_layer_map_that_does_not_fit_is_refused(tiny_pipe_dir, tmp_path):
    from koala.distill.models import load_models

    other = tiny_unet(seed=1, channels=(16, 32, 48))
    student, lmap = compress_unet(other, "koala-700m")
    student.save_pretrained(tmp_path / "student")
    lmap.save(tmp_path / "student")
    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", f"student.path={tmp_path / 'student'}")
    with pytest.raises(KoalaError, match="layer map does not fit"):
        load_models(cfg)


def test_cli_tiny_runs_and_8bit_adam_error(tiny_pipe_dir, tmp_path, capsys):
    from koala.cli import main

    args = [
        "distill",
        "--config",
        "tiny",
        f"teacher.pipeline={tiny_pipe_dir}",
        f"train.output_dir={tmp_path / 'r'}",
        "train.max_steps=2",
        "train.progress=false",
        "validation.every=2",
        "validation.steps=1",
    ]
    assert main(args) == 0
    assert "finished at step 2" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "r" / "samples" / "step-0000002")) == 2
    assert len(os.listdir(tmp_path / "r" / "samples" / "teacher")) == 2
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "r" / "logs"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert main([*args, "train.optimizer=adamw8bit"]) == 2
        assert "bitsandbytes" in capsys.readouterr().err
    assert main(["distill", "--config", "tiny", "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_pipe_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) x batch 1 trains the same weights as 1 process x batch 2
    (same samples, same per-sample noise; equal up to float summation order), each checkpoint is written once,
    and resuming that run on another number of processes is refused unless allowed."""
    import subprocess

    from koala.distill.trainer import train

    common = [
        f"teacher.pipeline={tiny_pipe_dir}",
        "train.max_steps=2",
        "train.checkpoint_every=1",
        "train.grad_accum=2",
        "data.num_samples=8",
        "train.progress=false",
        "validation.every=0",
        "train.caption_dropout=0.5",
        # Adam divides by sqrt(v): for near-zero gradients float summation order can flip an update's sign
        # (a difference of lr); with eps >> |g| the step is linear in the gradient and differences stay ~1e-7
        "train.adam_eps=1.0",
        "train.lr=0.05",
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out2 = tmp_path / "two"
    cmd = [
        *_launch_distill(29533),
        f"train.output_dir={out2}",
        "train.batch_size=1",
        *common,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "[rank 0/2]: finished at step 2" in log and "[rank 1/2]: finished at step 2" in log
    for step in (1, 2):
        assert log.count(f"checkpoint saved: {out2}/checkpoints/step-{step:07d}") == 1
    assert sorted(os.listdir(out2 / "checkpoints")) == ["step-0000001", "step-0000002"]
    one = train(load_config("tiny", [f"train.output_dir={tmp_path / 'one'}", "train.batch_size=2", *common]))
    for sub in ("unet", "unet_ema"):
        wa, wb = _weights(one["checkpoint"], sub), _weights(str(out2 / "checkpoints" / "step-0000002"), sub)
        assert wa.keys() == wb.keys()
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert diff < 1e-5, (sub, diff)
    # the weights moved: equality is not the trivial "nothing was trained"
    init = _weights(str(out2 / "checkpoints" / "step-0000001"))
    assert max(float((init[k] - wb[k]).abs().max()) for k in wb) > 1e-4
    resume = load_config("tiny", [f"train.output_dir={out2}", "train.batch_size=1", "train.resume=latest", *common])
    resume.train.max_steps = 3
    with pytest.raises(KoalaError, match=r"processes 2 -> 1; global batch 4 -> 2.*allow_world_size_change"):
        train(resume)
    resume.train.batch_size = 2  # same global batch on 1 process: still another layout (data split, noise)
    with pytest.raises(KoalaError, match=r"processes 2 -> 1, train.batch_size 1 -> 2"):
        train(resume)


# --------------------------------------------------------------------------- real data (koala.data) ------
def _image_folder(path, n=6):
    """n small images of mixed sizes + metadata.jsonl (HF imagefolder convention)."""
    import json

    from koala.testing.images import random_caption, random_image

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for i in range(n):
            h, w = ((40, 56), (64, 48), (36, 36))[i % 3]
            random_image(h, w, i).save(os.path.join(path, f"{i:03d}.png"))
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": random_caption(i, 4)}) + "\n")
    return str(path)


def test_cli_distill_on_image_folder(tiny_pipe_dir, tmp_path, capsys):
    from koala.cli import main

    folder = _image_folder(tmp_path / "images")
    out = tmp_path / "r"
    args = [
        "distill",
        "--config",
        "tiny",
        f"teacher.pipeline={tiny_pipe_dir}",
        f"train.output_dir={out}",
        "train.max_steps=3",
        "train.grad_accum=1",
        "train.progress=false",
        "validation.every=0",
        "data.type=folder",
        f"data.path={folder}",
    ]  # tiny's num_samples: ignored
    assert main(args) == 0
    assert "finished at step 3" in capsys.readouterr().out
    assert os.listdir(out / "checkpoints") == ["step-0000003"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # log_every 5: the last step only
    _weights(str(out / "checkpoints" / "step-0000003"))
    # koala.data's keys are checked when the config is read, before any model is loaded
    assert main([*args, "data.pth=x"]) == 2
    assert "pth" in capsys.readouterr().err


def test_train_from_cache_and_refuse_other_pipelines_cache(tiny_pipe_dir, tmp_path):
    from koala.data import build_cache, make_dataloader
    from koala.distill.models import encode_batch
    from koala.distill.trainer import train
    from koala.testing.tiny import save_tiny_pipeline

    folder = _image_folder(tmp_path / "images")
    cache = str(tmp_path / "cache")
    idx = build_cache(
        {"type": "folder", "path": folder},
        tiny_pipe_dir,
        cache,
        resolution=32,
        batch_size=3,
        shard_size=4,
        dtype="fp16",
        progress=False,
    )
    assert idx["complete"] and idx["num_samples"] == 6
    data = ["data.type=cache", f"data.path={cache}", "train.caption_dropout=0.5"]
    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", "train.max_steps=2", *data)
    batch = next(iter(make_dataloader(cfg.data, batch_size=2, resolution=32, pipeline_dir=tiny_pipe_dir)))
    assert batch["latents"].dtype == batch["prompt_embeds"].dtype == torch.float16  # stored fp16
    from koala.distill.models import Frozen
    from koala.families import get_family

    frozen = Frozen(get_family("sdxl"), None, None, torch.float32)  # a cached batch needs no encoders
    uncond = {k: torch.zeros_like(batch[k][:1]) for k in ("prompt_embeds", "pooled_prompt_embeds")}
    lat, cond = encode_batch(batch, frozen, "cpu", [torch.Generator().manual_seed(i) for i in range(2)], 1.0, uncond)
    assert lat.dtype == torch.float32 and all(t.dtype == torch.float32 for t in cond.values())
    assert lat.shape == (2, 4, 16, 16) and not cond["prompt_embeds"].any() and cond["add_time_ids"].any()
    res = train(cfg)
    assert res["step"] == 2 and res["checkpoint"].endswith("step-0000002")
    # a cache made by other encoders (another tiny pipeline) is refused before any model load or step
    other = str(tmp_path / "other_pipe")
    save_tiny_pipeline(other, seed=5, words=["a", "red", "blue", "circle", "square", "photo", "of"])
    with pytest.raises(KoalaError, match="built with different"):
        train(_cfg(other, tmp_path / "run2", "train.max_steps=2", *data))
    assert not (tmp_path / "run2").exists()


def test_resume_equivalence_on_image_folder_skips_without_decoding(tiny_pipe_dir, tmp_path, monkeypatch):
    """Real data: resuming starts the loader at the checkpoint's batch (koala.data skip_batches) instead of
    replaying it; the weights equal an uninterrupted run and the skipped images are never decoded."""
    import koala.data.records as records
    from koala.distill.trainer import train

    # 3 images (one of each size), batch 1 x accum 2: the skipped batches and the resumed steps both cross an epoch end
    folder = _image_folder(tmp_path / "images", n=3)
    common = (
        "train.grad_accum=2",
        "train.batch_size=1",
        "train.ema.enabled=false",
        "data.type=folder",
        f"data.path={folder}",
        "train.caption_dropout=0.0",
    )
    full = train(_cfg(tiny_pipe_dir, tmp_path / "a", "train.max_steps=4", *common))
    train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=2", *common))
    decoded, decode = [], records.decode_image
    monkeypatch.setattr(records, "decode_image", lambda *a, **kw: decoded.append(a[0]) or decode(*a, **kw))
    resumed = train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=4", "train.resume=latest", *common))
    assert full["step"] == resumed["step"] == 4
    assert len(decoded) == 2 * 2  # only the resumed steps' samples, not the 2 x 2 skipped ones
    wa, wb = _weights(full["checkpoint"]), _weights(resumed["checkpoint"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# a small KOALA-style student of the tiny teacher (one transformer layer where KOALA-700M keeps 2 and 5, no mid
# block): enough blocks for the sharding, hooks and layer map to mean the same, far fewer parameter tensors
SMALL_STUDENT = (
    "student.preset={encoder_layers: [1, 1, 1], down_depth: [0, 1, 1], up_depth: [1, 1, 0], mid_block: false}"
)

SHARDINGS = {
    "zero1": ["train.shard_optimizer=true"],
    "grad_op": ["train.fsdp=grad_op", "train.max_grad_norm=0.5"],
    "full": ["train.fsdp=full"],
}

# `koala distill` (koala.cli.main) once per argument list of the JSON file, in the same processes: one `accelerate
# launch` runs several 2-process trainings in turn (each start of a process costs seconds of imports). Each run
# ends with its process group destroyed (Accelerator.end_training); the next one starts a fresh accelerate state
# and process group, on a store of its own (port PORT + 1 + i) so that no key of an earlier run is read again.
DISTILL_RUNS = """
import json, os, sys
from accelerate.state import AcceleratorState
from koala.cli import main
os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
for i, argv in enumerate(json.load(open(sys.argv[1]))):
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["MASTER_PORT"] = str(int(sys.argv[2]) + 1 + i)
    if main(argv):
        sys.exit(1)
"""


def _launch_distill_runs(tmp_path, port: int, runs: list[list[str]]) -> str:
    """`koala distill --config tiny OVERRIDES` for each override list, one after another in the same 2 CPU
    processes of one `accelerate launch` (ports PORT to PORT + len(runs)); returns the log."""
    import json
    import subprocess

    script, argv = tmp_path / f"runs-{port}.py", tmp_path / f"runs-{port}.json"
    script.write_text(DISTILL_RUNS)
    argv.write_text(json.dumps([["distill", "--config", "tiny", *r] for r in runs]))
    cmd = [*_launch(port), str(script), str(argv), str(port)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_sharded_optimizer_two_processes_resume_exactly(tiny_pipe_dir, tmp_path):
    """Sharded training over 2 gloo processes -- train.shard_optimizer (ZeRO-1: each process keeps half of the
    AdamW states), train.fsdp=grad_op (ZeRO-2 with FSDP2: gradients, optimizer states and EMA sharded; here with
    gradient clipping over the sharded gradients) and train.fsdp=full (ZeRO-3: parameters too): the checkpoint
    holds the full states (every parameter's moments, a loadable diffusers U-Net and EMA), the weights equal 1
    process x the same global batch, and a run resumed from the step-1 checkpoint ends bit-equal to the
    uninterrupted run. The student is a small custom U-Net (SMALL_STUDENT): the sharded optimizer, EMA and
    checkpoint gathering cost per parameter tensor (DTensor dispatch), not per element. The three shardings'
    uninterrupted runs share one `accelerate launch`, their resumed runs (fresh processes) a second one."""
    import shutil

    common = [
        f"teacher.pipeline={tiny_pipe_dir}",
        "train.checkpoint_every=1",
        "data.num_samples=8",
        "train.progress=false",
        "validation.every=0",
        "train.adam_eps=1.0",
        "train.lr=0.05",
        SMALL_STUDENT,
    ]

    def run(name, out):
        extra = ["train.batch_size=1", "train.resume=latest", "train.max_steps=2"]
        return [f"train.output_dir={tmp_path / name / out}", *extra, *SHARDINGS[name], *common]

    _launch_distill_runs(tmp_path, 29541, [run(name, "full") for name in SHARDINGS])
    for name in SHARDINGS:
        full, part = tmp_path / name / "full", tmp_path / name / "part"
        state = torch.load(full / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=True)
        n_params = len(list(_weights(str(full / "checkpoints" / "step-0000002")).keys()))
        assert len(state["optimizer"]["state"]) == n_params  # consolidated: every parameter's moments, not half
        os.makedirs(part / "checkpoints")
        shutil.copytree(full / "checkpoints" / "step-0000001", part / "checkpoints" / "step-0000001")
    log = _launch_distill_runs(tmp_path, 29545, [run(name, "part") for name in SHARDINGS])
    one = {}  # the 1-process reference run, by gradient clipping (the sharding does not enter it)
    for name, sharding in SHARDINGS.items():
        part = tmp_path / name / "part"
        assert f"resumed from {part / 'checkpoints' / 'step-0000001'} at step 1" in log, log[-3000:]
        clip = tuple(x for x in sharding if "max_grad_norm" in x)
        if clip not in one:
            one[clip] = _train_one_process(tmp_path / f"one{len(one)}", [*clip, *common])
        _check_sharded_run(tmp_path / name, sharding, one[clip], common)


def _train_one_process(out, overrides) -> str:
    from koala.distill.trainer import train

    cfg = load_config("tiny", [f"train.output_dir={out}", "train.batch_size=2", "train.max_steps=2", *overrides])
    return train(cfg)["checkpoint"]


def _check_sharded_run(root, sharding, one_ckpt, common):
    """The uninterrupted 2-process run in ROOT/full equals its resumed copy in ROOT/part bit for bit and the
    1-process run ONE_CKPT to 1e-5 (weights and EMA); its U-Net loads in diffusers; an FSDP checkpoint is not
    resumed without train.fsdp."""
    from diffusers import UNet2DConditionModel

    from koala.distill.trainer import train

    last = root / "full" / "checkpoints" / "step-0000002"
    a, b = _weights(str(last)), _weights(str(root / "part" / "checkpoints" / "step-0000002"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = _weights(str(last), "unet_ema")
    ema_b = _weights(str(root / "part" / "checkpoints" / "step-0000002"), "unet_ema")
    assert set(ema_a) == set(a) and all(torch.equal(ema_a[k], ema_b[k]) for k in a)
    UNet2DConditionModel.from_pretrained(str(last / "unet"))  # a plain diffusers U-Net
    c, ema_c = _weights(one_ckpt), _weights(one_ckpt, "unet_ema")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-5
    assert max(float((ema_a[k] - ema_c[k]).abs().max()) for k in a) < 1e-5
    if any(x.startswith("train.fsdp") for x in sharding):  # optimizer state by parameter name: same train.fsdp only
        resume = load_config(
            "tiny",
            [
                f"train.output_dir={root / 'full'}",
                "train.batch_size=2",
                "train.resume=latest",
                "train.allow_world_size_change=true",
                "train.max_steps=3",
                *common,
            ],
        )
        with pytest.raises(KoalaError, match="resume it with the same train.fsdp setting"):
            train(resume)
