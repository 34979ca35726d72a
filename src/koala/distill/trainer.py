"""The KOALA distillation loop on accelerate: L_task + L_outKD + L_featKD with hooks through the layer map.

One optimizer step = ``train.grad_accum`` micro-batches per process. Noise, timesteps, VAE sampling and
caption dropout come from a generator seeded by (seed, rank, step, micro-step), and the data order depends
only on the seed, so ``resume=latest`` continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ..errors import KoalaError
from .checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .config import loader_data_cfg
from .hooks import FeatureRecorder, feature_pairs, unwrap
from .losses import kd_losses, prediction_target
from .models import encode_batch, ensure_pipeline, load_models
from .simple_data import make_synthetic_dataloader

log = logging.getLogger("koala.distill")


def make_dataloader(data: dict, *, batch_size: int, resolution: int, seed: int = 0, num_workers: int = 0,
                    rank: int = 0, world_size: int = 1, pipeline_dir: str | None = None, skip_batches: int = 0):
    """The training batches for the ``data`` config section: ``type: synthetic`` in memory, every other type
    through :func:`koala.data.make_dataloader` (minus the trainer's own keys). For ``type: cache``,
    ``pipeline_dir`` must hold the VAE/text encoders that built the cache, else KoalaError here.
    ``skip_batches`` (koala.data types only; see :func:`skips_cheaply`) starts the stream at that batch."""
    cfg, ignored = loader_data_cfg(data)
    if skip_batches and not skips_cheaply(data):
        raise KoalaError("skip_batches needs a koala.data type with repeat: true; replay the stream instead")
    if cfg.get("type", "synthetic") == "synthetic":
        return make_synthetic_dataloader(cfg, batch_size=batch_size, resolution=resolution, seed=seed, rank=rank,
                                         world_size=world_size)
    if ignored:
        log.warning("data.%s: only used by data.type synthetic; ignored for data.type %s", ", data.".join(ignored),
                    cfg.get("type"))
    from ..data import make_dataloader as data_loader

    return data_loader(cfg, batch_size=batch_size, resolution=resolution, seed=seed, num_workers=num_workers,
                       rank=rank, world_size=world_size, pipeline_dir=pipeline_dir, skip_batches=skip_batches)


def skips_cheaply(data: dict) -> bool:
    """Whether a resume can start the loader at its batch (koala.data, infinite stream) instead of replaying:
    not for the in-memory ``synthetic`` type, nor for ``repeat: false`` (each pass restarts; the trainer
    re-iterates it)."""
    return data.get("type", "synthetic") != "synthetic" and data.get("repeat", True) is not False


def checkpoint_step(path: str) -> int:
    with open(os.path.join(path, "state.json")) as f:
        return int(json.load(f)["step"])


def micro_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 1009 + micro)


def make_optimizer(params, tcfg: dict):
    kw = dict(lr=tcfg["lr"], betas=tuple(tcfg["adam_betas"]), eps=tcfg["adam_eps"], weight_decay=tcfg["weight_decay"])
    if tcfg["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise KoalaError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                             "or use train.optimizer=adamw") from err
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def infinite(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise KoalaError("the data loader yielded no batches (dataset smaller than one batch?)")
        epoch += 1


class Distiller:
    """Holds models, hooks and optimizer; :meth:`step_losses` is one micro-step's forward (used by tests too)."""

    def __init__(self, cfg: dict, accelerator: Accelerator):
        self.cfg, self.acc = cfg, accelerator
        tcfg = cfg["train"]
        torch.manual_seed(tcfg["seed"])
        teacher, student, self.lmap, frozen = load_models(cfg)
        self.frozen = frozen.to(accelerator.device)
        self.teacher = teacher.to(accelerator.device)
        self.pairs = feature_pairs(self.lmap, student, teacher, cfg["kd"]["features"], cfg["kd"]["layer_selection"])
        w = cfg["loss"]
        self.need_teacher = w["out"] > 0 or (w["feat"] > 0 and bool(self.pairs))
        if not (w["feat"] > 0):
            self.pairs = []
        if tcfg["gradient_checkpointing"]:
            student.enable_gradient_checkpointing()
        student.to(accelerator.device)
        self.ema = None
        if tcfg["ema"]["enabled"]:
            self.ema = EMAModel(student.parameters(), decay=tcfg["ema"]["decay"], model_cls=type(student),
                                model_config=student.config)
            self.ema.to(accelerator.device)
        optimizer = make_optimizer(student.parameters(), tcfg)
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.s_rec = FeatureRecorder(self.student, [p.student for p in self.pairs], "student")
        self.t_rec = FeatureRecorder(self.teacher, [p.teacher for p in self.pairs], "teacher")

    @property
    def plain_student(self):
        return unwrap(self.acc.unwrap_model(self.student))

    def step_losses(self, batch: dict, g: torch.Generator):
        """Encode, noise, run teacher (no grad) and student, return :class:`Losses` (fp32)."""
        dev, fz, cfg = self.acc.device, self.frozen, self.cfg
        latents, pe, pooled, ids = encode_batch(batch, fz, dev, g, cfg["data"].get("caption_dropout", 0.0))
        sched = fz.noise_scheduler
        noise = torch.randn(latents.shape, generator=g).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        target = prediction_target(sched, latents, noise, t)
        t_out = None
        if self.need_teacher:
            td = fz.weight_dtype
            with torch.no_grad(), self.t_rec.capture():
                t_out = self.teacher(noisy.to(td), t, pe.to(td),
                                     added_cond_kwargs={"text_embeds": pooled.to(td), "time_ids": ids.to(td)}).sample
        with self.acc.autocast(), self.s_rec.capture():
            s_out = self.student(noisy, t, pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        s_feats, t_feats = self.s_rec.pop(), self.t_rec.pop()
        if self.pairs and self.student.training and torch.is_grad_enabled():
            dead = [n for n, f in s_feats.items() if not f.requires_grad]
            if dead:
                raise RuntimeError(f"student features {dead[:3]} carry no gradient; featKD would be silently ignored")
        return kd_losses(s_out, target, t_out if self.cfg["loss"]["out"] > 0 else None, self.pairs, s_feats, t_feats,
                         self.cfg["loss"], self.cfg["kd"]["normalize"])


def _check_finite(acc: Accelerator, losses, step: int, output_dir: str) -> None:
    bad = torch.tensor([0.0 if torch.isfinite(losses.total).item() else 1.0], device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")
    if bad.item() > 0:
        ckpts = list_checkpoints(output_dir)
        last = ckpts[-1][1] if ckpts else "none written yet"
        raise KoalaError(
            f"non-finite loss at step {step} (total={float(losses.total):.4g}, task={float(losses.task):.4g}, "
            f"out={float(losses.out):.4g}, feat={float(losses.feat):.4g}); stopped before updating the weights. "
            f"Last good checkpoint: {last}. Try a lower train.lr, train.mixed_precision=bf16 instead of fp16, "
            f"or check the data.")


def train(cfg: dict) -> dict:
    """Run distillation per ``cfg`` (see :mod:`koala.distill.config`). Returns a summary dict."""
    tcfg = cfg["train"]
    out_dir = os.path.abspath(tcfg["output_dir"])
    cfg["train"]["output_dir"] = out_dir
    if tcfg["cpu_threads"]:
        torch.set_num_threads(int(tcfg["cpu_threads"]))
    acc = Accelerator(mixed_precision=tcfg["mixed_precision"])
    accum, bs = tcfg["grad_accum"], tcfg["batch_size"]
    resume = resolve_resume(tcfg["resume"], out_dir)
    start = checkpoint_step(resume) if resume else 0
    # continue the data stream where the checkpoint left it: koala.data skips the batches without decoding
    # them; the in-memory synthetic stream (and a repeat: false one) is replayed below
    skip = start * accum if skips_cheaply(cfg["data"]) else 0
    # the data first: a bad source or a cache built by other encoders is refused before any model is loaded
    loader = make_dataloader(cfg["data"], batch_size=bs, resolution=tcfg["resolution"], seed=tcfg["seed"],
                             num_workers=tcfg["num_workers"], rank=acc.process_index, world_size=acc.num_processes,
                             pipeline_dir=ensure_pipeline(cfg), skip_batches=skip)
    d = Distiller(cfg, acc)
    scaler = getattr(acc, "scaler", None)
    step = 0
    if resume:
        step = load_checkpoint(resume, d.plain_student, d.ema, d.optimizer, scaler)
        if d.ema is not None:
            d.ema.to(acc.device)
        acc.print(f"resumed from {resume} at step {step}")
    data = infinite(loader)
    for _ in range(step * accum - skip):
        next(data)

    writer = None
    if acc.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            from ..recipes import dump_recipe
            f.write(dump_recipe(cfg))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(out_dir, "logs"))
    from tqdm.auto import tqdm
    bar = tqdm(total=tcfg["max_steps"], initial=step, disable=not (acc.is_main_process and tcfg["progress"]),
               desc="distill", dynamic_ncols=True)
    last_ckpt, vcfg, t0 = None, cfg["validation"], time.perf_counter()
    samples_per_step = bs * accum * acc.num_processes
    try:
        while step < tcfg["max_steps"]:
            logs: dict[str, float] = {}
            for micro in range(accum):
                g = micro_generator(tcfg["seed"], acc.process_index, step, micro)
                sync = acc.no_sync(d.student) if micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    losses = d.step_losses(next(data), g)
                    _check_finite(acc, losses, step + 1, out_dir)
                    acc.backward(losses.total / accum)
                for k, v in losses.scalars(d.pairs).items():
                    logs[k] = logs.get(k, 0.0) + v / accum
            if tcfg["max_grad_norm"]:
                logs["grad_norm"] = float(acc.clip_grad_norm_(d.student.parameters(), tcfg["max_grad_norm"]))
            d.optimizer.step()
            d.optimizer.zero_grad(set_to_none=True)
            if d.ema is not None:
                d.ema.step(d.plain_student.parameters())
            step += 1
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            logs["samples_per_s"] = samples_per_step / max(dt, 1e-9)
            logs["lr"] = tcfg["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss/total']:.4f}", task=f"{logs['loss/task']:.4f}",
                            out=f"{logs['loss/out']:.4f}", feat=f"{logs['loss/feat']:.4f}",
                            sps=f"{logs['samples_per_s']:.1f}")
            if acc.is_main_process and (step % tcfg["log_every"] == 0 or step == tcfg["max_steps"]):
                for k, v in logs.items():
                    writer.add_scalar(k, v, step)
                with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, **logs}) + "\n")
            done = step == tcfg["max_steps"]
            if (tcfg["checkpoint_every"] and step % tcfg["checkpoint_every"] == 0) or done:
                if acc.is_main_process:
                    last_ckpt = save_checkpoint(out_dir, step, d.plain_student, d.lmap, d.ema, d.optimizer, scaler,
                                                cfg, tcfg["keep_checkpoints"])
                    bar.write(f"checkpoint saved: {last_ckpt}")
                acc.wait_for_everyone()
            if vcfg["every"] and (step % vcfg["every"] == 0 or done):
                if acc.is_main_process:
                    validate_now(d, cfg, step, writer)
                acc.wait_for_everyone()
                t0 = time.perf_counter()
    finally:
        bar.close()
        d.s_rec.remove()
        d.t_rec.remove()
        if writer is not None:
            writer.close()
    ckpts = list_checkpoints(out_dir)
    acc.end_training()
    return {"step": step, "output_dir": out_dir, "checkpoint": last_ckpt or (ckpts[-1][1] if ckpts else None),
            "feature_pairs": len(d.pairs), "rank": acc.process_index, "world_size": acc.num_processes}


def validate_now(d: Distiller, cfg: dict, step: int, writer) -> list[str]:
    from .validation import validate

    return validate(d.plain_student, d.teacher, d.frozen, cfg, step, d.acc.device, writer, d.ema)
