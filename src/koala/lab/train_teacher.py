"""Train a tiny shapes-world teacher on CPU: SDXL topology (the packaged teacher) or PixArt topology (a DiT).

A plain recipe, in two phases:

1. **VAE**: reconstruction training of the AutoencoderKL (L1 + MSE + a small KL term); afterwards
   ``scaling_factor`` is set to 1 / std of the latents, as SDXL's VAE config does.
2. **U-Net + both text encoders**: the diffusion task loss (epsilon prediction, MSE with min-SNR weighting)
   under SDXL's noise schedule (scaled-linear betas, 1000 steps; noising by ``DDPMScheduler.add_noise``, SNR by
   ``diffusers.training_utils.compute_snr``), with SDXL conditioning computed exactly as the pipeline does
   (``koala.families`` "sdxl": penultimate hidden states of both encoders, pooled embedding of the second,
   ``add_time_ids``). 10 % of captions are dropped to all-zero embeddings, which is
   what ``StableDiffusionXLPipeline`` uses as the unconditional input (``force_zeros_for_empty_prompt``),
   so classifier-free guidance works. An EMA of the weights (``diffusers.training_utils.EMAModel``, one per
   trained module) is what gets saved. With ``family="pixart"`` the same loop trains a DiT and its T5 encoder
   through the family seam (T5 embeddings + mask; dropped captions get the empty prompt's encoding, the
   pipeline's unconditional input; the task loss is on the epsilon half of the learned-sigma output), and the
   VAE can be taken from a trained shapes pipeline (``vae_from``) instead of phase 1.

Images come through ``koala.data`` (folder source, centre crop, no flip); generated scenes are written to a
temporary image folder first.

The output is a pipeline directory that ``StableDiffusionXLPipeline.from_pretrained`` loads as is; a
checkpoint is written every ``save_every`` steps so a stopped run still leaves usable weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

from ..distill.losses import prediction_target
from ..errors import KoalaError
from ..families import denoiser_of, family_of, family_of_pipeline, get_family
from ..utils.files import atomic_output_dir
from .models import IMAGE_SIZE, build_shapes_pipeline, default_sampling
from .order_loss import image_order_loss, order_loss
from .score import score_pairs
from .shapes import DEFAULT_HELD_OUT, generate_scenes, write_image_folder
from .teacher_state import has_state, read_state, restore_state, write_state


@dataclass
class TeacherConfig:
    out: str
    data: str | None = None  # image folder (metadata.jsonl or sidecars); None: generate num_train scenes
    num_train: int = 40000
    num_val: int = 64  # val prompts scored at each checkpoint
    balanced: bool = True  # generated scenes state every relation equally often (shapes.generate_scenes)
    seed: int = 0
    family: str = "sdxl"  # "pixart": a DiT teacher (koala.testing.tiny.SHAPES_DIT)
    vae_from: str | None = None  # copy the VAE of this shapes pipeline and skip phase 1
    vae_steps: int = 600
    vae_lr: float = 1e-3
    steps: int = 16000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    snr_gamma: float = 5.0
    order_weight: float = 0.1  # weight of the word-order loss on the text encoders (order_loss); 0: off
    order_margin: float = 0.8  # its cosine margin
    relation_weight: float = 0.0  # weight of the image-side word-order loss (order_loss.image_order_loss); 0: off
    relation_margin: float = 0.1  # its relative margin
    relation_t_min: int = 600  # it applies to samples noised at t >= this (where the caption decides the layout)
    init_from: str | None = None  # start from this trained shapes pipeline's weights (fine-tune; its VAE is kept)
    beta_end: float | None = None  # the noise schedule's last beta (None: the pipeline's, SDXL's 0.012)
    timestep_spacing: str | None = None  # the sampler's spacing saved with the pipeline (None: the pipeline's)
    prediction_type: str | None = None  # "epsilon" / "v_prediction" (None: the pipeline's, epsilon)
    zero_snr: bool = False  # rescale the betas to zero terminal SNR (Lin et al. 2024); needs v_prediction
    save_every: int = 500
    max_minutes: float | None = None  # stop the denoiser phase (2) after this long (then save)
    stop_after: int | None = None  # stop after this many steps in this run (then save); resume continues
    resume: bool = False  # continue from the training state saved in ``out`` (train_state/)
    threads: int | None = None  # None: torch's default (all cores)
    half: bool = True  # store the denoiser in fp16 (from_pretrained loads it back as fp32)
    overwrite: bool = False  # replace an existing --out that is not a koala teacher


# ----------------------------------------------------------------------------------------------- data
def read_folder(folder: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """``(pixel values [N, 3, size, size] in [-1, 1], captions)`` of an image folder, through ``koala.data``
    (``metadata.jsonl`` or sidecar captions; centre crop, no flip). A shapes data set root reads its ``train``."""
    from ..data import make_dataloader

    sub = os.path.join(folder, "train")
    if not os.path.isfile(os.path.join(folder, "metadata.jsonl")) and os.path.isdir(sub):
        folder = sub
    data_cfg = {
        "type": "folder",
        "path": folder,
        "center_crop": True,
        "random_flip": False,
        "repeat": False,
        "shuffle": False,
    }
    images, captions = [], []
    for batch in make_dataloader(data_cfg, batch_size=256, resolution=size):
        images.append(batch["pixel_values"])
        captions += list(batch["captions"])
    return torch.cat(images), captions


def training_data(cfg: TeacherConfig) -> tuple[torch.Tensor, list[str]]:
    """The ``--data`` folder, or ``num_train`` generated train scenes (written to a temporary folder)."""
    if cfg.data:
        return read_folder(cfg.data, IMAGE_SIZE)
    scenes = generate_scenes(
        cfg.num_train, "train", cfg.seed, IMAGE_SIZE, held_out=DEFAULT_HELD_OUT, balanced=cfg.balanced
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder(scenes, tmp, IMAGE_SIZE, progress=False)
        return read_folder(tmp, IMAGE_SIZE)


# ----------------------------------------------------------------------------------------------- phases
def train_vae(vae, images: torch.Tensor, cfg: TeacherConfig, log) -> float:
    from ..utils.console import progress_bar

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    vae.train()
    bar = progress_bar(range(cfg.vae_steps), desc="VAE", dynamic_ncols=True)
    for step in bar:
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)]
        )
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"VAE: final loss {loss.item():.4f}, scaling_factor {scale:.4f}")
    return scale


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    from ..utils.console import progress_bar

    out = [
        vae.encode(images[i : i + 256]).latent_dist.mean
        for i in progress_bar(range(0, len(images), 256), desc="latents")
    ]
    return torch.cat(out) * vae.config.scaling_factor


def ema_copy(module, ema: EMAModel):
    """A frozen copy of ``module`` holding the EMA weights."""
    out = copy.deepcopy(module).eval().requires_grad_(False)
    ema.copy_to(out.parameters())
    return out


@torch.no_grad()
def evaluate(pipe, prompts: list[str], seed: int = 0, batch: int = 32) -> dict:
    """Generate one image per prompt with the default sampler and score it."""
    pipe.set_progress_bar_config(disable=True)
    extra = family_of_pipeline(pipe).pipeline_call_kwargs
    images = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(prompts[i : i + batch], generator=g, output_type="np", **default_sampling(), **extra).images
        images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
    agg, _ = score_pairs(images, prompts)
    return agg


def save_pipeline(pipe, out_dir: str, half: bool, extra: dict, write_more=None) -> None:
    """Write the pipeline to a fresh temporary directory and swap it in, so a checkpoint is never half-written;
    ``write_more(tmp)`` adds files (the training state) to the same directory."""
    p = copy.deepcopy(pipe)
    if half:  # only the denoiser (most of the bytes); text encoders and VAE stay fp32 so a plain load is all fp32
        denoiser_of(p).to(dtype=torch.float16)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        p.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "koala_teacher.json"), "w") as f:
            json.dump(extra, f, indent=1)
        if write_more is not None:
            write_more(tmp)


def check_out_dir(cfg: TeacherConfig) -> None:
    """Refuse an ``--out`` that is a file, or a directory that is not a koala teacher (unless ``overwrite``);
    ``--init-from`` with ``--vae-from`` (the first brings its own VAE); ``--zero-snr`` without v-prediction."""
    if cfg.zero_snr and cfg.prediction_type != "v_prediction":  # epsilon is undefined at zero SNR
        raise KoalaError("zero terminal SNR needs v-prediction: add --prediction-type v_prediction", option="zero_snr")
    if cfg.init_from and cfg.vae_from:
        raise KoalaError(
            "--init-from brings its own VAE; leave out --vae-from (or use --vae-from alone to train from scratch)",
            option="vae_from",
        )
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise KoalaError(f"{cfg.out} exists and is not a directory; choose another output directory", option="out")
    if (
        os.path.isdir(cfg.out)
        and not cfg.overwrite
        and not os.path.isfile(os.path.join(cfg.out, "koala_teacher.json"))
    ):
        raise KoalaError(
            f"{cfg.out} exists and is not a koala teacher (no koala_teacher.json); overwrite it or choose "
            "another output directory",
            option="overwrite",
        )
    if os.path.isdir(cfg.out) and has_state(cfg.out) and not (cfg.resume or cfg.overwrite):
        raise KoalaError(
            f"{cfg.out} holds a stopped training run (train_state/); pass --resume to continue it or --overwrite "
            "to start a new one there",
            option="resume",
        )


def vae_phase(pipe, images: torch.Tensor, cfg: TeacherConfig, log) -> None:
    """Phase 1: train ``pipe``'s VAE on ``images``, or take it from ``cfg.vae_from``; it is frozen afterwards."""
    if cfg.init_from:
        log(f"VAE: kept from {cfg.init_from} (scaling_factor {pipe.vae.config.scaling_factor:.4f})")
    elif cfg.vae_from:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(cfg.vae_from, subfolder="vae", dtype=torch.float32)
        pipe.register_modules(vae=pipe.vae)
        log(f"VAE: taken from {cfg.vae_from} (scaling_factor {pipe.vae.config.scaling_factor:.4f})")
    else:
        train_vae(pipe.vae, images, cfg, log)
    pipe.vae.requires_grad_(False).eval()


