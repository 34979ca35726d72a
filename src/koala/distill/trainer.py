"""The KOALA distillation loop on accelerate: L_task + L_outKD + L_featKD with hooks through the layer map.

One optimizer step = ``train.grad_accum`` micro-batches per process. The model family (SDXL, SD-1.x, ...)
supplies conditioning and stage names; nothing here is family-specific. Noise, timesteps, VAE sampling and
caption dropout come from one generator per sample seeded by the sample's position in the global stream
(:func:`sample_generators`), and the data order depends only on the seed, so ``resume=latest`` continues
exactly where the checkpoint was taken, and (for sample-split sources, see there) N processes x batch B equal
1 process x batch N*B.
Logging goes through ``Accelerator(log_with=...)`` (``train.log_with``: tensorboard by default) plus
``OUTPUT/metrics.jsonl``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ..data import make_dataloader
from ..errors import KoalaError
from ..recipes import dump_recipe
from ..utils.attention import attention_context
from ..utils.compile import compile_module
from ..utils.extras import require
from ..utils.files import existing_parent
from ..utils.signals import StopRequest
from .checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .config import resolve_grad_accum
from .hooks import FeatureRecorder, feature_pairs, unwrap
from .losses import kd_losses, prediction_target
from .models import encode_batch, load_models, teacher_pipeline
from .sharding import gather_states, shard_student


def checkpoint_state(path: str) -> dict:
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def check_resume_layout(state: dict, world_size: int, tcfg: dict, path: str) -> None:
    """Refuse resuming with another number of processes, per-process batch or accumulation: the data split, the
    per-sample noise positions and the batches the resumed stream skips would all change, so the run would not
    continue the one that was stopped. Checkpoints from before koala recorded these are not checked."""
    if "world_size" not in state or tcfg["allow_world_size_change"]:
        return
    saved = state["config"]["train"]
    now = {"processes": world_size, "train.batch_size": tcfg["batch_size"], "train.grad_accum": tcfg["grad_accum"]}
    then = {
        "processes": state["world_size"],
        "train.batch_size": saved["batch_size"],
        "train.grad_accum": saved["grad_accum"],
    }
    diff = [f"{k} {then[k]} -> {now[k]}" for k in now if now[k] != then[k]]
    if diff:
        raise KoalaError(
            f"{path} was written by a run with another batch layout ({', '.join(diff)}; global batch "
            f"{state.get('global_batch', '?')} -> {tcfg['batch_size'] * tcfg['grad_accum'] * world_size}). Resume "
            "with the same number of processes, batch_size and grad_accum, or set train.allow_world_size_change=true "
            "to continue anyway (the data order and noise then differ from an uninterrupted run)",
            option="train.allow_world_size_change",
        )


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


def make_optimizer(params, tcfg: dict, world_size: int = 1):
    """AdamW (fused or 8-bit per config) or CAME (PixArt's optimizer, from came-pytorch); with
    ``train.shard_optimizer`` and several processes, wrapped in ZeroRedundancyOptimizer so each process holds the
    states of 1/N of the parameters."""
    kw = dict(lr=tcfg["lr"], betas=tuple(tcfg["adam_betas"]), eps=tcfg["adam_eps"], weight_decay=tcfg["weight_decay"])
    if tcfg["optimizer"] == "came":
        came = require("came_pytorch", "came", "train.optimizer=came")
        cls = came.CAME
        kw.update(betas=tuple(tcfg["came_betas"]), eps=tuple(tcfg["came_eps"]))
    elif tcfg["optimizer"] == "adamw8bit":
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
        if tcfg.get("fused_optimizer"):
            kw["fused"] = True
    if tcfg.get("shard_optimizer") and world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(list(params), optimizer_class=cls, **kw)
    return cls(params, **kw)


def lr_factor(step: int, tcfg: dict) -> float:
    """The learning rate of optimizer update ``step + 1`` over ``train.lr``: a linear warmup over
    ``train.lr_warmup_steps``, then ``train.lr_schedule`` (constant, or a linear / cosine decay that would reach 0
    at ``train.max_steps``). A function of the step alone, so a resumed run continues the schedule exactly."""
    import math

    warmup, total = int(tcfg.get("lr_warmup_steps") or 0), int(tcfg["max_steps"])
    if step < warmup:
        return (step + 1) / warmup
    schedule = tcfg.get("lr_schedule") or "constant"
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in inner_optimizer(optimizer).param_groups:
        group["lr"] = lr


def inner_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def is_sharded(optimizer) -> bool:
    return type(inner_optimizer(optimizer)).__name__ == "ZeroRedundancyOptimizer"


def infinite(loader):
    """The loader's batches forever (koala.data loaders with ``repeat: true`` already are; this guards the rest)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise KoalaError("the data loader yielded no batches (dataset smaller than one batch?)")


@dataclass
class Prepared:
    """One micro-batch ready for the denoisers: noisy latents, timesteps, conditioning and the task target."""

    noisy: torch.Tensor
    t: torch.Tensor
    cond: dict
    target: torch.Tensor


class Distiller:
    """Holds models, hooks and optimizer. One micro-step is :meth:`step_losses`, made of the phases
    :meth:`prepare`, :meth:`teacher_forward`, :meth:`student_forward` and :meth:`losses` (which
    ``koala bench train`` times one by one); one optimizer step is :meth:`update`.

    ``models``: ``(teacher, student, layer_map, frozen)`` already built (benchmarks with random real-size
    weights); by default they are loaded per ``cfg`` (:func:`koala.distill.models.load_models`).
    """

    def __init__(self, cfg: dict, accelerator: Accelerator, models: tuple | None = None):
        self.cfg, self.acc = cfg, accelerator
        tcfg = cfg["train"]
        torch.manual_seed(tcfg["seed"])
        teacher, student, self.lmap, frozen = models if models is not None else load_models(cfg)
        self.frozen = frozen.to(accelerator.device)
        self.family = frozen.family
        self.memory_format = torch.channels_last if tcfg["channels_last"] else torch.contiguous_format
        self.teacher = teacher.to(accelerator.device, memory_format=self.memory_format)
        self.pairs = feature_pairs(
            self.lmap, student, teacher, cfg["kd"]["features"], cfg["kd"]["layer_selection"], self.family
        )
        self.caption_dropout = tcfg["caption_dropout"]
        # what a dropped caption becomes: the family's unconditional text conditioning (computed once)
        self.uncond = self.family.uncond(self.frozen.parts) if self.caption_dropout > 0 else None
        w = cfg["loss"]
        self.need_teacher = w["out"] > 0 or (w["feat"] > 0 and bool(self.pairs))
        if not (w["feat"] > 0):
            self.pairs = []
        if tcfg["gradient_checkpointing"]:
            student.enable_gradient_checkpointing()
        student.to(accelerator.device, memory_format=self.memory_format)
        # FSDP2 before the EMA copy, optimizer, hooks and compile: they then see the sharded parameters
        self.fsdp = tcfg["fsdp"] != "none" and accelerator.num_processes > 1
        if self.fsdp:
            shard_student(student, tcfg["fsdp"])
        elif tcfg["fsdp"] != "none":
            accelerator.print(f"train.fsdp={tcfg['fsdp']} with one process: nothing to shard, training unsharded")
        self.ema = None
        if tcfg["ema"]["enabled"]:
            # foreach: two multi-tensor kernels per update instead of three per parameter (26 -> a few ms on an
            # H200 for KOALA-700M); its temporary copy comes after backward has freed the activations
            self.ema = EMAModel(
                student.parameters(),
                decay=tcfg["ema"]["decay"],
                model_cls=type(student),
                model_config=student.config,
                foreach=True,
            )
            self.ema.to(accelerator.device)
        optimizer = make_optimizer(student.parameters(), tcfg, accelerator.num_processes)
        scopes = {"student": tcfg["compile_scope"], "teacher": tcfg["teacher_compile_scope"] or tcfg["compile_scope"]}
        compile_teacher = tcfg["compile"] in ("teacher", "both")
        # train.teacher_worker: the teacher's KD forwards run in a second process, a micro-batch ahead (it gets the
        # teacher before any hook; this process keeps the module for validation images only)
        self.worker = None
        if tcfg["teacher_worker"] and self.need_teacher:
            from .teacher_worker import TeacherWorker

            self.worker = TeacherWorker(
                self.teacher,
                self.family.name,
                [p.teacher for p in self.pairs],
                self.frozen.weight_dtype,
                tcfg["cpu_threads"],
                tcfg["attention"],
                scopes["teacher"] if compile_teacher else None,
                tcfg["compile_backend"],
            )
        try:  # a failure from here on stops the worker again
            # hooks first, compile second: torch.compile traces the registered forward hooks into the graph
            self.s_rec = FeatureRecorder(student, [p.student for p in self.pairs], "student")
            self.t_rec = FeatureRecorder(self.teacher, [p.teacher for p in self.pairs], "teacher")
            # in place: the module, its hooks and state_dict keys stay (the worker compiles its own teacher)
            if tcfg["compile"] in ("student", "both"):
                compile_module(student, scopes["student"], tcfg["compile_backend"])
            if compile_teacher and self.worker is None:
                compile_module(self.teacher, scopes["teacher"], tcfg["compile_backend"])
            if self.fsdp:  # not prepared: accelerate would wrap the sharded student in DDP (koala.distill.sharding)
                self.student, self.optimizer = student, accelerator.prepare(optimizer, device_placement=[False])
            else:  # a ZeroRedundancyOptimizer is built on the device already (accelerate's placement would ask it for
                # a state_dict, which needs a consolidation first)
                self.student, self.optimizer = accelerator.prepare(
                    student, optimizer, device_placement=[True, not is_sharded(optimizer)]
                )
        except BaseException:
            if self.worker is not None:
                self.worker.close()
            raise
        self.attention = tcfg["attention"]

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` under the same SDPA backend as the forward (gradient checkpointing recomputes
        the forward during backward, and must save the same tensors)."""
        with attention_context(self.attention):
            self.acc.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, zero grads. Returns the logs (grad norm)."""
        logs, max_norm = {}, self.cfg["train"]["max_grad_norm"]
        if max_norm:
            if self.fsdp:  # sharded gradients: torch's clip reduces the norm over the processes
                self.acc.unscale_gradients()
                norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
                logs["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            else:
                logs["grad_norm"] = float(self.acc.clip_grad_norm_(self.student.parameters(), max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs

    def ema_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.plain_student.parameters())

    def update(self, step: int = 0) -> dict[str, float]:
        """Optimizer update ``step + 1`` after the micro-steps' backward: learning rate per the schedule, clip,
        step, zero grads, EMA. Returns the logs (learning rate, grad norm)."""
        lr = self.cfg["train"]["lr"] * lr_factor(step, self.cfg["train"])
        set_lr(self.optimizer, lr)
        logs = {"lr": lr, **self.optimizer_step()}
        self.ema_step()
        return logs

    @property
    def plain_student(self):
        return unwrap(self.acc.unwrap_model(self.student))

    def prepare(self, batch: dict, gens: list[torch.Generator]) -> Prepared:
        """Encode (raw batch) or move (cached batch), then noise: ``gens`` (one CPU generator per sample,
        :func:`sample_generators`) are drawn in the order VAE sample, caption dropout, noise, timestep."""
        dev, fz = self.acc.device, self.frozen
        latents, cond = encode_batch(batch, fz, dev, gens, self.caption_dropout, self.uncond)
        sched = fz.noise_scheduler
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(dev)
        t = torch.stack([torch.randint(0, sched.config.num_train_timesteps, (), generator=g) for g in gens]).to(dev)
        noisy = sched.add_noise(latents, noise, t).contiguous(memory_format=self.memory_format)
        return Prepared(noisy, t, cond, prediction_target(sched, latents, noise, t))

    def teacher_forward(self, p: Prepared) -> torch.Tensor | None:
        """The frozen teacher (``teacher.dtype``, no grad) under feature capture, in this process; None when no
        loss needs it."""
        if not self.need_teacher:
            return None
        td = self.frozen.weight_dtype
        with torch.no_grad(), self.t_rec.capture(), attention_context(self.attention):
            return self.family.forward(self.teacher, p.noisy, p.t, p.cond, dtype=td)

    def teacher_targets(self, p: Prepared) -> tuple[torch.Tensor | None, dict]:
        """``(output, features)`` of the teacher for ``p``: from the teacher worker when there is one (waiting for
        it), else :meth:`teacher_forward`."""
        if self.worker is not None:
            self._submit(p)
            return self.worker.result()
        return self.teacher_forward(p), self.t_rec.pop()

    def kd_stream(self, items: Iterable[tuple[dict, list[torch.Generator]]]):
        """``(prepared, teacher output, teacher features)`` for each ``(batch, generators)`` of ``items``, in
        order. With the teacher worker, micro-batch k+1 is prepared and handed to it before k is yielded, so the
        worker computes it while the caller trains on k."""
        if self.worker is None:
            for batch, gens in items:
                p = self.prepare(batch, gens)
                yield (p, *self.teacher_targets(p))
            return
        ahead: collections.deque[Prepared] = collections.deque()
        for batch, gens in items:
            p = self.prepare(batch, gens)
            self._submit(p)
            ahead.append(p)
            if len(ahead) > 1:
                yield (ahead.popleft(), *self.worker.result())
        while ahead:
            yield (ahead.popleft(), *self.worker.result())

    def _submit(self, p: Prepared) -> None:
        self.worker.submit(p.noisy, p.t, p.cond)

    def student_forward(self, p: Prepared) -> torch.Tensor:
        """The student (autocast per ``train.mixed_precision``) under feature capture."""
        with self.acc.autocast(), self.s_rec.capture(), attention_context(self.attention):
            return self.family.forward(self.student, p.noisy, p.t, p.cond)

    def losses(self, p: Prepared, s_out: torch.Tensor, t_out: torch.Tensor | None, t_feats: dict | None = None):
        """:class:`Losses` (fp32) from the two outputs and the captured features (the teacher's: ``t_feats``, or
        what its recorder holds)."""
        s_feats = self.s_rec.pop()
        t_feats = self.t_rec.pop() if t_feats is None else t_feats
        if self.pairs and self.student.training and torch.is_grad_enabled():
            dead = [n for n, f in s_feats.items() if not f.requires_grad]
            if dead:
                raise RuntimeError(f"student features {dead[:3]} carry no gradient; featKD would be silently ignored")
        return kd_losses(
            s_out,
            p.target,
            t_out if self.cfg["loss"]["out"] > 0 else None,
            self.pairs,
            s_feats,
            t_feats,
            self.cfg["loss"],
            self.cfg["kd"]["feature_loss"],
            prediction=self.family.prediction(s_out, p.target.shape[1]),
        )

    def step_losses(self, batch: dict, gens: list[torch.Generator]):
        """The KD step's forward: encode, noise, run teacher (no grad) and student, return :class:`Losses` (fp32).
        The one KD step: tests and benchmarks call it (or its phases in this order); the trainer runs the same
        phases through :meth:`kd_stream` (which lets the teacher worker run a micro-batch ahead) and :meth:`losses`."""
        p = self.prepare(batch, gens)
        t_out, t_feats = self.teacher_targets(p)
        return self.losses(p, self.student_forward(p), t_out, t_feats)

    def close(self) -> None:
        """Remove the feature hooks and stop the teacher worker."""
        self.s_rec.remove()
        self.t_rec.remove()
        if self.worker is not None:
            self.worker.close()


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
            f"or check the data."
        )


def _trackers(tcfg: dict) -> list[str]:
    """``train.log_with``: tensorboard (default), wandb, both ("tensorboard,wandb") or none."""
    names = [n.strip() for n in str(tcfg.get("log_with") or "none").split(",") if n.strip() and n.strip() != "none"]
    for n in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(n)
        if module is None:
            raise KoalaError(f"train.log_with {n!r}: choose tensorboard, wandb or none", option="train.log_with")
        try:
            __import__(module)
        except ImportError:
            extra = {"wandb": "koala-diffusion[wandb]"}.get(n, module)
            raise KoalaError(
                f"train.log_with={n} needs the {module} package: pip install '{extra}'", option="train.log_with"
            ) from None
    return names


def train(cfg: dict) -> dict:
    """Run distillation per ``cfg`` (see :mod:`koala.distill.config`). Returns a summary dict."""
    tcfg = cfg["train"]
    out_dir = os.path.abspath(tcfg["output_dir"])
    cfg["train"]["output_dir"] = out_dir
    if tcfg["teacher_worker"] and not tcfg["cpu_threads"]:  # the process and its teacher worker share the cores
        tcfg["cpu_threads"] = max(1, torch.get_num_threads() // 2)
    if tcfg["cpu_threads"]:
        torch.set_num_threads(int(tcfg["cpu_threads"]))
    trackers = _trackers(tcfg)
    acc = Accelerator(mixed_precision=tcfg["mixed_precision"], log_with=trackers or None, project_dir=out_dir)
    tcfg["grad_accum"] = resolve_grad_accum(tcfg, acc.num_processes)  # from train.global_batch when set
    accum, bs, world = tcfg["grad_accum"], tcfg["batch_size"], acc.num_processes
    global_batch = bs * accum * world
    resume = resolve_resume(tcfg["resume"], out_dir)
    if resume:
        check_resume_layout(checkpoint_state(resume), world, tcfg, resume)
    start = checkpoint_state(resume)["step"] if resume else 0
    # the data first: a bad source or a cache built by other encoders is refused before any model is loaded;
    # a resumed run starts the stream where the checkpoint left it (skipped batches are not decoded)
    loader = make_dataloader(
        cfg["data"],
        batch_size=bs,
        resolution=tcfg["resolution"],
        seed=tcfg["seed"],
        num_workers=tcfg["num_workers"],
        rank=acc.process_index,
        world_size=world,
        pipeline_dir=teacher_pipeline(cfg),
        skip_batches=start * accum,
    )
    d = Distiller(cfg, acc)
    scaler = getattr(acc, "scaler", None)
    step = 0
    if resume:
        step = load_checkpoint(resume, d.plain_student, d.ema, d.optimizer, scaler)
        if d.ema is not None:
            d.ema.to(acc.device)
        acc.print(f"resumed from {resume} at step {step}")
    data = infinite(loader)
    if step < tcfg["max_steps"]:  # a source with nothing usable fails here, before anything is written
        data = itertools.chain([next(data)], data)
    if acc.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(dump_recipe(cfg))
    if trackers:
        acc.init_trackers("logs", config=flat_config(cfg))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=tcfg["max_steps"],
        initial=step,
        disable=not (acc.is_main_process and tcfg["progress"]),
        desc="distill",
        dynamic_ncols=True,
    )
    last_ckpt, vcfg, t0 = None, cfg["validation"], time.perf_counter()
    preempted = None
    if acc.is_main_process:
        warn_low_space(out_dir, d, tcfg["keep_checkpoints"], bar.write)
    # the micro-batches to come with their generators, lazily (the teacher worker takes one ahead)
    stream = d.kd_stream(
        (next(data), sample_generators(tcfg["seed"], st, micro, bs, accum, acc.process_index, world))
        for st in range(step, tcfg["max_steps"])
        for micro in range(accum)
    )
    try:
        with StopRequest() as stop:
            while step < tcfg["max_steps"]:
                logs: dict[str, float] = {}
                for micro in range(accum):
                    sync = acc.no_sync(d.student) if micro < accum - 1 else contextlib.nullcontext()
                    with sync:
                        p, t_out, t_feats = next(stream)
                        losses = d.losses(p, d.student_forward(p), t_out, t_feats)
                        _check_finite(acc, losses, step + 1, out_dir)
                        d.backward(losses.total / accum)
                    for k, v in losses.scalars(d.pairs).items():
                        logs[k] = logs.get(k, 0.0) + v / accum
                logs.update(d.update(step))
                step += 1
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                logs["samples_per_s"] = global_batch / max(dt, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{logs['loss/total']:.4f}",
                    task=f"{logs['loss/task']:.4f}",
                    out=f"{logs['loss/out']:.4f}",
                    feat=f"{logs['loss/feat']:.4f}",
                    sps=f"{logs['samples_per_s']:.1f}",
                )
                if step % tcfg["log_every"] == 0 or step == tcfg["max_steps"]:
                    if trackers:
                        acc.log(logs, step=step)
                    if acc.is_main_process:
                        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                            f.write(json.dumps({"step": step, **logs}) + "\n")
                done = step == tcfg["max_steps"]
                stop_now = _any_process(acc, stop.requested is not None)  # every process stops at the same step
                if (tcfg["checkpoint_every"] and step % tcfg["checkpoint_every"] == 0) or done or stop_now:
                    if is_sharded(d.optimizer):  # every process sends its optimizer shard to the main process
                        inner_optimizer(d.optimizer).consolidate_state_dict(to=0)
                    states = (
                        gather_states(d.student, inner_optimizer(d.optimizer), d.ema, keep=acc.is_main_process)
                        if d.fsdp
                        else None
                    )
                    if acc.is_main_process:
                        last_ckpt = write_checkpoint(out_dir, step, d, cfg, scaler, world, last_ckpt, states)
                        bar.write(f"checkpoint saved: {last_ckpt}")
                    acc.wait_for_everyone()
                if stop_now:
                    preempted = stop.requested or "a signal on another process"
                    break
                if vcfg["every"] and (step % vcfg["every"] == 0 or done):
                    if acc.is_main_process or d.fsdp:  # a sharded student's forward needs every process
                        validate_now(d, cfg, step, write=acc.is_main_process)
                    acc.wait_for_everyone()
                    t0 = time.perf_counter()
    finally:
        bar.close()
        d.close()
    ckpts = list_checkpoints(out_dir)
    acc.end_training()
    return {
        "step": step,
        "output_dir": out_dir,
        "checkpoint": last_ckpt or (ckpts[-1][1] if ckpts else None),
        "feature_pairs": len(d.pairs),
        "rank": acc.process_index,
        "world_size": world,
        "preempted": preempted,
    }


def _any_process(acc: Accelerator, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, "sum").item() > 0)


def checkpoint_bytes(d: Distiller) -> int:
    """About what one checkpoint takes on disk: student (+ EMA) weights and the optimizer state."""
    weights = sum(p.numel() * p.element_size() for p in d.plain_student.parameters())
    opt = inner_optimizer(d.optimizer)
    states = {} if is_sharded(d.optimizer) else (getattr(opt, "state", None) or {})  # sharded: the full state is saved
    state = sum(
        t.numel() * t.element_size()
        for st in states.values()
        if isinstance(st, dict)
        for t in st.values()
        if torch.is_tensor(t)
    )
    if not state:  # before the first step (or sharded): AdamW keeps two fp32 moments per parameter
        state = 2 * sum(p.numel() * 4 for p in d.plain_student.parameters())
    return weights * (2 if d.ema is not None else 1) + state


def _free_bytes(out_dir: str) -> int:
    import shutil

    return shutil.disk_usage(existing_parent(out_dir)).free


def warn_low_space(out_dir: str, d: Distiller, keep: int, log=print) -> None:
    """Warn at the start when the disk cannot hold the checkpoints the run will keep (plus one being written)."""
    need = checkpoint_bytes(d) * ((keep or 1) + 1)
    free = _free_bytes(out_dir)
    if free < need:
        log(
            f"warning: {free / 2**30:.2f} GiB free under {out_dir}, but keeping {keep or 'all'} checkpoint(s) of "
            f"about {checkpoint_bytes(d) / 2**30:.2f} GiB each needs {need / 2**30:.2f} GiB"
        )


def write_checkpoint(
    out_dir: str, step: int, d: Distiller, cfg: dict, scaler, world: int, last: str | None, states: dict | None = None
) -> str:
    """Save a checkpoint; refuse early when the disk is too full, and on a failed write keep the previous one
    (checkpoints are written to a temporary folder and renamed) and say which it is."""
    tcfg = cfg["train"]
    ckpts = list_checkpoints(out_dir)
    good = last or (ckpts[-1][1] if ckpts else "none yet")
    need, free = int(1.05 * checkpoint_bytes(d)), _free_bytes(out_dir)
    if free < need:
        raise KoalaError(
            f"not enough disk space for the step-{step} checkpoint under {out_dir}: about "
            f"{need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free. Training stopped; the last good "
            f"checkpoint is {good} (resume with --resume latest after freeing space)"
        )
    try:
        return save_checkpoint(
            out_dir,
            step,
            d.plain_student,
            d.lmap,
            d.ema,
            d.optimizer,
            scaler,
            cfg,
            tcfg["keep_checkpoints"],
            world_size=world,
            states=states,
        )
    except OSError as err:
        raise KoalaError(
            f"writing the step-{step} checkpoint failed ({err.strerror or err}"
            f"{': ' + str(err.filename) if err.filename else ''}); nothing partial was kept. Training "
            f"stopped; the last good checkpoint is {good}"
        ) from err


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """``{"train.lr": 1e-5, ...}`` with lists as strings (what trackers accept as hyperparameters)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def validate_now(d: Distiller, cfg: dict, step: int, write: bool = True) -> list[str]:
    from .validation import validate

    return validate(d.plain_student, d.teacher, d.frozen, cfg, step, d.acc.device, d.acc, d.ema, write=write)
