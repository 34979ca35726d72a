"""The KOALA distillation step: L_task + L_outKD + L_featKD with feature hooks through the layer map.

:class:`Distiller` holds the models, hooks and optimizer. Its micro-step (:meth:`Distiller.micro_step`) is the only
place the KD step is assembled: the trainer (:mod:`koala.distill.trainer`), ``koala bench train`` and the tests all
call it. Noise, timesteps, VAE sampling and caption dropout come from one generator per sample seeded by the
sample's position in the global stream (:func:`sample_generators`), so a resumed run continues exactly and (for
sample-split sources) N processes x batch B equal 1 process x batch N*B.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ..errors import KoalaError
from ..families.sampling import record_sampling
from ..utils.attention import attention_context
from ..utils.compile import compile_module
from ..utils.extras import require
from .checkpoint import list_checkpoints
from .config import DistillConfig, RunLayout, TrainConfig
from .controlnet import ControlNetKD, check_control
from .fewstep import make_objective
from .hooks import FeatureRecorder, feature_pairs, unwrap
from .items import KDItem, Prepared
from .losses import FEATURE_LOSSES, Losses, kd_losses, prediction_target
from .models import encode_batch, load_models
from .sharding import shard_student

RESIDUALS = "controlnet/residuals"  # the teacher ControlNet's residuals among an item's teacher features


def sample_generators(
    seed: int, step: int, micro: int, batch_size: int, grad_accum: int, rank: int = 0, world_size: int = 1
) -> list[torch.Generator]:
    """One CPU generator per sample of a micro-batch, seeded by the sample's position in the *global* stream.

    Rank ``r``'s sample ``j`` of micro-step ``micro`` at ``step`` is global sample
    ``((step * grad_accum + micro) * batch_size + j) * world_size + r`` -- the position the koala.data loader
    gives it (ranks take every world_size-th sample). VAE sampling, caption dropout, noise and timestep of a
    sample therefore depend only on that position, so N processes x batch B and 1 process x batch N*B train
    on the same samples with the same randomness (equal weights up to float summation order) -- for sources
    split by sample (folder, parquet/csv, hf_disk, synthetic), without aspect buckets, and with the same
    ``num_workers`` in both runs. Webdataset and cache sources split by shard, so there the two runs see other
    samples; determinism and exact resume hold for every source.
    """
    first = (step * grad_accum + micro) * batch_size
    return [
        torch.Generator().manual_seed(seed * 1_000_003 + (first + j) * world_size + rank) for j in range(batch_size)
    ]


def make_optimizer(params, t: TrainConfig, world_size: int = 1):
    """AdamW (fused or 8-bit per config) or CAME (PixArt's optimizer, from came-pytorch); with
    ``train.shard_optimizer`` and several processes, wrapped in ZeroRedundancyOptimizer so each process holds the
    states of 1/N of the parameters."""
    kw = dict(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "came":
        cls = require("came_pytorch", "came", "train.optimizer=came").CAME
        kw.update(betas=tuple(t.came_betas), eps=tuple(t.came_eps))
    elif t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise KoalaError(
                "train.optimizer=adamw8bit needs bitsandbytes (pip install 'koala-diffusion[bnb]'); "
                "or use train.optimizer=adamw",
                option="train.optimizer",
            ) from err
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
        if t.fused_optimizer:
            kw["fused"] = True
    if t.shard_optimizer and world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(list(params), optimizer_class=cls, **kw)
    return cls(params, **kw)


def lr_factor(step: int, t: TrainConfig) -> float:
    """The learning rate of optimizer update ``step + 1`` over ``train.lr``: a linear warmup over
    ``train.lr_warmup_steps``, then ``train.lr_schedule`` (constant, or a linear / cosine decay that would reach 0
    at ``train.max_steps``). A function of the step alone, so a resumed run continues the schedule exactly."""
    warmup, total = int(t.lr_warmup_steps), int(t.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if t.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in inner_optimizer(optimizer).param_groups:
        group["lr"] = lr


def inner_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def is_sharded(optimizer) -> bool:
    return type(inner_optimizer(optimizer)).__name__ == "ZeroRedundancyOptimizer"


def _no_mark() -> None:
    pass


class Distiller:
    """Holds models, hooks and optimizer. A micro-batch goes :meth:`prepare` -> :meth:`teacher_targets` (together:
    :meth:`kd_item`, or :meth:`kd_stream` for a run, which lets the teacher worker run a micro-batch ahead) ->
    :meth:`micro_step` (student forward, losses, finite check, backward); an optimizer step is :meth:`update`.

    ``models``: ``(teacher, student, layer_map, frozen)`` already built (benchmarks with random real-size
    weights); by default they are loaded per ``cfg`` (:func:`koala.distill.models.load_models`). ``layout``: the
    run's :class:`~koala.distill.config.RunLayout` (default: this process of ``accelerator``, ``cfg`` as written).
    """

    def __init__(
        self,
        cfg: DistillConfig,
        accelerator: Accelerator,
        models: tuple | None = None,
        layout: RunLayout | None = None,
    ):
        self.cfg, self.acc = cfg, accelerator
        self.layout = layout or RunLayout.of(
            cfg, accelerator.num_processes, accelerator.process_index, cfg.train.cpu_threads
        )
        t = cfg.train
        torch.manual_seed(t.seed)
        teacher, student, self.lmap, frozen = models if models is not None else load_models(cfg)
        self.frozen = frozen.to(accelerator.device)
        self.family = frozen.family
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.teacher = teacher.to(accelerator.device, memory_format=self.memory_format)
        self.pairs = feature_pairs(self.lmap, student, teacher, cfg.kd.features, cfg.kd.layer_selection, self.family)
        self.caption_dropout = t.caption_dropout
        # what a dropped caption becomes: the family's unconditional text conditioning (computed once)
        self.uncond = self.family.uncond(self.frozen.parts) if self.caption_dropout > 0 else None
        w = cfg.loss
        self.need_teacher = w.out > 0 or (w.feat > 0 and bool(self.pairs))
        if not (w.feat > 0):
            self.pairs = []
        self.attention = t.attention
        # controlnet.teacher: ControlNet KD (the two ControlNets; the student U-Net frozen unless train_unet)
        self.control = ControlNetKD(self, student) if cfg.controlnet.teacher else None
        if self.control is not None:
            self.pairs = self.control.pairs(self.pairs)
            self.need_teacher = True
        self.objective = make_objective(self)  # fewstep.method: a step objective, or None (KD alone)
        if self.objective is not None:  # the step teacher, LoRA adapters; what the student records for sampling
            self.objective.setup_student(student)
            record_sampling(self.lmap.meta, self.objective.sampling())
            self.lmap.meta["fewstep"] = {"method": cfg.fewstep.method, "lora_rank": cfg.fewstep.lora_rank}
        self._place_student(student)
        trainable = [p for p in student.parameters() if p.requires_grad]
        if self.control is not None:
            trainable += self.control.parameters()
        optimizer = make_optimizer(trainable, t, accelerator.num_processes)
        self.worker = self._start_worker()
        try:  # a failure from here on stops the worker again
            self._hook_compile_and_prepare(student, optimizer)
            if self.objective is not None:
                self.objective.ready()
        except BaseException:
            if self.worker is not None:
                self.worker.close()
            raise

    # ------------------------------------------------------------------ setup
    def _place_student(self, student) -> None:
        """Gradient checkpointing, device, FSDP2 sharding (before the EMA copy, optimizer, hooks and compile: they
        then see the sharded parameters) and the EMA copy."""
        t = self.cfg.train
        if t.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        student.to(self.acc.device, memory_format=self.memory_format)
        self.fsdp = t.fsdp != "none" and self.acc.num_processes > 1
        if self.fsdp:
            shard_student(student, t.fsdp)
        elif t.fsdp != "none":
            self.acc.print(f"train.fsdp={t.fsdp} with one process: nothing to shard, training unsharded")
        self.ema = None
        if t.ema.enabled:
            # foreach: two multi-tensor kernels per update instead of three per parameter (26 -> a few ms on an
            # H200 for KOALA-700M); its temporary copy comes after backward has freed the activations
            self.ema = EMAModel(
                student.parameters(),
                decay=t.ema.decay,
                model_cls=type(student),
                model_config=student.config,
                foreach=True,
            )
            self.ema.to(self.acc.device)

    def _compile_scope(self, model: str) -> str:
        t = self.cfg.train
        return t.compile_scope if model == "student" else (t.teacher_compile_scope or t.compile_scope)

    def _start_worker(self):
        """``train.teacher_worker``: the teacher's KD forwards in a second process, a micro-batch ahead (it gets the
        teacher before any hook; this process keeps the module for validation images only)."""
        t = self.cfg.train
        if not (t.teacher_worker and self.need_teacher):
            return None
        from .teacher_worker import TeacherWorker

        return TeacherWorker(
            self.teacher,
            self.family.name,
            [p.teacher for p in self.pairs],
            self.frozen.weight_dtype,
            self.layout.cpu_threads,
            t.attention,
            self._compile_scope("teacher") if t.compile in ("teacher", "both") else None,
            t.compile_backend,
        )

    def _hook_compile_and_prepare(self, student, optimizer) -> None:
        """Hooks first, compile second (torch.compile traces the registered forward hooks into the graph; in place,
        so the module, its hooks and state_dict keys stay), then accelerate's wrappers."""
        t = self.cfg.train
        self.s_rec = FeatureRecorder(student, [p.student for p in self.pairs], "student")
        self.t_rec = FeatureRecorder(self.teacher, [p.teacher for p in self.pairs], "teacher")
        if t.compile in ("student", "both"):
            compile_module(student, self._compile_scope("student"), t.compile_backend)
        if t.compile in ("teacher", "both") and self.worker is None:  # the worker compiles its own teacher
            compile_module(self.teacher, self._compile_scope("teacher"), t.compile_backend)
        if self.fsdp:  # not prepared: accelerate would wrap the sharded student in DDP (koala.distill.sharding)
            self.student, self.optimizer = student, self.acc.prepare(optimizer, device_placement=[False])
        else:  # a ZeroRedundancyOptimizer is built on the device already (accelerate's placement would ask it for a
            # state_dict, which needs a consolidation first)
            self.student, self.optimizer = self.acc.prepare(
                student, optimizer, device_placement=[True, not is_sharded(optimizer)]
            )

    @property
    def plain_student(self):
        return unwrap(self.acc.unwrap_model(self.student))

    # ------------------------------------------------------------------ a micro-batch
    def prepare(self, batch: dict, gens: list[torch.Generator]) -> Prepared:
        """Encode (raw batch) or move (cached batch), then noise: ``gens`` (one CPU generator per sample,
        :func:`sample_generators`) are drawn in the order VAE sample, caption dropout, noise, timestep."""
        dev, fz = self.acc.device, self.frozen
        latents, cond = encode_batch(batch, fz, dev, gens, self.caption_dropout, self.uncond)
        control = batch.get("control_image")
        if self.control is not None:
            check_control(batch, "the micro-batch")
            control = control.to(dev, torch.float32)
        sched = fz.noise_scheduler
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(dev)
        t = torch.stack([torch.randint(0, sched.config.num_train_timesteps, (), generator=g) for g in gens]).to(dev)
        noisy = sched.add_noise(latents, noise, t).contiguous(memory_format=self.memory_format)
        target = prediction_target(sched, latents, noise, t)
        return Prepared(noisy, t, cond, target, latents, gens, control if self.control is not None else None)

    def teacher_forward(self, p: Prepared) -> torch.Tensor | None:
        """The frozen teacher (``teacher.dtype``, no grad) under feature capture, in this process; None when no
        loss needs it."""
        if not self.need_teacher:
            return None
        td = self.frozen.weight_dtype
        with torch.no_grad(), self.t_rec.capture(), attention_context(self.attention):
            if self.control is None:
                return self.family.forward(self.teacher, p.noisy, p.t, p.cond, dtype=td)
            res = self.control.teacher_residuals(p)
            self._teacher_res = res  # teacher_targets hands it on with the features (residual KD)
            return self.family.forward(self.teacher, p.noisy, p.t, p.cond, dtype=td, extra=res)

    def teacher_targets(self, p: Prepared) -> tuple[torch.Tensor | None, dict]:
        """``(output, features)`` of the teacher for ``p``: from the teacher worker when there is one (waiting for
        it), else :meth:`teacher_forward`."""
        if self.worker is not None:
            self._submit(p)
            return self.worker.result()
        out, feats = self.teacher_forward(p), self.t_rec.pop()
        if self.control is not None:
            feats[RESIDUALS] = self._teacher_res
        return out, feats

    def kd_item(self, batch: dict, gens: list[torch.Generator]) -> KDItem:
        """One micro-batch prepared, with its teacher targets."""
        p = self.prepare(batch, gens)
        return KDItem(p, *self.teacher_targets(p))

    def kd_stream(self, items: Iterable[tuple[dict, list[torch.Generator]]]):
        """:class:`KDItem` for each ``(batch, generators)`` of ``items``, in order. With the teacher worker,
        micro-batch k+1 is prepared and handed to it before k is yielded, so the worker computes it while the
        caller trains on k."""
        if self.worker is None:
            for batch, gens in items:
                yield self.kd_item(batch, gens)
            return
        ahead: collections.deque[Prepared] = collections.deque()
        for batch, gens in items:
            p = self.prepare(batch, gens)
            self._submit(p)
            ahead.append(p)
            if len(ahead) > 1:
                yield KDItem(ahead.popleft(), *self.worker.result())
        while ahead:
            yield KDItem(ahead.popleft(), *self.worker.result())

    def _submit(self, p: Prepared) -> None:
        self.worker.submit(p.noisy, p.t, p.cond)

    def student_forward(self, p: Prepared) -> torch.Tensor:
        """The student (autocast per ``train.mixed_precision``) under feature capture."""
        with self.acc.autocast(), self.s_rec.capture(), attention_context(self.attention):
            if self.control is None:
                return self.family.forward(self.student, p.noisy, p.t, p.cond)
            res = self.control.residuals(self.control.student, p)
            self._student_res = res
            return self.family.forward(self.student, p.noisy, p.t, p.cond, extra=res)

    def losses(self, p: Prepared, s_out: torch.Tensor, t_out: torch.Tensor | None, t_feats: dict) -> Losses:
        """:class:`Losses` (fp32) from the two outputs, the student's captured features and the teacher's."""
        s_feats = self.s_rec.pop()
        if self.pairs and self.student.training and torch.is_grad_enabled():
            dead = [n for n, f in s_feats.items() if not f.requires_grad]
            if dead:
                raise RuntimeError(f"student features {dead[:3]} carry no gradient; featKD would be silently ignored")
        losses = kd_losses(
            s_out,
            p.target,
            t_out if self.cfg.loss.out > 0 else None,
            self.pairs,
            s_feats,
            t_feats,
            self.cfg.loss,
            self.cfg.kd.feature_loss,
            prediction=self.family.prediction(s_out, p.target.shape[1]),
        )
        if self.control is not None:  # residual KD: the student ControlNet's residuals vs the teacher's, slot by slot
            res = self.control.residual_loss(
                self._student_res, t_feats[RESIDUALS], FEATURE_LOSSES[self.cfg.kd.feature_loss]
            )
            losses.total = losses.total + self.cfg.controlnet.residual_kd * res
            losses.extra["cn_res"] = res.detach()
        return losses

    def micro_step(self, item: KDItem, step: int = 0, accum: int = 1, mark: Callable[[], None] = _no_mark) -> Losses:
        """The KD micro-step, the one place it is assembled: the student's forward and the losses, the finite check
        (before anything is updated), backward of ``total / accum``. ``step``: the optimizer step being made (for
        the error message); ``mark``: called after the forward + losses and after backward (``koala bench train``
        times the phases)."""
        p = item.prepared
        if self.objective is not None:  # fewstep.method: the step objective (with the KD terms it keeps)
            losses = self.objective.losses(item)
        else:
            losses = self.losses(p, self.student_forward(p), item.teacher_out, item.teacher_feats)
        self.check_finite(losses, step)
        mark()
        self.backward(losses.total / accum)
        mark()
        return losses

    def check_finite(self, losses: Losses, step: int) -> None:
        """Stop (every process, at the same step) before a non-finite loss updates the weights."""
        bad = torch.tensor([0.0 if torch.isfinite(losses.total).item() else 1.0], device=self.acc.device)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, "sum")
        if bad.item() > 0:
            ckpts = list_checkpoints(self.layout.output_dir)
            last = ckpts[-1][1] if ckpts else "none written yet"
            raise KoalaError(
                f"non-finite loss at step {step} (total={float(losses.total):.4g}, task={float(losses.task):.4g}, "
                f"out={float(losses.out):.4g}, feat={float(losses.feat):.4g}); stopped before updating the weights. "
                f"Last good checkpoint: {last}. Try a lower train.lr, train.mixed_precision=bf16 instead of fp16, "
                f"or check the data."
            )

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` under the same SDPA backend as the forward (gradient checkpointing recomputes
        the forward during backward, and must save the same tensors)."""
        with attention_context(self.attention):
            self.acc.backward(loss)

    # ------------------------------------------------------------------ an optimizer step
    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, zero grads. Returns the logs (grad norm)."""
        logs, max_norm = {}, self.cfg.train.max_grad_norm
        if max_norm:
            if self.fsdp:  # sharded gradients: torch's clip reduces the norm over the processes
                self.acc.unscale_gradients()
                norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
                logs["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            else:
                logs["grad_norm"] = float(self.acc.clip_grad_norm_(self.trained_parameters(), max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The student's parameters, and the student ControlNet's with ControlNet KD (clipped together)."""
        params = list(self.student.parameters())
        return params + self.control.parameters() if self.control is not None else params

    def ema_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.plain_student.parameters())

    def update(self, step: int = 0) -> dict[str, float]:
        """Optimizer update ``step + 1`` after the micro-steps' backward: learning rate per the schedule, clip,
        step, zero grads, EMA. Returns the logs (learning rate, grad norm)."""
        lr = self.cfg.train.lr * lr_factor(step, self.cfg.train)
        set_lr(self.optimizer, lr)
        logs = {"lr": lr, **self.optimizer_step()}
        self.ema_step()
        if self.objective is not None:
            logs.update(self.objective.after_update(step))
        return logs

    def close(self) -> None:
        """Remove the feature hooks and stop the teacher worker."""
        self.s_rec.remove()
        self.t_rec.remove()
        if self.objective is not None:
            self.objective.close()
        if self.worker is not None:
            self.worker.close()