def teacher_optimizer(params: list, cfg: TeacherConfig):
    """``(AdamW, its schedule)``: a linear warmup over ``cfg.warmup`` steps, then a cosine decay to 10 % of the
    learning rate."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / cfg.warmup) * (0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))) * 0.9 + 0.1)
        ),
    )
    return opt, sched


@dataclass
class TeacherModels:
    """What phase 2 trains: the denoiser and the text encoders (by pipeline component name), with the tokenizers."""

    family: Any
    denoiser: torch.nn.Module
    tokenizers: list
    encoders: list
    names: tuple[str, ...]  # pipeline component names of ``modules``

    @classmethod
    def of(cls, pipe, fam) -> "TeacherModels":
        return cls(
            fam,
            denoiser_of(pipe),
            [getattr(pipe, t) for t, _, _ in fam.text_encoders],
            [getattr(pipe, e) for _, e, _ in fam.text_encoders],
            (fam.model_subfolder, *[e for _, e, _ in fam.text_encoders]),
        )

    @property
    def modules(self) -> list:
        return [self.denoiser, *self.encoders]


def task_loss(m: TeacherModels, latents, captions, noise_scheduler, micro: dict, g, cfg: TeacherConfig):
    """One batch's ``(diffusion loss, word-order loss, image word-order loss)``: the MSE to the scheduler's
    prediction target (epsilon or v), min-SNR weighted, with ``cfg.cond_dropout`` of the captions dropped to the
    pipeline's unconditional input (every random draw from ``g``); the order loss
    (:func:`koala.lab.order_loss.order_loss`, on the undropped conditioning) is 0 when ``cfg.order_weight`` is, the
    image one (:func:`koala.lab.order_loss.image_order_loss`, on undropped samples
    noised at ``t >= cfg.relation_t_min``) when ``cfg.relation_weight`` is."""
    fam = m.family
    idx = torch.randint(len(latents), (cfg.batch_size,), generator=g)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
    xt = noise_scheduler.add_noise(x0, noise, t)
    target = prediction_target(noise_scheduler, x0, noise, t)
    caps = [captions[i] for i in idx.tolist()]
    cond = fam.encode_prompts(caps, m.tokenizers, m.encoders)  # with gradients
    order = torch.zeros(())
    if cfg.order_weight:
        order = order_loss(fam, m.tokenizers, m.encoders, cond, caps, cfg.order_margin)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
    # dropped captions get the pipeline's unconditional input: all zeros (SDXL) or the empty prompt's encoding
    uncond = (
        {k: torch.zeros_like(v[:1]) for k, v in cond.items()}
        if fam.zero_uncond
        else fam.encode_prompts([""], m.tokenizers, m.encoders)
    )
    cond = fam.drop_captions(cond, drop, uncond)
    pred = fam.prediction(fam.forward(m.denoiser, xt, t, {**cond, **micro}), x0.shape[1])
    err = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    relation = torch.zeros(())
    if cfg.relation_weight:
        eligible = (~drop & (t >= cfg.relation_t_min)).tolist()
        batch = {"xt": xt, "t": t, "target": target, "micro": micro}
        args = (fam, m.denoiser, m.tokenizers, m.encoders, batch, err, caps, eligible, cfg.relation_margin, g)
        relation = image_order_loss(*args)
    if cfg.snr_gamma:  # min-SNR weighting (in x0 terms: min(SNR, gamma) for epsilon, ~1 at high noise for v)
        snr = compute_snr(noise_scheduler, t)
        w = torch.where(snr > 0, torch.clamp(snr, max=cfg.snr_gamma) / snr.clamp_min(1e-12), torch.ones_like(snr))
    else:
        w = torch.ones(cfg.batch_size)
    return (w * err).mean(), order, relation


@dataclass
class TeacherRun:
    """Everything phase 2 steps: the pipeline and what it trains, the data, the optimizer, schedule, EMAs and the
    recipe's generator; ``step`` is where it starts (0, or the step a resumed run stopped at)."""

    pipe: Any
    models: TeacherModels
    latents: torch.Tensor
    captions: list[str]
    opt: Any
    sched: Any
    emas: list
    g: torch.Generator
    step: int = 0

    @property
    def params(self) -> list:
        return [p for m in self.models.modules for p in m.parameters()]

    def write_state(self, folder: str, step: int, cfg: TeacherConfig) -> None:
        write_state(
            folder,
            step=step,
            config=asdict(cfg),
            modules=self.models.modules,
            names=self.models.names,
            opt=self.opt,
            sched=self.sched,
            emas=self.emas,
            g=self.g,
            data={"latents": self.latents, "captions": self.captions},
        )


