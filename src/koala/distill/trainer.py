"""The KOALA distillation loop on accelerate (``koala distill``): micro-steps, optimizer updates, logs,
checkpoints, validation images, preemption.

One optimizer step = ``train.grad_accum`` micro-steps (:meth:`koala.distill.step.Distiller.micro_step`) per process.
The model family (SDXL, SD-1.x, ...) supplies conditioning and stage names; nothing here is family-specific. The
data order depends only on the seed and every sample's randomness on its position in the global stream, so
``resume=latest`` continues exactly where the checkpoint was taken. Logging goes through
``Accelerator(log_with=...)`` (``train.log_with``: tensorboard by default) plus ``OUTPUT/metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import time

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from ..data import make_dataloader
from ..data.images import SkipCounter
from ..errors import KoalaError
from ..recipes import dump_recipe
from ..utils.files import append_lines, existing_parent
from ..utils.signals import StopRequest
from ..utils.weights import ENTRY_BYTES, tensor_bytes
from ..utils.writes import writing
from .checkpoint import checkpoint_root, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .config import DistillConfig, RunLayout, resolve_cpu_threads
from .controlnet import check_control
from .hang import Heartbeat, hang_message, heartbeat_interval, is_collective_failure
from .models import teacher_pipeline
from .sharding import gather_states
from .step import Distiller, inner_optimizer, is_sharded, sample_generators

KD_TERMS = ("total", "task", "out", "feat")  # the KD objective's logged terms; a step objective adds its own


def checkpoint_state(path: str) -> dict:
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def check_resume_layout(state: dict, layout: RunLayout, allow_change: bool, path: str) -> None:
    """Refuse resuming with another number of processes, per-process batch or accumulation: the data split, the
    per-sample noise positions and the batches the resumed stream skips would all change, so the run would not
    continue the one that was stopped. Checkpoints from before koala recorded these are not checked."""
    if "world_size" not in state or allow_change:
        return
    saved = state["config"]["train"]
    now = {
        "processes": layout.world_size,
        "train.batch_size": layout.batch_size,
        "train.grad_accum": layout.grad_accum,
    }
    then = {  # checkpoints from before the run layout was recorded: the config held the resolved accumulation
        "processes": state["world_size"],
        "train.batch_size": saved["batch_size"],
        "train.grad_accum": state["grad_accum"] if "grad_accum" in state else saved["grad_accum"],
    }
    diff = [f"{k} {then[k]} -> {now[k]}" for k in now if now[k] != then[k]]
    if diff:
        raise KoalaError(
            f"{path} was written by a run with another batch layout ({', '.join(diff)}; global batch "
            f"{state.get('global_batch', '?')} -> {layout.global_batch}). Resume "
            "with the same number of processes, batch_size and grad_accum, or set train.allow_world_size_change=true "
            "to continue anyway (the data order and noise then differ from an uninterrupted run)",
            option="train.allow_world_size_change",
        )


def infinite(loader):
    """The loader's batches forever (koala.data loaders with ``repeat: true`` already are; this guards the rest)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise KoalaError("the data loader yielded no batches (dataset smaller than one batch?)")


def _trackers(log_with: str | None) -> list[str]:
    """``train.log_with``: tensorboard (default), wandb, both ("tensorboard,wandb") or none."""
    names = [n.strip() for n in str(log_with or "none").split(",") if n.strip() and n.strip() != "none"]
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


def train(cfg: DistillConfig) -> dict:
    """Run distillation per ``cfg`` (see :mod:`koala.distill.config`). Returns a summary dict."""
    run = TrainingRun(cfg)
    t = cfg.train
    try:
        with StopRequest() as stop:
            while run.step < t.max_steps:
                run.train_step()
                done = run.step == t.max_steps
                stop_now = run.any_process(stop.requested is not None)  # every process stops at the same step
                if (t.checkpoint_every and run.step % t.checkpoint_every == 0) or done or stop_now:
                    run.checkpoint()
                if stop_now:
                    run.preempted = stop.requested or "a signal on another process"
                    break
                if cfg.validation.every and (run.step % cfg.validation.every == 0 or done):
                    run.validate()
    except RuntimeError as err:
        if run.layout.world_size > 1 and is_collective_failure(err):
            raise run.hang_error(err) from err
        raise
    finally:
        run.close()
    return run.summary()


