"""fewstep.method=dmd (DMD2): the generator's timesteps and its LCMScheduler sampler, the distribution-matching
gradient, the fake score's updates, exact resume, config checks. Tiny models, a few seconds each."""

import os

import pytest
import torch
from safetensors.torch import load_file

from koala.errors import KoalaError
from tiny_runs import tiny_run_config


def _cfg(pipe_dir, out, *extra):
    return tiny_run_config("tiny-dmd", pipe_dir, out, *extra)


def _distiller(pipe_dir, out, *extra):
    from accelerate import Accelerator

    from koala.data import make_dataloader
    from koala.distill.step import Distiller, sample_generators

    cfg = _cfg(pipe_dir, out, *extra)
    d = Distiller(cfg, Accelerator(cpu=True))
    batch = next(iter(make_dataloader(cfg.data, batch_size=2, resolution=32)))
    return d, d.kd_item(batch, sample_generators(0, 0, 0, 2, 1))


def _clone(gens):
    out = []
    for g in gens:
        c = torch.Generator()
        c.set_state(g.get_state())
        out.append(c)
    return out


def test_generator_timesteps_trailing():
    from koala.distill.fewstep.dmd import generator_timesteps

    assert generator_timesteps(1000, 4) == [999, 749, 499, 249]
    assert generator_timesteps(1000, 1) == [999]
    assert generator_timesteps(1000, 3) == [999, 666, 332]  # diffusers' trailing spacing
    with pytest.raises(KoalaError, match="fewstep.steps"):
        generator_timesteps(1000, 0)