def resumed_config(cfg: TeacherConfig) -> TeacherConfig:
    """``cfg`` with the recipe of the run saved in ``cfg.out``: only the run controls (``max_minutes``,
    ``stop_after``, ``save_every``, ``threads``) come from ``cfg``."""
    meta, _ = read_state(cfg.out) if cfg.resume else ({"config": asdict(cfg)}, None)
    keep = {k: getattr(cfg, k) for k in ("out", "resume", "max_minutes", "stop_after", "save_every", "threads")}
    saved = {k: v for k, v in meta["config"].items() if k in TeacherConfig.__dataclass_fields__}
    return TeacherConfig(**{**saved, **keep})


def start_run(cfg: TeacherConfig, log) -> TeacherRun:
    """Build the pipeline; then either run phase 1 and encode the data (a new run), or load the VAE, data and
    training state saved in ``cfg.out`` (``cfg.resume``)."""
    fam = get_family(cfg.family)
    pipe = build_shapes_pipeline(cfg.seed, fam.name)
    if cfg.init_from and not cfg.resume:  # fine-tune: every component from the trained pipeline
        fam.check_pipeline_dir(cfg.init_from, "--init-from pipeline")
        pipe = type(pipe).from_pretrained(cfg.init_from, dtype=torch.float32)
        log(f"weights: taken from {cfg.init_from}")
    if cfg.resume:
        meta, tensors = read_state(cfg.out)
        pipe.vae = type(pipe.vae).from_pretrained(cfg.out, subfolder="vae", dtype=torch.float32)
        pipe.register_modules(vae=pipe.vae)
        pipe.vae.requires_grad_(False).eval()
        latents, captions = tensors["data.latents"], meta["captions"]
    else:
        images, captions = training_data(cfg)
        log(f"data: {len(captions)} training images {IMAGE_SIZE}x{IMAGE_SIZE}; e.g. {captions[0]!r}")
        vae_phase(pipe, images, cfg, log)
        latents = encode_latents(pipe.vae, images).contiguous()  # the layout a resumed run loads (bit-exact)
    set_noise_schedule(pipe, cfg, log)
    models = TeacherModels.of(pipe, fam)
    for m in models.modules:
        m.train()
    opt, sched = teacher_optimizer([p for m in models.modules for p in m.parameters()], cfg)
    emas = [EMAModel(m.parameters(), decay=cfg.ema_decay) for m in models.modules]  # warm-up: (1+n)/(10+n)
    run = TeacherRun(pipe, models, latents, captions, opt, sched, emas, torch.Generator().manual_seed(cfg.seed + 1))
    if cfg.resume:
        kw = dict(modules=models.modules, names=models.names, opt=opt, sched=sched, emas=emas, g=run.g)
        run.step = restore_state(meta, tensors, **kw)
        log(f"resumed at step {run.step} of {cfg.steps} from {cfg.out}")
    return run


