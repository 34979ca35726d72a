"""Train a shapes ControlNet for the packaged teacher on CPU (``koala lab train-controlnet``).

The ControlNet is diffusers' ``ControlNetModel.from_unet(teacher.unet)``: its encoder starts as a copy of the
teacher U-Net's (conv_in, time/text embeddings, down blocks, mid block), its zero-convolutions start at zero.
Its conditioning embedding has two channel stages (``conditioning_channels`` (16, 32)), i.e. one stride-2
convolution, because the shapes VAE downsamples 32 x 32 images by 2 (SDXL's default four stages assume 8).

Training (teacher frozen: VAE, text encoders, U-Net): shapes train scenes and their layouts
(:mod:`koala.lab.layout`) come through ``koala.data`` (``control: layout``, centre crop, no flip); VAE latents
and SDXL text conditioning are computed once. Each step draws a batch from a seeded generator, noises it under
the teacher's schedule, runs the ControlNet on (noisy latents, layout, text) and the frozen U-Net with the
ControlNet's residuals added, and takes the epsilon MSE (min-SNR weighted, as the teacher was trained) as the
loss; AdamW with a linear warmup, then a constant learning rate (as diffusers' ``train_controlnet_sdxl.py``).
10 % of captions are dropped to zeros (the pipeline's unconditional input) so classifier-free guidance works
with the ControlNet. An EMA of the weights is optional (``ema_decay``).

Output ``OUT``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``ControlNetModel.from_pretrained``;
the EMA weights when ``ema_decay`` is set), ``koala_controlnet.json`` (config, loss history, teacher) and
``train_state/`` (trained weights, optimizer, schedule, EMA, generator state), replaced atomically every
``save_every`` steps. Running again with the same ``OUT`` and a larger ``steps`` resumes bit-exactly: the
result equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

from ..errors import KoalaError
from ..families import get_family
from ..utils.files import atomic_output_dir
from .models import IMAGE_SIZE, shapes_teacher_dir
from .shapes import DEFAULT_HELD_OUT, generate_scenes, write_image_folder

META = "koala_controlnet.json"
STATE = "train_state"
RESUME_KEYS = (
    "teacher",
    "num_train",
    "seed",
    "batch_size",
    "lr",
    "warmup",
    "cond_dropout",
    "snr_gamma",
    "ema_decay",
    "conditioning_channels",
)


@dataclass
class ControlNetConfig:
    out: str
    teacher: str | None = None  # shapes teacher pipeline (default: the packaged one)
    num_train: int = 2000  # generated train scenes (with layouts)
    seed: int = 0
    steps: int = 500  # about 12-15 min on a 2-core CPU (benchmarks/results/controlnet-shapes.md)
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 10
    cond_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float | None = None  # e.g. 0.99: save the EMA weights
    conditioning_channels: tuple[int, ...] = (16, 32)
    save_every: int = 20
    max_minutes: float | None = None
    threads: int | None = None
    overwrite: bool = False  # start over in an existing OUT instead of resuming

    def __post_init__(self):
        self.conditioning_channels = tuple(int(c) for c in self.conditioning_channels)
        for key in ("num_train", "steps", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise KoalaError(f"{key} must be 1 or more, got {getattr(self, key)}", option=key)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise KoalaError(f"ema_decay must be between 0 and 1 (or null), got {self.ema_decay}", option="ema_decay")


FIXED = ("out", "teacher", "overwrite")  # given as options, not key=value


def config_from_overrides(overrides: list[str], **fixed) -> ControlNetConfig:
    """``ControlNetConfig`` from ``key=value`` strings (values read as YAML: ``ema_decay=0.99``,
    ``conditioning_channels=[16,32]``, ``max_minutes=null``); unknown keys and bad values named."""
    import dataclasses

    import yaml

    known = [f.name for f in dataclasses.fields(ControlNetConfig) if f.name not in FIXED]
    kw = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key.strip() not in known:
            raise KoalaError(f"{item!r}: expected key=value with key one of {', '.join(known)}", option=key or item)
        try:
            kw[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise KoalaError(f"{item!r}: the value is not valid YAML ({err})", option=key) from None
    try:
        return ControlNetConfig(**fixed, **kw)
    except (TypeError, ValueError) as err:
        raise KoalaError(f"train-controlnet settings: {err}") from None


# ----------------------------------------------------------------------------------------------- data
@dataclass
class ControlData:
    latents: torch.Tensor  # [N, 4, 16, 16], scaled
    control: torch.Tensor  # [N, 3, 32, 32] in [0, 1]
    cond: dict  # prompt_embeds, pooled_prompt_embeds: [N, ...]


@torch.no_grad()
def encode_control_data(pipe, folder: str, batch: int = 256) -> ControlData:
    """The image folder's images, layouts and captions through ``koala.data`` (``control: layout``), encoded by the
    teacher's VAE and text encoders."""
    from ..data import make_dataloader
    from ..utils.console import progress_bar

    fam = get_family("sdxl")
    data_cfg = {
        "type": "folder",
        "path": folder,
        "control": "layout",
        "center_crop": True,
        "random_flip": False,
        "repeat": False,
        "shuffle": False,
    }
    lat, ctrl, conds = [], [], []
    loader = make_dataloader(data_cfg, batch_size=batch, resolution=IMAGE_SIZE)
    for b in progress_bar(loader, desc="encoding data"):
        lat.append(pipe.vae.encode(b["pixel_values"]).latent_dist.mean * pipe.vae.config.scaling_factor)
        ctrl.append(b["control_image"])
        conds.append(
            fam.encode_prompts(
                b["captions"], [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
            )
        )
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return ControlData(torch.cat(lat), torch.cat(ctrl), cond)


def training_data(pipe, cfg: ControlNetConfig) -> ControlData:
    scenes = generate_scenes(cfg.num_train, "train", cfg.seed, IMAGE_SIZE, held_out=DEFAULT_HELD_OUT)
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder(scenes, tmp, IMAGE_SIZE, progress=False)
        return encode_control_data(pipe, tmp)


# ----------------------------------------------------------------------------------------------- training
@dataclass
class Trainer:
    """The ControlNet, its optimizer / schedule / EMA and the batch generator: everything a resume restores."""

    controlnet: ControlNetModel
    unet: torch.nn.Module
    cfg: ControlNetConfig
    noise_scheduler: DDPMScheduler
    time_ids: torch.Tensor
    step: int = 0
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.params = [p for p in self.controlnet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=1e-2)
        warm = max(1, self.cfg.warmup)  # then constant (as diffusers' ControlNet scripts): steps=N continues a run
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.ema = EMAModel(self.controlnet.parameters(), decay=self.cfg.ema_decay) if self.cfg.ema_decay else None
        self.g = torch.Generator().manual_seed(self.cfg.seed + 1)

    def loss(self, data: ControlData) -> torch.Tensor:
        cfg, g, b = self.cfg, self.g, self.cfg.batch_size
        idx = torch.randint(len(data.latents), (b,), generator=g)
        x0 = data.latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        keep = (torch.rand(b, generator=g) >= cfg.cond_dropout).float()
        emb = data.cond["prompt_embeds"][idx] * keep[:, None, None]  # dropped: zeros, SDXL's unconditional input
        added = {"text_embeds": data.cond["pooled_prompt_embeds"][idx] * keep[:, None], "time_ids": self.time_ids[:b]}
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        down, mid = self.controlnet(
            xt,
            t,
            encoder_hidden_states=emb,
            controlnet_cond=data.control[idx],
            added_cond_kwargs=added,
            return_dict=False,
        )
        pred = self.unet(
            xt,
            t,
            encoder_hidden_states=emb,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        snr = compute_snr(self.noise_scheduler, t)
        w = torch.clamp(snr, max=cfg.snr_gamma) / snr if cfg.snr_gamma else torch.ones(b)
        return (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    def train_step(self, data: ControlData) -> float:
        loss = self.loss(data)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.step(self.controlnet.parameters())
        self.step += 1
        return float(loss.detach())

    # -- checkpoints
    def state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "schedule": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.g.get_state(),
        }

    def load_state(self, state_dir: str) -> None:
        from safetensors.torch import load_file

        self.controlnet.load_state_dict(load_file(os.path.join(state_dir, "controlnet.safetensors")))
        st = torch.load(os.path.join(state_dir, "state.pt"), weights_only=True)  # written by save() below
        self.step = int(st["step"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        self.g.set_state(st["generator"])

    def save(self, out: str, meta: dict) -> None:
        """``out`` replaced atomically: the (EMA) ControlNet for diffusers, ``koala_controlnet.json`` and
        ``train_state``."""
        from safetensors.torch import save_file

        with atomic_output_dir(out, overwrite=True) as tmp:
            params = list(self.controlnet.parameters())
            if self.ema is not None:  # the EMA weights for diffusers, the trained ones back for training
                self.ema.store(params)
                self.ema.copy_to(params)
            try:
                self.controlnet.save_pretrained(tmp, safe_serialization=True)
            finally:
                if self.ema is not None:
                    self.ema.restore(params)
            os.makedirs(os.path.join(tmp, STATE))
            sd = {k: v.contiguous() for k, v in self.controlnet.state_dict().items()}
            save_file(sd, os.path.join(tmp, STATE, "controlnet.safetensors"))
            torch.save(self.state(), os.path.join(tmp, STATE, "state.pt"))
            with open(os.path.join(tmp, META), "w") as f:
                json.dump({**meta, "step": self.step, "history": self.history}, f, indent=1)


def resume_point(cfg: ControlNetConfig) -> str | None:
    """``OUT/train_state`` when ``OUT`` is an unfinished run of the same settings; refusals for anything else."""
    if not os.path.exists(cfg.out) or cfg.overwrite:
        return None
    meta_path = os.path.join(cfg.out, META)
    if not os.path.isdir(cfg.out) or not os.path.isfile(meta_path):
        raise KoalaError(
            f"{cfg.out} exists and is not a koala ControlNet run ({META} missing); choose another "
            "--out or pass --overwrite",
            option="overwrite",
        )
    with open(meta_path) as f:
        old = json.load(f)["config"]
    mine = _resume_view(asdict(cfg))
    diff = [k for k in RESUME_KEYS if _resume_view(old).get(k) != mine.get(k)]
    if diff:
        raise KoalaError(
            f"{cfg.out} is a run with other settings ({', '.join(diff)} differ), so it cannot be resumed; "
            "use the same settings, another --out, or --overwrite",
            option="overwrite",
        )
    return os.path.join(cfg.out, STATE)


def _resume_view(d: dict) -> dict:
    return {
        **d,
        "teacher": os.path.abspath(d["teacher"]) if d.get("teacher") else None,
        "conditioning_channels": list(d.get("conditioning_channels") or []),
    }


def load_teacher(path: str):
    from diffusers import StableDiffusionXLPipeline

    from ..families import family_of

    if family_of(path).name != "sdxl":
        raise KoalaError(f"{path}: train-controlnet needs an SDXL-topology shapes teacher", option="teacher")
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=torch.float32)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.unet):
        m.requires_grad_(False).eval()
    return pipe


def train_controlnet(cfg: ControlNetConfig, log=print) -> dict:
    """Train (or resume) the shapes ControlNet; returns the run's summary (steps, minutes, first/last loss)."""
    from ..utils.console import progress_bar

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.teacher = cfg.teacher or shapes_teacher_dir()
    state_dir = resume_point(cfg)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    pipe = load_teacher(cfg.teacher)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=cfg.conditioning_channels)
    controlnet.train()
    data = training_data(pipe, cfg)
    size = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * cfg.batch_size)
    tid = get_family("sdxl").micro_conditions(
        {"original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size}
    )["add_time_ids"]
    tr = Trainer(controlnet, pipe.unet, cfg, DDPMScheduler.from_config(pipe.scheduler.config), tid)
    meta = {
        "config": asdict(cfg),
        "teacher": os.path.abspath(cfg.teacher),
        "control": "layout",
        "sampling": {"num_inference_steps": 20, "guidance_scale": 5.0},
    }
    if state_dir:
        tr.load_state(state_dir)
        with open(os.path.join(cfg.out, META)) as f:
            tr.history = json.load(f)["history"]
        log(f"resuming {cfg.out} at step {tr.step}")
    log(f"data: {len(data.latents)} scenes with layouts; ControlNet {sum(p.numel() for p in tr.params):,} params")
    bar = progress_bar(range(tr.step, cfg.steps), desc="ControlNet", dynamic_ncols=True)
    losses = []
    for _ in bar:
        losses.append(tr.train_step(data))
        if tr.step % 10 == 0 or tr.step == cfg.steps:
            tr.history.append({"step": tr.step, "loss": round(sum(losses) / len(losses), 5)})
            bar.set_postfix(loss=f"{tr.history[-1]['loss']:.4f}")
            losses = []
        stop = cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes
        if stop or (cfg.save_every and tr.step % cfg.save_every == 0) or tr.step == cfg.steps:
            tr.save(cfg.out, meta)
        if stop:
            log(f"time budget of {cfg.max_minutes} min reached at step {tr.step}; run again to continue")
            break
    if not os.path.isfile(os.path.join(cfg.out, META)) or tr.step == 0:
        tr.save(cfg.out, meta)
    hist = tr.history
    return {
        "out": os.path.abspath(cfg.out),
        "step": tr.step,
        "minutes": round((time.time() - t0) / 60, 2),
        "first_loss": hist[0]["loss"] if hist else None,
        "last_loss": hist[-1]["loss"] if hist else None,
    }