def test_dmd_gradient_is_fake_minus_real_normalised(tiny_pipe_dir, tmp_path):
    """d loss / d x0_gen = (p_fake - p_real) / mean(|x0_gen - p_real|) / numel, through the objective's own path
    (its draws of t and noise, the guided step teacher, the fake score); swapping the scores flips the sign."""
    from koala.distill.fewstep.dmd import _randint, _randn, dmd_loss

    d, item = _distiller(tiny_pipe_dir, tmp_path / "run", "fewstep.gan_weight=0")
    obj, p = d.objective, item.prepared
    x0_gen = torch.randn_like(p.latents).requires_grad_(True)
    gens, again = p.gens, _clone(p.gens)
    terms = obj.generator_terms(x0_gen, gens, p.cond)
    assert set(terms) == {"dmd"}
    terms["dmd"].backward()
    t = _randint(again, obj.t_lo, obj.t_hi + 1, "cpu")
    assert obj.t_lo <= int(t.min()) and int(t.max()) <= obj.t_hi
    x_t = obj.schedule.add_noise(x0_gen.detach(), _randn(again, x0_gen.shape[1:], "cpu"), t)
    p_real = obj.real_x0(x_t, t, p.cond)
    with torch.no_grad():
        p_fake = obj.schedule.x0_eps(obj.fake_forward(x_t, t, p.cond)[0], x_t, t)[0]
    norm = (x0_gen.detach() - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (p_fake - p_real) / norm / x0_gen.numel()
    assert (p_fake - p_real).abs().max() > 1e-3  # the guided real score differs from the fake one
    torch.testing.assert_close(x0_gen.grad, expected, rtol=1e-4, atol=1e-9)
    swapped_x = x0_gen.detach().clone().requires_grad_(True)
    dmd_loss(swapped_x, p_fake, p_real).backward()
    norm_s = (x0_gen.detach() - p_fake).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(swapped_x.grad, -(p_fake - p_real) / norm_s / x0_gen.numel(), rtol=1e-4, atol=1e-9)
    assert (swapped_x.grad * x0_gen.grad <= 0).all()


def test_fake_score_trains_on_generator_samples(tiny_pipe_dir, tmp_path):
    """The fake score's denoising loss is on the generator's samples (not the data latents), noised; its weights
    change, the step teacher's and the student's do not."""
    d, item = _distiller(tiny_pipe_dir, tmp_path / "run", "fewstep.fake_updates=1", "fewstep.gan_weight=0")
    obj = d.objective
    fake0 = {k: v.clone() for k, v in obj.fake.state_dict().items()}
    real0 = {k: v.clone() for k, v in obj.step_teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in d.plain_student.state_dict().items()}
    generated, targets, inputs = [], [], []
    generate, target = obj.generate, obj.schedule.target
    obj.generate = lambda *a: generated.append(generate(*a)) or generated[-1]
    obj.schedule.target = lambda x0, eps, t: targets.append((x0, eps, t)) or target(x0, eps, t)
    hook = obj.fake.register_forward_pre_hook(lambda m, args, kw: inputs.append(kw["sample"]), with_kwargs=True)
    obj.fit_fake(item)
    hook.remove()
    assert len(generated) == len(targets) == len(inputs) == 1
    (x0, eps, t), x_in = targets[0], inputs[0]
    assert not generated[0].requires_grad
    assert torch.equal(x0, generated[0]) and not torch.allclose(x0, item.prepared.latents)
    torch.testing.assert_close(x_in, obj.schedule.add_noise(generated[0], eps, t))
    assert any(not torch.equal(fake0[k], v) for k, v in obj.fake.state_dict().items())
    assert all(torch.equal(real0[k], v) for k, v in obj.step_teacher.state_dict().items())
    assert all(torch.equal(student0[k], v) for k, v in d.plain_student.state_dict().items())
    assert all(q.grad is None for q in d.plain_student.parameters())
    assert set(obj.after_update(0)) == {"loss/fake"}


def test_lcm_scheduler_sampling_reproduces_the_rollout(tiny_pipe_dir, tmp_path):
    """The recorded sampler (diffusers' LCMScheduler, the record's config and timesteps, guidance 1, in the SDXL
    pipeline) gives the generator's backward simulation run to the last step, for the same noises."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    d, item = _distiller(tiny_pipe_dir, tmp_path / "run")
    obj, p = d.objective, item.prepared
    rec = obj.sampling().to_meta()
    assert rec["timesteps"] == [999, 749, 499, 249] and rec["guidance_scale"] == 1.0
    student = d.plain_student.eval()
    base = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir)
    sched = LCMScheduler.from_config(base.scheduler.config, **rec["scheduler_config"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipe_dir, unet=student, scheduler=sched)
    shape = p.latents.shape[1:]
    h, w = shape[1] * pipe.vae_scale_factor, shape[2] * pipe.vae_scale_factor
    pe, pooled = p.cond["prompt_embeds"][:1], p.cond["pooled_prompt_embeds"][:1]
    start = torch.randn((1, *shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = pipe(
            prompt_embeds=pe,
            pooled_prompt_embeds=pooled,
            guidance_scale=rec["guidance_scale"],
            timesteps=rec["timesteps"],
            latents=start.clone(),
            generator=torch.Generator().manual_seed(7),
            height=h,
            width=w,
            output_type="latent",
        ).images
    g = torch.Generator().manual_seed(7)
    noises = [[torch.randn(shape, generator=g) for _ in range(rec["steps"] - 1)]]
    cond = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "add_time_ids": torch.tensor([[h, w, 0, 0, h, w]])}
    last = torch.tensor([rec["steps"] - 1])
    with torch.no_grad():
        mine = obj.generator_x0(obj.simulate(start, last, cond, noises), obj.timesteps[last], cond)
    torch.testing.assert_close(mine, out.float(), rtol=1e-5, atol=1e-5)


def _fewstep_state(ckpt):
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=True)["fewstep"]


def test_resume_is_bit_exact_with_gan(tiny_pipe_dir, tmp_path):
    """4 steps = 2 + resume 2: the student, the fake score, its optimizer's moments and the GAN head."""
    from koala.distill.trainer import train

    common = (
        "fewstep.gan_weight=0.05",
        "fewstep.fake_updates=2",
        "train.grad_accum=1",
        "train.batch_size=2",
        "train.checkpoint_every=2",
    )
    full = train(_cfg(tiny_pipe_dir, tmp_path / "a", "train.max_steps=4", *common))
    train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=2", *common))
    resumed = train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.max_steps=4", "train.resume=latest", *common))
    assert full["step"] == resumed["step"] == 4
    wa = load_file(os.path.join(full["checkpoint"], "unet", "diffusion_pytorch_model.safetensors"))
    wb = load_file(os.path.join(resumed["checkpoint"], "unet", "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = _fewstep_state(full["checkpoint"]), _fewstep_state(resumed["checkpoint"])
    for part in ("fake", "head"):
        assert sa[part].keys() == sb[part].keys()
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    moments = [(a, b) for a, b in zip(sa["fake_opt"]["state"].values(), sb["fake_opt"]["state"].values())]
    assert moments and all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in moments)
    init = load_file(os.path.join(tiny_pipe_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(init[k], sa["fake"][k]) for k in init)  # the fake score trained
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        logged = f.read()
    assert all(f'"loss/{k}"' in logged for k in ("dmd", "gan", "fake", "disc"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("fewstep.fake_updates=0", "fewstep.fake_updates"),
        ("fewstep.disc_weight=-1", "fewstep.disc_weight"),
        ("train.mixed_precision=fp16", "train.mixed_precision"),
    ],
)
def test_bad_input_refused_with_the_key_and_nothing_written(tiny_pipe_dir, tmp_path, override, key):
    out = tmp_path / "run"
    with pytest.raises(KoalaError, match=key.replace(".", r"\.")):
        _cfg(tiny_pipe_dir, out, override)
    assert not out.exists()


def test_lora_mode_trains_adapters_and_keeps_a_full_fake_score(tiny_pipe_dir, tmp_path):
    from koala.distill.trainer import train

    out = train(
        _cfg(tiny_pipe_dir, tmp_path / "run", "fewstep.lora_rank=4", "fewstep.teacher=student", "train.max_steps=1")
    )
    state = _fewstep_state(out["checkpoint"])
    assert state["lora"] and all(".lora_" not in k for k in state["fake"])
    assert os.path.isfile(os.path.join(out["checkpoint"], "pytorch_lora_weights.safetensors"))