def set_noise_schedule(pipe, cfg: TeacherConfig, log) -> None:
    """``cfg.beta_end`` / ``timestep_spacing`` / ``prediction_type`` / ``zero_snr`` into the pipeline's scheduler
    (what training noises with and what the saved pipeline samples with). SDXL's schedule leaves a 32x32 scene's
    colours and layout visible at the last timestep (alpha_bar 0.0047), and epsilon prediction gives the layout
    almost no loss at high noise; zero terminal SNR with v-prediction and ``trailing`` spacing are meant to make the
    caption, not the starting noise, place the objects (benchmarks/results/shapes-teacher-v2.md measures it)."""
    changes = {
        k: getattr(cfg, k) for k in ("beta_end", "timestep_spacing", "prediction_type") if getattr(cfg, k) is not None
    }
    if cfg.zero_snr:
        changes["rescale_betas_zero_snr"] = True
    if changes:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **changes)
        pipe.register_modules(scheduler=pipe.scheduler)
        ab = float(pipe.scheduler.alphas_cumprod[-1])
        log(f"noise schedule: {changes}, alpha_bar at the last timestep {ab:.2e}")


@dataclass
class EmaCheckpoints:
    """At each checkpoint: the EMA weights scored on the val prompts, the row added to ``history`` and the EMA
    pipeline saved to ``cfg.out`` (``koala_teacher.json``: config, history, sampling) with the training state
    (``train_state/``) that resumes the run."""

    run: TeacherRun
    val_prompts: list[str]
    cfg: TeacherConfig
    t0: float
    log: Any
    history: list = field(default_factory=list)
    minutes_before: float = 0.0  # wall minutes of the runs this one resumes

    def ema_pipeline(self):
        comps = dict(self.run.pipe.components)
        for name, m, ema in zip(self.run.models.names, self.run.models.modules, self.run.emas):
            comps[name] = ema_copy(m, ema)
        return type(self.run.pipe)(**comps)

    def save(self, pipe, step: int) -> None:
        extra = {"config": asdict(self.cfg), "history": self.history, "sampling": default_sampling()}
        save_pipeline(pipe, self.cfg.out, self.cfg.half, extra, lambda tmp: self.run.write_state(tmp, step, self.cfg))

    def __call__(self, step: int) -> dict:
        cfg = self.cfg
        ema_pipe = self.ema_pipeline()
        scores = evaluate(ema_pipe, self.val_prompts, cfg.seed)
        row = {
            "step": step,
            "minutes": round(self.minutes_before + (time.time() - self.t0) / 60, 1),
            **{k: round(v, 4) for k, v in scores.items() if k in ("color", "shape", "binding", "spatial", "all")},
        }
        self.history.append(row)
        self.log(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "step"))
        self.save(ema_pipe, step)
        return row


