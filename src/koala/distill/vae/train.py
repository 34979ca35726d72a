"""The tiny-decoder loop (``koala vae distill``): batches from :mod:`koala.data`, teacher decodes as targets, an
``AutoencoderTiny`` trained to match them, checkpoints that resume bit-exactly, and the final model folder.

Layout of ``OUT``::

    checkpoints/step-0000100/   vae/ (AutoencoderTiny, safetensors), trainer_state.pt (optimizer), state.json
    config.yaml, metrics.jsonl  the recipe as resolved; the logged losses
    config.json, diffusion_pytorch_model.safetensors, koala_vae.json, README.md   written at the end

The data order depends on the seed only and each sample's posterior noise on its position in the stream
(:func:`koala.distill.step.sample_generators`), and the learning rate on the step alone
(:func:`koala.distill.step.lr_factor`), so ``train.resume=latest`` continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from ...errors import KoalaError
from ...recipes import dump_recipe
from ...utils.devices import check_dtype_on_device, parse_device, parse_dtype
from ...utils.files import atomic_output_dir, read_json
from ...utils.signals import StopRequest
from ..checkpoint import checkpoint_root, list_checkpoints, resolve_resume
from ..step import lr_factor, sample_generators, set_lr
from .config import VaeDistillConfig
from .models import (
    RECORD,
    build_tiny_vae,
    load_teacher_vae,
    model_card,
    save_tiny_vae,
    scaled_latents,
    teacher_decode,
    teacher_vae_dir,
    tiny_decode,
)

FINAL_FILES = (RECORD, "README.md", "config.json")  # config.json last: a folder without it is not a model yet


def distill_vae(cfg: VaeDistillConfig, log=print) -> dict:
    """Train the tiny VAE per ``cfg`` (see :mod:`koala.distill.vae.config`); returns a summary."""
    run = VaeRun(cfg, log)
    t = cfg.train
    try:
        with StopRequest() as stop:
            while run.step < t.max_steps:
                run.train_step()
                done = run.step == t.max_steps
                stop_now = stop.requested is not None
                if (t.checkpoint_every and run.step % t.checkpoint_every == 0) or done or stop_now:
                    run.checkpoint()
                if stop_now:
                    run.preempted = stop.requested
                    break
    finally:
        run.bar.close()
    if run.preempted is None:
        run.finish()
    return run.summary()


def _check_out(out: str, resume: str | None) -> None:
    """Refuse a folder that already holds a run or a finished model, unless the run is resumed (a finished model
    is then replaced by the longer run's at its end)."""
    if os.path.isfile(os.path.join(out, "config.json")) and not resume:
        raise KoalaError(
            f"{out} already holds a tiny VAE (config.json); choose another --out, or train it further with "
            "--resume latest train.max_steps=MORE",
            option="out",
        )
    if os.path.isdir(out) and os.listdir(out) and not resume:
        raise KoalaError(
            f"{out} already holds a run ({', '.join(sorted(os.listdir(out))[:4])}); continue it with --resume "
            "latest or choose another --out",
            option="out",
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise KoalaError(f"{out} exists and is a file; --out needs a folder", option="out")


class VaeRun:
    """One tiny-VAE run: teacher, student, optimizer, the data stream (resumed where the checkpoint left it)."""

    def __init__(self, cfg: VaeDistillConfig, log=print):
        from ...data import make_dataloader
        from ...data.cache import read_cache_config
        from ...data.config import normalize_data_cfg

        self.cfg, t, self.log = cfg, cfg.train, log
        self.out = os.path.abspath(cfg.out)
        resume = resolve_resume(t.resume, self.out)
        _check_out(self.out, t.resume)
        if t.cpu_threads:
            torch.set_num_threads(int(t.cpu_threads))
        self.device = parse_device(t.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tdt = parse_dtype(t.teacher_dtype)
        check_dtype_on_device(tdt, self.device)
        vae_dir = teacher_vae_dir(cfg.teacher)
        self.teacher_cfg = read_json(os.path.join(vae_dir, "config.json"))
        torch.manual_seed(t.seed)
        self.tiny = build_tiny_vae(cfg.model, self.teacher_cfg).to(self.device).train()  # checks before any load
        self.teacher = load_teacher_vae(vae_dir, tdt, self.device)
        self.state = self._resume_state(resume)
        self.step = self.state["step"] if resume else 0
        data = normalize_data_cfg(cfg.data)
        pipeline = cfg.teacher if os.path.isfile(os.path.join(cfg.teacher, "model_index.json")) else None
        res = read_cache_config(data["path"])["resolution"] if data["type"] == "cache" else t.resolution
        loader = make_dataloader(
            cfg.data,
            batch_size=t.batch_size,
            resolution=res,
            seed=t.seed,
            num_workers=t.num_workers,
            pipeline_dir=pipeline,
            skip_batches=self.step,
        )
        self.resolution, self.data = res, iter(loader)
        self.first = next(self.data) if self.step < t.max_steps else None  # a bad source fails before any write
        if self.first is not None and "latents" in self.first:
            self._check_latents(self.first["latents"])
        self.optimizer = self._optimizer()
        if resume:
            self._load(resume)
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "config.yaml"), "w") as f:
            f.write(dump_recipe(cfg))
        from ...utils.console import progress_bar

        self.bar = progress_bar(total=t.max_steps, initial=self.step, disable=not t.progress, desc="vae distill")
        self.preempted, self.last_ckpt, self.losses = None, resume, []

    def _check_latents(self, z: torch.Tensor) -> None:
        want = self.teacher_cfg["latent_channels"]
        if z.shape[1] != want:
            raise KoalaError(
                f"{self.cfg.data.get('path')}: the cached latents have {z.shape[1]} channels, the teacher VAE "
                f"{want}; use a cache made with this teacher",
                option="data.path",
            )

    def _resume_state(self, resume: str | None) -> dict:
        if not resume:
            return {}
        state = read_json(os.path.join(resume, "state.json"))
        if state.get("kind") != "vae":
            raise KoalaError(f"{resume}: not a `koala vae distill` checkpoint", option="train.resume")
        if state["batch_size"] != self.cfg.train.batch_size:
            raise KoalaError(
                f"{resume} was trained with train.batch_size {state['batch_size']}, this run asks for "
                f"{self.cfg.train.batch_size}; resume with the same batch size (the data stream would differ)",
                option="train.batch_size",
            )
        return state

    def _optimizer(self):
        t = self.cfg.train
        self.tiny.encoder.requires_grad_(bool(self.cfg.model.encoder))
        params = [p for p in self.tiny.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)

    def _load(self, path: str) -> None:
        from safetensors.torch import load_file

        weights = os.path.join(path, "vae", "diffusion_pytorch_model.safetensors")
        try:
            self.tiny.load_state_dict(load_file(weights, device=str(self.device)), strict=True)
        except RuntimeError as err:
            raise KoalaError(
                f"{path}: checkpoint does not fit this tiny VAE (other model.*?): {str(err)[:200]}"
            ) from err
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def targets(self, batch: dict, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, teacher image, teacher latent mean or None)`` of a batch: cached latents as they are, or images
        encoded by the teacher (a sample drawn with each sample's own generator, or the mean)."""
        if "latents" in batch:
            z = batch["latents"].to(self.device, torch.float32)
            return z, teacher_decode(self.teacher, z), None
        px = batch["pixel_values"].to(self.device, next(self.teacher.parameters()).dtype)
        dist = self.teacher.encode(px).latent_dist
        mean = dist.mean.float()
        if self.cfg.train.latent == "sample":
            noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(self.device)
            raw = mean + dist.std.float() * noise
        else:
            raw = mean
        z = scaled_latents(self.teacher, raw)
        return z, teacher_decode(self.teacher, z), scaled_latents(self.teacher, mean)

    def compute_losses(self, batch: dict, gens) -> dict[str, torch.Tensor]:
        loss_cfg = self.cfg.loss
        z, target, z_mean = self.targets(batch, gens)
        pred = tiny_decode(self.tiny, z)
        out = {"l1": F.l1_loss(pred, target), "l2": F.mse_loss(pred, target)}
        total = loss_cfg.l1 * out["l1"] + loss_cfg.l2 * out["l2"]
        if self.cfg.model.encoder:
            px = batch["pixel_values"].to(self.device, torch.float32)
            out["latent"] = F.mse_loss(self.tiny.encode(px).latents, z_mean)
            total = total + loss_cfg.latent * out["latent"]
        out["total"] = total
        return out

    def train_step(self) -> None:
        t = self.cfg.train
        batch, self.first = (self.first, None) if self.first is not None else (next(self.data), None)
        gens = sample_generators(t.seed, self.step, 0, t.batch_size, 1)
        losses = self.compute_losses(batch, gens)
        losses["total"].backward()
        params = [p for p in self.tiny.parameters() if p.requires_grad]
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        set_lr(self.optimizer, t.lr * lr_factor(self.step, t))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        logs = {k: float(v.detach()) for k, v in losses.items()}
        self.losses.append(logs["total"])
        self.bar.update(1)
        self.bar.set_postfix(**{k: f"{v:.4f}" for k, v in logs.items()})
        if self.step % t.log_every == 0 or self.step == t.max_steps:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step, **{f"loss/{k}": v for k, v in logs.items()}}) + "\n")

    # ------------------------------------------------------------------ outputs
    def checkpoint(self) -> None:
        t = self.cfg.train
        final = os.path.join(checkpoint_root(self.out), f"step-{self.step:07d}")
        with atomic_output_dir(final, overwrite=True) as tmp:
            self.tiny.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
            torch.save({"optimizer": self.optimizer.state_dict()}, os.path.join(tmp, "trainer_state.pt"))
            state = {"kind": "vae", "step": self.step, "batch_size": t.batch_size, "config": self.cfg.to_dict()}
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f, indent=1)
        if t.keep_checkpoints:
            for _, old in list_checkpoints(self.out)[: -t.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_ckpt = final
        self.bar.write(f"checkpoint saved: {final}")

    def record(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        scale = self.teacher_cfg.get("scaling_factor", 1.0)
        loss = self.cfg.loss
        return {
            "teacher": {
                "path": os.path.abspath(self.cfg.teacher),
                "latent_channels": self.teacher_cfg["latent_channels"],
                "scaling_factor": scale,
                "shift_factor": self.teacher_cfg.get("shift_factor"),
                "params": count(self.teacher),
            },
            "params": {
                "decoder": count(self.tiny.decoder),
                **({"encoder": count(self.tiny.encoder)} if self.cfg.model.encoder else {}),
            },
            "step": self.step,
            "batch_size": self.cfg.train.batch_size,
            "resolution": self.resolution,
            "loss": f"l1 {loss.l1} + l2 {loss.l2}" + (f" + latent {loss.latent}" if self.cfg.model.encoder else ""),
            "last_loss": self.losses[-1] if self.losses else float("nan"),
            "config": self.cfg.to_dict(),
        }

    def finish(self) -> None:
        """Write the model into ``OUT`` from a temporary folder, ``config.json`` last (no half-written model)."""
        tmp = tempfile.mkdtemp(prefix=".final-", dir=self.out)
        try:
            save_tiny_vae(self.tiny.eval(), tmp, self.record(), model_card(self.record()))
            names = sorted(set(os.listdir(tmp)) - set(FINAL_FILES)) + list(FINAL_FILES)
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(self.out, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def summary(self) -> dict:
        return {
            "step": self.step,
            "out": self.out,
            "checkpoint": self.last_ckpt,
            "preempted": self.preempted,
            "losses": self.losses,
            "finished": self.preempted is None,
        }