class TrainingRun:
    """One process's distillation run: its accelerator and :class:`RunLayout`, the :class:`Distiller`, the data
    stream (resumed where the checkpoint left it), the progress bar, the logs and the last checkpoint."""

    def __init__(self, cfg: DistillConfig):
        self.cfg, t = cfg, cfg.train
        threads = resolve_cpu_threads(t, torch.get_num_threads())  # the process and its teacher worker share cores
        if threads:
            torch.set_num_threads(int(threads))
        self.trackers = _trackers(t.log_with)
        out_dir = os.path.abspath(t.output_dir)
        self.acc = acc = Accelerator(
            mixed_precision=t.mixed_precision,
            log_with=self.trackers or None,
            project_dir=out_dir,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.collective_timeout))],
        )
        self.layout = RunLayout.of(cfg, acc.num_processes, acc.process_index, threads)
        interval = heartbeat_interval(t.collective_timeout)
        self.heartbeat = Heartbeat(acc.process_index, acc.num_processes, interval) if acc.num_processes > 1 else None
        resume = resolve_resume(t.resume, out_dir)
        if resume:
            check_resume_layout(checkpoint_state(resume), self.layout, t.allow_world_size_change, resume)
        start = checkpoint_state(resume)["step"] if resume else 0
        # the data first: a bad source or a cache built by other encoders is refused before any model is loaded;
        # a resumed run starts the stream where the checkpoint left it (skipped batches are not decoded)
        loader = self._loader(start)
        self.d = Distiller(cfg, acc, layout=self.layout)
        try:  # from here on a failure stops the Distiller's teacher worker again
            self.scaler = getattr(acc, "scaler", None)
            self.step = self._resume(resume)
            self.data = infinite(loader)
            if self.step < t.max_steps:  # a source with nothing usable fails here, before anything is written
                first = next(self.data)
                if self.d.control is not None:  # ControlNet KD without control images: refused, nothing written
                    check_control(first)
                self.data = itertools.chain([first], self.data)
            self._start_outputs()
        except BaseException:
            self.d.close()
            raise
        self.last_ckpt, self.preempted, self.t0 = None, None, time.perf_counter()
        self.skipped = SkipCounter()
        # the micro-batches to come with their generators, lazily (the teacher worker takes one ahead)
        self.stream = self.d.kd_stream(self._micro_batches())

    # ------------------------------------------------------------------ setup
    def _loader(self, start_step: int):
        t, lay = self.cfg.train, self.layout
        return make_dataloader(
            self.cfg.data,
            batch_size=lay.batch_size,
            resolution=t.resolution,
            seed=t.seed,
            num_workers=t.num_workers,
            rank=lay.rank,
            world_size=lay.world_size,
            pipeline_dir=teacher_pipeline(self.cfg),
            skip_batches=start_step * lay.grad_accum,
        )

    def _resume(self, resume: str | None) -> int:
        if not resume:
            return 0
        d = self.d
        step = load_checkpoint(resume, d.plain_student, d.ema, d.optimizer, self.scaler, d.objective, d.control)
        if d.ema is not None:
            d.ema.to(self.acc.device)
        self.acc.print(f"resumed from {resume} at step {step}")
        return step

    def _start_outputs(self) -> None:
        """The output folder with the run's config, the trackers, the progress bar and the disk-space warning."""
        from ..utils.console import progress_bar

        t, out_dir, main = self.cfg.train, self.layout.output_dir, self.acc.is_main_process
        if main:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "config.yaml"), "w") as f:
                f.write(dump_recipe(self.cfg))
        if self.trackers:
            # the config as written, and what the run derived from it (absolute folder, accumulation, threads)
            params = {**self.cfg.to_dict(), "run": dataclasses.asdict(self.layout)}
            self.acc.init_trackers("logs", config=flat_config(params))
        self.bar = progress_bar(
            total=t.max_steps,
            initial=self.step,
            disable=not (main and t.progress),
            desc="distill",
            dynamic_ncols=True,
        )
        if main:
            warn_low_space(out_dir, self.d, t, self.step, self.bar.write)

    def _micro_batches(self):
        t, lay = self.cfg.train, self.layout
        for step in range(self.step, t.max_steps):
            for micro in range(lay.grad_accum):
                gens = sample_generators(t.seed, step, micro, lay.batch_size, lay.grad_accum, lay.rank, lay.world_size)
                batch = next(self.data)
                self._count_skips(batch.pop("skipped", None) or {}, step + 1)
                yield batch, gens

    def _count_skips(self, new: dict, step: int) -> None:
        """Samples the data loader skipped (a shard cut short, files gone mid-epoch, undecodable images): added up,
        logged as ``data/skipped``, and a line the first time each reason appears."""
        for reason, n in new.items():
            if reason not in self.skipped:
                self.bar.write(
                    f"data [rank {self.layout.rank}]: skipping samples ({reason}) from step {step} on; the run goes "
                    "on (the count is in metrics.jsonl as data/skipped and in the final summary)"
                )
            self.skipped[reason] += int(n)

    # ------------------------------------------------------------------ the loop's parts
    def train_step(self) -> None:
        """``grad_accum`` micro-steps (gradients synchronised on the last one only), the update, the logs."""
        d, accum, logs = self.d, self.layout.grad_accum, {}
        for micro in range(accum):
            sync = self.acc.no_sync(d.student) if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                losses = d.micro_step(next(self.stream), step=self.step + 1, accum=accum)
            for k, v in losses.scalars(d.pairs).items():
                logs[k] = logs.get(k, 0.0) + v / accum
        logs.update(d.update(self.step))
        self.step += 1
        self._log(logs)

    def _log(self, logs: dict[str, float]) -> None:
        dt, self.t0 = time.perf_counter() - self.t0, time.perf_counter()
        logs["samples_per_s"] = self.layout.global_batch / max(dt, 1e-9)
        logs["data/skipped"] = float(sum(self.skipped.values()))  # this process's loader, since the run started
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{logs['loss/total']:.4f}",
            task=f"{logs['loss/task']:.4f}",
            out=f"{logs['loss/out']:.4f}",
            feat=f"{logs['loss/feat']:.4f}",
            **{k[5:]: f"{v:.4f}" for k, v in logs.items() if k.startswith("loss/") and k[5:] not in KD_TERMS},
            sps=f"{logs['samples_per_s']:.1f}",
        )
        if self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.max_steps:
            if self.trackers:
                self.acc.log(logs, step=self.step)
            if self.acc.is_main_process:
                with self.writing("metrics.jsonl"):
                    append_lines(
                        os.path.join(self.layout.output_dir, "metrics.jsonl"),
                        [json.dumps({"step": self.step, **logs})],
                    )

    def writing(self, what: str, certain: bool = False):
        """A failed write of the run's outputs (disk full): exit 2 naming the folder and the last good checkpoint.
        ``certain``: the block also reads (only what is surely a failed write is said so)."""

        def kept() -> str:
            ckpts = list_checkpoints(self.layout.output_dir)
            good = self.last_ckpt or (ckpts[-1][1] if ckpts else "none yet")
            return f"training stopped; the last good checkpoint is {good}"

        return writing(what, self.layout.output_dir, kept, "resume with --resume latest", certain)

    def any_process(self, flag: bool) -> bool:
        """``flag`` on any process (a collective: every process calls it at the same step)."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, "sum").item() > 0)

    def checkpoint(self) -> None:
        """Every process hands in its shard of the states (sharded runs); the main process writes."""
        d, acc = self.d, self.acc
        if is_sharded(d.optimizer):  # every process sends its optimizer shard to the main process
            inner_optimizer(d.optimizer).consolidate_state_dict(to=0)
        states = (
            gather_states(d.student, inner_optimizer(d.optimizer), d.ema, keep=acc.is_main_process) if d.fsdp else None
        )
        if acc.is_main_process:
            self.last_ckpt = write_checkpoint(self.layout, self.step, d, self.cfg, self.scaler, self.last_ckpt, states)
            self.bar.write(f"checkpoint saved: {self.last_ckpt}")
        acc.wait_for_everyone()

    def validate(self) -> None:
        if self.acc.is_main_process or self.d.fsdp:  # a sharded student's forward needs every process
            with self.writing(f"the step-{self.step} validation images", certain=True):
                validate_now(self.d, self.step, write=self.acc.is_main_process)
        self.acc.wait_for_everyone()
        self.t0 = time.perf_counter()

    def hang_error(self, err: BaseException) -> KoalaError:
        """A failed collective as one message: which rank stopped answering, at which step, the last good
        checkpoint (on any process: the newest one on disk)."""
        lay, t = self.layout, self.cfg.train
        stuck = self.heartbeat.stuck_ranks() if self.heartbeat else None
        ckpts = list_checkpoints(lay.output_dir)
        good = self.last_ckpt or (ckpts[-1][1] if ckpts else "none yet")
        return KoalaError(
            f"{hang_message(err, lay.rank, lay.world_size, stuck, t.collective_timeout)} at step {self.step + 1}. "
            f"Training stopped; the last good checkpoint is {good} (resume with --resume latest)",
            option="train.collective_timeout",
        )

    def close(self) -> None:
        if self.heartbeat:
            self.heartbeat.close()
        self.bar.close()
        self.d.close()

    def summary(self) -> dict:
        ckpts = list_checkpoints(self.layout.output_dir)
        self.acc.end_training()
        return {
            "step": self.step,
            "output_dir": self.layout.output_dir,
            "checkpoint": self.last_ckpt or (ckpts[-1][1] if ckpts else None),
            "controlnet": self._controlnet_dir(ckpts),
            "feature_pairs": len(self.d.pairs),
            "rank": self.layout.rank,
            "world_size": self.layout.world_size,
            "preempted": self.preempted,
            "data_skipped": dict(self.skipped),
        }

    def _controlnet_dir(self, ckpts) -> str | None:
        """ControlNet KD: the trained student ControlNet, ``controlnet/`` of the last checkpoint."""
        last = self.last_ckpt or (ckpts[-1][1] if ckpts else None)
        return os.path.join(last, "controlnet") if self.d.control is not None and last else None


def checkpoint_bytes(d: Distiller) -> int:
    """About what one checkpoint takes on disk: the student's weights (and the EMA's: once as ``unet_ema/``, once
    in ``trainer_state.pt``), the optimizer state, the step objective's state (LCM's target network, DMD's
    fake score and its optimizer) and the files' own bytes per tensor (:data:`ENTRY_BYTES`)."""
    params = list(d.plain_student.parameters())
    weights = tensor_bytes(params, ENTRY_BYTES)
    opt = inner_optimizer(d.optimizer)
    states = {} if is_sharded(d.optimizer) else (getattr(opt, "state", None) or {})  # sharded: the full state is saved
    state = tensor_bytes(list(states.values()), ENTRY_BYTES)
    if not state:  # before the first step (or sharded): AdamW keeps two fp32 moments and a step per trained parameter
        state = sum(2 * p.numel() * 4 + 3 * ENTRY_BYTES + 4 for p in params if p.requires_grad)
    ema = 2 * tensor_bytes(d.ema.shadow_params, ENTRY_BYTES) if d.ema is not None else 0  # unet_ema/ + its state
    objective = d.objective.state_bytes() if d.objective is not None else 0
    if d.control is not None:  # the student ControlNet's weights (controlnet/) and its two AdamW moments
        objective += 3 * d.control.state_bytes()
    maps = (2 if d.ema is not None else 1) * len(json.dumps(d.lmap.to_dict(), indent=1))  # koala_layer_map.json
    return weights + ema + state + objective + maps


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_bytes(out_dir: str) -> int:
    import shutil

    return shutil.disk_usage(existing_parent(out_dir)).free