def train_step(run: TeacherRun, noise_scheduler, micro: dict, cfg: TeacherConfig) -> dict[str, float]:
    """One optimizer step (diffusion loss + the weighted word-order losses), then the EMAs; the loss values."""
    loss, order, relation = task_loss(run.models, run.latents, run.captions, noise_scheduler, micro, run.g, cfg)
    run.opt.zero_grad(set_to_none=True)
    (loss + cfg.order_weight * order + cfg.relation_weight * relation).backward()
    params = run.params
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    run.opt.step()
    run.sched.step()
    for m, ema in zip(run.models.modules, run.emas):
        ema.step(m.parameters())
    return {"loss": float(loss.detach()), "order": float(order.detach()), "relation": float(relation.detach())}


def train_teacher(cfg: TeacherConfig, log=print) -> dict:
    """Train (or, with ``cfg.resume``, continue) a shapes teacher; the last checkpoint's scores."""
    from ..utils.console import progress_bar

    check_out_dir(cfg)
    cfg = resumed_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    run = start_run(cfg, log)
    fam = run.models.family
    val_prompts = [s.text for s in generate_scenes(cfg.num_val, "val", cfg.seed, IMAGE_SIZE)]
    noise_scheduler = DDPMScheduler.from_config(run.pipe.scheduler.config)  # same betas; add_noise for training
    size = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * cfg.batch_size)
    micro = fam.micro_conditions({"original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size})
    history = previous_history(cfg) if cfg.resume else []
    checkpoint = EmaCheckpoints(run, val_prompts, cfg, t0, log, history, history[-1]["minutes"] if history else 0.0)

    start = saved = done = run.step
    if not cfg.resume:  # phase 1 and the data are saved at once: a run stopped before step save_every resumes here
        checkpoint.save(checkpoint.ema_pipeline(), 0)
    bar = progress_bar(range(start, cfg.steps), desc="U-Net", dynamic_ncols=True)
    for step in bar:
        losses = train_step(run, noise_scheduler, micro, cfg)
        done = step + 1
        if step % 10 == 0:
            shown = {k: f"{v:.4f}" if k == "loss" else f"{v:.3f}" for k, v in losses.items()}
            if not cfg.relation_weight:
                shown.pop("relation")
            bar.set_postfix(**shown, lr=f"{run.sched.get_last_lr()[0]:.1e}")
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            checkpoint(done)
            saved = done
        if cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes:
            log(f"time budget of {cfg.max_minutes} min reached at step {done}")
            break
        if cfg.stop_after and done - start >= cfg.stop_after:
            log(f"stopped after {cfg.stop_after} steps at step {done}; continue with --resume")
            break
    best = checkpoint(done) if saved != done or done == start else history[-1]
    best["wall_minutes"] = round((time.time() - t0) / 60, 1)
    return best


def previous_history(cfg: TeacherConfig) -> list:
    path = os.path.join(cfg.out, "koala_teacher.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f).get("history", [])


def package_teacher(src: str, dst: str, half: bool = True) -> str:
    """Copy a trained pipeline directory to ``dst`` with the denoiser in fp16 and everything else fp32."""
    pipe = family_of(src).pipeline_class_of(src).from_pretrained(src, dtype=torch.float32)
    extra = {}
    meta = os.path.join(src, "koala_teacher.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            extra = json.load(f)
    save_pipeline(pipe, dst, half, extra)
    return dst


@torch.no_grad()
def sample_folder(
    pipeline_dir: str,
    out_dir: str,
    num: int = 200,
    seed: int = 0,
    batch: int = 32,
    split: str = "val",
    steps: int | None = None,
    guidance: float | None = None,
) -> str:
    """Generate one 32x32 image per shapes prompt (``split`` scenes ``0..num-1`` of ``seed``) with the default
    sampler; write PNGs (prompt in a tEXt chunk) and ``metadata.jsonl`` for ``koala eval shapes``."""
    from PIL import PngImagePlugin

    from ..utils.console import progress_bar

    fam = family_of(pipeline_dir)
    fam.check_pipeline_dir(pipeline_dir)  # every component there, safetensors headers whole
    pipe = fam.pipeline_class_of(pipeline_dir).from_pretrained(pipeline_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kw = {**default_sampling(), **fam.pipeline_call_kwargs}
    if steps:
        kw["num_inference_steps"] = steps
    if guidance is not None:
        kw["guidance_scale"] = guidance
    prompts = [s.text for s in generate_scenes(num, split, seed, IMAGE_SIZE)]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
        for i in progress_bar(range(0, num, batch), desc="sampling"):
            g = torch.Generator().manual_seed(seed + i)
            images = pipe(prompts[i : i + batch], generator=g, **kw).images
            for j, (im, text) in enumerate(zip(images, prompts[i : i + batch])):
                name = f"{i + j:06d}.png"
                info = PngImagePlugin.PngInfo()
                info.add_text("prompt", text)
                im.save(os.path.join(out_dir, name), pnginfo=info)
                f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return out_dir
