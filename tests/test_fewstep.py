"""Step distillation (issue 28): the fewstep seam and latent consistency distillation on tiny CPU models."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from koala import KoalaError
from tiny_runs import tiny_run_config


def _cfg(pipe_dir, out, *extra, recipe="tiny-fewstep"):
    return tiny_run_config(recipe, pipe_dir, out, "train.batch_size=2", "train.grad_accum=1", *extra)


def _distiller(cfg):
    from accelerate import Accelerator

    from koala.distill.step import Distiller

    return Distiller(cfg, Accelerator(cpu=True))


def _item(d, seed=0):
    from koala.data import make_dataloader
    from koala.distill.models import teacher_pipeline
    from koala.distill.step import sample_generators

    t = d.cfg.train
    loader = make_dataloader(
        d.cfg.data, batch_size=t.batch_size, resolution=t.resolution, seed=t.seed, pipeline_dir=teacher_pipeline(d.cfg)
    )
    return d.kd_item(next(iter(loader)), sample_generators(seed, 0, 0, t.batch_size, 1))


def _clone_gens(gens):
    out = []
    for g in gens:
        c = torch.Generator()
        c.set_state(g.get_state())
        out.append(c)
    return out


def _unet_call(unet, x, t, cond):
    return unet(
        x,
        t,
        encoder_hidden_states=cond["prompt_embeds"],
        added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]},
    ).sample


def test_lcm_target_is_a_ddim_step_of_the_guided_teacher_then_the_ema_target(tiny_pipe_dir, tmp_path):
    """The LCM loss's target equals, computed by hand with diffusers' own DDIMScheduler and LCMScheduler: one DDIM
    step of the guided step teacher from t to t - k, then the EMA target network's consistency function there; and
    after an update the target is decay x target + (1 - decay) x student."""
    from diffusers import DDIMScheduler, LCMScheduler

    d = _distiller(_cfg(tiny_pipe_dir, tmp_path, "fewstep.guidance_scale=3.0", "fewstep.target_decay=0.5"))
    try:
        obj = d.objective
        item = _item(d)
        p = item.prepared
        assert set(p.cond) == {"prompt_embeds", "pooled_prompt_embeds", "add_time_ids"}
        idx, eps = obj.draw(p.latents, _clone_gens(p.gens))
        t = obj.grid[idx]
        assert obj.k == 20 and obj.grid[0] == 19 and obj.grid[-1] == 999
        # by hand: noising, the guided teacher, DDIM (diffusers' scheduler, eta 0), the target's consistency function
        ddim = DDIMScheduler.from_config(d.frozen.noise_scheduler.config, set_alpha_to_one=False, clip_sample=False)
        ddim.set_timesteps(50)
        lcm = LCMScheduler.from_config(d.frozen.noise_scheduler.config)
        uncond = {k: torch.zeros_like(v) if k != "add_time_ids" else v for k, v in p.cond.items()}
        expected = []
        for j in range(p.latents.shape[0]):
            tj = int(t[j])
            ac = d.frozen.noise_scheduler.alphas_cumprod
            x_t = ac[tj].sqrt() * p.latents[j : j + 1] + (1 - ac[tj]).sqrt() * eps[j : j + 1]
            cj = {k: v[j : j + 1] for k, v in p.cond.items()}
            uj = {k: v[j : j + 1] for k, v in uncond.items()}
            with torch.no_grad():
                c, u = _unet_call(obj.step_teacher, x_t, tj, cj), _unet_call(obj.step_teacher, x_t, tj, uj)
            x_s = ddim.step(u + 3.0 * (c - u), tj, x_t).prev_sample
            s = max(tj - 20, 0)
            with torch.no_grad():
                e = _unet_call(obj.target, x_s, s, cj)
            x0 = (x_s - (1 - ac[s]).sqrt() * e) / ac[s].sqrt()
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(s))
            expected.append(c_skip * x_s + c_out * x0)
        s_all = (t - obj.k).clamp_min(0)
        x_t = obj.schedule.add_noise(p.latents, eps, t)
        x_s = obj.solver_step(x_t, t, s_all, p.cond)
        got = obj.target_value(x_s, s_all, p.cond)
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)
        # the loss trains, and the target follows the student by EMA
        before = [q.detach().clone() for q in obj.target.parameters()]
        losses = d.micro_step(item)
        assert float(losses.extra["lcm"]) > 0 and float(losses.out) > 0  # tiny-fewstep keeps outKD alongside
        d.update(0)
        for b, tq, sq in zip(before, obj.target.parameters(), d.plain_student.parameters()):
            torch.testing.assert_close(tq, 0.5 * b + 0.5 * sq.detach())
        assert any(not torch.equal(b, tq) for b, tq in zip(before, obj.target.parameters()))
    finally:
        d.close()


def _weights(ckpt, sub="unet"):
    return load_file(os.path.join(ckpt, sub, "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_lcm_resumes_exactly(tiny_pipe_dir, tmp_path, mode):
    from koala.distill.trainer import train

    extra = ["fewstep.lora_rank=4"] if mode == "lora" else []
    full = train(_cfg(tiny_pipe_dir, tmp_path / "a", "train.max_steps=4", *extra))
    train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=2", *extra))
    resumed = train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=4", "train.resume=latest", *extra))
    wa, wb = _weights(full["checkpoint"]), _weights(resumed["checkpoint"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(os.path.join(full["checkpoint"], "trainer_state.pt"), weights_only=True)["fewstep"]
    sb = torch.load(os.path.join(resumed["checkpoint"], "trainer_state.pt"), weights_only=True)["fewstep"]
    assert sa.keys() == sb.keys() and "target" in sa and ("lora" in sa) == (mode == "lora")
    for part in sa:
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    meta = json.load(open(os.path.join(resumed["checkpoint"], "unet", "koala_layer_map.json")))["meta"]
    assert meta["sampling"]["scheduler"] == "LCMScheduler" and meta["sampling"]["steps"] == 4
    assert meta["fewstep"] == {"method": "lcm", "lora_rank": 4 if mode == "lora" else 0}
    lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert len(lines) == 4 and all("loss/lcm" in x for x in lines)


def test_lcm_lora_file_loads_with_load_lora_weights_and_equals_the_merged_student(tiny_pipe_dir, tmp_path):
    """LoRA mode: the base student stays as it was, the checkpoint's LoRA file loads with diffusers'
    load_lora_weights onto the base student and gives the checkpoint's merged U-Net, and koala generate --lora
    takes it."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from koala.compress import compress
    from koala.distill.trainer import train

    base = tmp_path / "student"
    compress(tiny_pipe_dir, "koala-700m", str(base))
    base_unet = str(base / "unet") if (base / "unet").is_dir() else str(base)
    out = train(
        _cfg(
            tiny_pipe_dir,
            tmp_path / "run",
            "train.max_steps=3",
            "fewstep.lora_rank=4",
            "fewstep.lora_alpha=8",
            f"student.path={base_unet}",
            "fewstep.teacher=student",
            "loss.out=0",
            "loss.feat=0",
            "train.lr=1e-2",
        )
    )
    lora_file = os.path.join(out["checkpoint"], "pytorch_lora_weights.safetensors")
    merged = UNet2DConditionModel.from_pretrained(os.path.join(out["checkpoint"], "unet"))
    plain = UNet2DConditionModel.from_pretrained(base_unet)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values()))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir, unet=plain)
    pipe.load_lora_weights(lora_file)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    c = plain.config
    cond = dict(
        prompt_embeds=torch.randn(2, 8, c.cross_attention_dim, generator=g),
        pooled_prompt_embeds=torch.randn(
            2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g
        ),
        add_time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    )
    with torch.no_grad():
        y_lora = _unet_call(pipe.unet, x, torch.tensor([999, 259]), cond)
        y_merged = _unet_call(merged, x, torch.tensor([999, 259]), cond)
    torch.testing.assert_close(y_lora, y_merged, rtol=1e-4, atol=1e-5)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(fused[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "override, key",
    [
        ("fewstep.method=progressive", "fewstep.method"),
        ("fewstep.lora_rank=-1", "fewstep.lora_rank"),
        ("fewstep.steps=60", "fewstep.steps"),
        ("fewstep.steps=0", "fewstep.steps"),
        ("train.teacher_worker=true", "train.teacher_worker"),
    ],
)
def test_bad_fewstep_config_is_refused_naming_the_key(tiny_pipe_dir, tmp_path, override, key):
    with pytest.raises(KoalaError, match=key.replace(".", r"\.")):
        _cfg(tiny_pipe_dir, tmp_path / "x", override)
    assert not (tmp_path / "x").exists()


def test_step_teacher_of_another_family_and_a_grid_the_schedule_cannot_hold_are_refused(
    tiny_pipe_dir, tiny_sd_pipe_dir, tmp_path
):
    from koala.distill.trainer import train

    sd_unet = os.path.join(tiny_sd_pipe_dir, "unet")
    with pytest.raises(KoalaError, match=r"fewstep\.teacher .* is a sd denoiser but the student is sdxl"):
        train(_cfg(tiny_pipe_dir, tmp_path / "a", f"fewstep.teacher={sd_unet}"))
    with pytest.raises(KoalaError, match=r"fewstep\.ddim_steps 7 does not divide"):
        train(_cfg(tiny_pipe_dir, tmp_path / "b", "fewstep.ddim_steps=7"))
    with pytest.raises(KoalaError, match=r"fewstep\.teacher nowhere"):
        train(_cfg(tiny_pipe_dir, tmp_path / "c", "fewstep.teacher=nowhere"))
    assert not any((tmp_path / n).exists() for n in "abc")