def checkpoints_to_come(step: int, max_steps: int, every: int) -> int:
    """How many checkpoints a run at ``step`` still writes: every ``every`` steps (0: none) and at the end."""
    periodic = (max_steps // every - step // every) if every else 0
    return max(0, periodic + (0 if every and max_steps % every == 0 else 1 if max_steps > step else 0))


def warn_low_space(out_dir: str, d: Distiller, train_cfg, step: int = 0, log=print) -> int:
    """Warn at the start when the disk cannot hold the checkpoints the run will write and keep: all of them with
    ``keep_checkpoints: 0``, else the kept ones plus the one being written (those already on disk are counted as
    taken). Returns the bytes the run's checkpoints still need."""
    keep, size = train_cfg.keep_checkpoints, checkpoint_bytes(d)
    have = len(list_checkpoints(out_dir))
    to_come = checkpoints_to_come(step, train_cfg.max_steps, train_cfg.checkpoint_every)
    peak = have + to_come if not keep else min(have + to_come, keep + 1)
    need, free = max(0, peak - have) * size, _free_bytes(out_dir)
    if free < need:
        log(
            f"warning: {_size(free)} free under {out_dir}, but the {to_come} checkpoint(s) this run still writes "
            f"(keeping {keep or 'all'}) of about {_size(size)} each need {_size(need)}; the run will stop with an "
            "error when the disk is full (its last good checkpoint is kept)"
        )
    return need


def write_checkpoint(
    layout: RunLayout,
    step: int,
    d: Distiller,
    cfg: DistillConfig,
    scaler,
    last: str | None,
    states: dict | None = None,
) -> str:
    """Save a checkpoint; refuse early when the disk is too full, and on a failed write keep the previous one
    (checkpoints are written to a temporary folder and renamed) and say which it is."""
    out_dir = layout.output_dir
    ckpts = list_checkpoints(out_dir)
    good = last or (ckpts[-1][1] if ckpts else "none yet")
    need, free = int(1.05 * checkpoint_bytes(d)), _free_bytes(out_dir)
    if free < need:
        raise KoalaError(
            f"not enough disk space for the step-{step} checkpoint under {out_dir}: about "
            f"{_size(need)} needed, {_size(free)} free. Training stopped; the last good "
            f"checkpoint is {good} (resume with --resume latest after freeing space)"
        )
    with writing(
        f"the step-{step} checkpoint",
        checkpoint_root(out_dir),
        kept=f"nothing partial was kept. Training stopped; the last good checkpoint is {good}",
        again="resume with --resume latest",
    ):
        return save_checkpoint(
            layout,
            step,
            d.plain_student,
            d.lmap,
            d.ema,
            d.optimizer,
            scaler,
            cfg,
            cfg.train.keep_checkpoints,
            states=states,
            objective=d.objective,
            controlnet=d.control,
        )


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """``{"train.lr": 1e-5, ...}`` from a config's plain containers, with lists as strings (what trackers accept
    as hyperparameters)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def validate_now(d: Distiller, step: int, write: bool = True) -> list[str]:
    from .validation import validate

    return validate(
        d.plain_student,
        d.teacher,
        d.frozen,
        d.cfg,
        step,
        d.acc.device,
        d.layout.output_dir,
        d.acc,
        d.ema,
        write=write,
        sampling=d.lmap.meta.get("sampling"),
    )
