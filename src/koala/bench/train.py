"""`koala bench train`: the real KD training step, phase by phase: samples/s, peak memory and model FLOPs
utilisation (MFU).

The step is the trainer's own (:class:`koala.distill.trainer.Distiller`): ``prepare`` (data + encode + noise),
``teacher_forward`` (no grad, feature capture), ``student_forward`` (+ losses), backward, the logging sync,
``optimizer_step`` (clip, AdamW, zero grads) and ``ema_step``, with a device sync after each phase so every phase
is timed on its own. Any recipe and ``key=value`` override applies, so the trainer's fast paths
(``train.mixed_precision``, ``teacher.dtype``, ``train.fused_optimizer``, ``train.channels_last``,
``train.attention``, ``train.compile``, ``train.gradient_checkpointing``, ``train.optimizer=adamw8bit``) are
measured exactly as training runs them.

Models: a teacher preset (``sdxl-base``, ``sd-v1``, ...) is built at real size with random weights (allocated on
meta, then filled; no download) and compressed in memory to ``student.preset``; data are then pre-encoded random
batches, as ``data.type=cache`` feeds them (the data phase is the host-to-device copy). ``tiny-<preset>`` gives
test-size models. A pipeline directory instead loads real weights and the recipe's data source (the data phase
then includes VAE and text encoding).

Step distillation (``fewstep.method``: lcm | dmd) runs through the same ``micro_step``: its ``student_forward`` phase
is then the step objective's whole forward and losses (the guided step teacher, LCM's target, DMD's backward
simulation, fake and real scores, and DMD's fake-score updates, which run at the start of an update), and the
``ema`` phase includes the objective's own update (LCM's target network). Random-weight models have no text
encoders, so the objective's unconditional input is a stand-in (:func:`dummy_uncond`). Its MFU counts the forwards
the objective runs per sample (:func:`objective_forwards`).

MFU = (teacher forward + 3 x student forward FLOPs per sample, counted on meta) x samples/s / peak FLOP/s, the
peak being the device's dense bf16/fp16 tensor peak (a table of known GPUs; ``peak_tflops`` to give one) or, on
CPU and unknown devices, a measured large matrix product in the training dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from ..arch.stats import forward_flops
from ..distill.config import DistillConfig
from ..errors import KoalaError
from ..utils.devices import parse_device, parse_dtype
from .memory import PeakMemory
from .models import TINY_PREFIX, materialize, preset_unet_config
from .timing import _environment, _sync

SCHEMA = "koala-bench-train/1"
PHASES = ("data_encode", "teacher_forward", "student_forward", "backward", "log_sync", "optimizer", "ema")

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first name
# contained in torch.cuda.get_device_name() wins (SXM figures for H100/H200; PCIe H100 is lower: give --peak-tflops).
GPU_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("RTX 4090", 165.2),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
)


@dataclass
class TrainBenchSettings:
    teacher: str = "sdxl-base"  # preset (real size, random weights), tiny-<preset>, or a pipeline directory
    config: str | None = None  # recipe name or YAML path (kd, loss and train switches); None: the defaults
    overrides: list[str] = field(default_factory=list)  # key=value, as for `koala distill`
    resolution: int = 1024
    batch: int = 1  # per device (train.batch_size)
    steps: int = 5  # timed steps
    warmup: int = 2  # untimed steps first (compilation, allocator warm-up)
    device: str = "cuda"
    peak_tflops: float | None = None  # the device's peak; None: known-GPU table, else a measured matmul
    threads: int | None = None  # CPU intra-op threads

    def check(self) -> None:
        if self.steps < 1 or self.warmup < 0 or self.batch < 1:
            raise KoalaError("steps and batch must be >= 1 and warmup >= 0", option="steps")
        if self.resolution % 64:
            raise KoalaError(f"resolution {self.resolution} must be a multiple of 64", option="resolution")
        if parse_device(self.device).type not in ("cpu", "cuda"):
            raise KoalaError(f"device {self.device!r}: bench train runs on cpu, cuda or cuda:N", option="device")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise KoalaError("peak_tflops must be > 0", option="peak_tflops")
        if not os.path.isdir(self.teacher):
            try:
                preset_unet_config(self.teacher)  # unknown preset -> KoalaError naming the choices
            except KoalaError as err:
                raise KoalaError(f"teacher: {err}".replace("models: ", ""), option="teacher") from None


def gpu_peak_tflops(name: str) -> float | None:
    for key, tflops in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5
) -> float:
    """Achieved TFLOP/s of a square matrix product in ``dtype`` (best of ``repeats``): the practical peak."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = functools.partial(_sync, device)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def _config(s: TrainBenchSettings, out_dir: str, preset_mode: bool, log=print) -> DistillConfig:
    """The distillation config the benchmark trains with: the recipe and overrides, the settings' batch and
    resolution; no teacher worker (the phases are timed one after the other in this process)."""
    from ..distill import load_config

    base = [
        f"train.output_dir={out_dir}",
        f"train.resolution={s.resolution}",
        f"train.batch_size={s.batch}",
        "train.grad_accum=1",
        "train.global_batch=null",  # the benchmark's batch is the settings' (a recipe's global batch does not apply)
        "train.progress=false",
        "train.log_with=none",
        "validation.every=0",
    ]
    if s.threads:
        base.append(f"train.cpu_threads={s.threads}")
    base += ["data={type: synthetic}", "train.caption_dropout=0"] if preset_mode else [f"teacher.pipeline={s.teacher}"]
    cfg = load_config(s.config, [*base, *s.overrides])
    if cfg.train.teacher_worker:
        log(
            "train.teacher_worker ignored: koala bench train times each phase in one process (the worker's "
            "effect shows in a distillation run's samples/s)"
        )
        cfg.train = dataclasses.replace(cfg.train, teacher_worker=False)
    return cfg


def build_preset_models(cfg: DistillConfig, teacher_preset: str, device: torch.device):
    """``(teacher, student, layer_map, frozen, vae_scale)`` with random weights: the teacher preset at real size
    (or test size for ``tiny-``), the student compressed from it per ``student.preset``."""
    from diffusers import DDPMScheduler

    from ..distill.models import Frozen, init_selection
    from ..testing.tiny import sdxl_scheduler

    fam, t_config = preset_unet_config(teacher_preset)
    teacher = materialize(lambda: fam.build_model(t_config, "meta"), device, torch.float32)
    s = cfg.student
    student, lmap = fam.compress(teacher, s.preset, init_selection(cfg), torch.float32)
    weight_dtype = parse_dtype(cfg.teacher.dtype)
    teacher = teacher.to(weight_dtype).requires_grad_(False).eval()
    student = student.float().requires_grad_(True).train()
    frozen = Frozen(fam, None, DDPMScheduler.from_config(sdxl_scheduler().config), weight_dtype)
    vae_scale = 2 if teacher_preset.startswith(TINY_PREFIX) else 8
    return teacher, student, lmap, frozen, vae_scale


def _cached_batches(fam, unet_config: dict, batch: int, latent: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        cond = {k: torch.randn(v.shape, generator=g) for k, v in fam.dummy_cond(unet_config, batch).items()}
        out.append({"latents": torch.randn(batch, unet_config["in_channels"], latent, latent, generator=g), **cond})
    return out


def _forward_flops(fam, config: dict, latent: int) -> int:
    return forward_flops(fam.build_model(config, "meta"), fam.dummy_inputs(config, latent))


def step_flops(d, latent: int, batch: int = 1) -> dict:
    """Forward FLOPs per sample of the teacher and student, counted on meta at the training latent size; with a
    step objective (``fewstep.method``) the forwards it runs per sample (:func:`objective_forwards`) instead of the
    KD step's teacher + 3 x student."""
    fam = d.family
    t_cfg, s_cfg = dict(d.teacher.config), dict(d.plain_student.config)
    t = _forward_flops(fam, t_cfg, latent) if d.need_teacher else 0
    s = _forward_flops(fam, s_cfg, latent)
    if d.objective is None:
        return {"teacher_forward": t, "student_forward": s, "per_sample": t + 3 * s}
    which = d.cfg.fewstep.teacher
    if which == "student":  # a copy of the student
        st = s
    else:  # the big teacher or a denoiser folder
        st = _forward_flops(fam, t_cfg if which == "teacher" else dict(d.objective.step_teacher.config), latent)
    counts = objective_forwards(d.cfg, batch, d.need_teacher)
    per = {"student": s, "step_teacher": st, "fake_score": st, "teacher": t}
    total = sum(n * per[k] for k, n in counts.items())
    return {
        "teacher_forward": t,
        "student_forward": s,
        "step_teacher_forward": st,
        "forwards": counts,
        "per_sample": total,
    }


def _expected_max(n: int, batch: int) -> float:
    """E[max] of ``batch`` uniform draws from 0..n-1: the backward-simulation steps a DMD batch runs (every sample
    waits for the one that goes deepest)."""
    return sum(1 - (k / n) ** batch for k in range(1, n))


def objective_forwards(cfg, batch: int, need_teacher: bool) -> dict[str, float]:
    """Forward-equivalents per sample of each model in one optimizer step of a step objective (a backward counts
    as two forwards; classifier-free guidance runs the step teacher on cond and uncond). ``lcm``: student fwd+bwd,
    the guided step teacher, the target. ``dmd``: per fake-score update a generator sample (the expected rollout,
    then the step) and the fake score's fwd+bwd (twice with the GAN head: generator samples and data); the generator's
    rollout, its step with fwd+bwd, the fake score (fwd+bwd through its input with the GAN) and the guided real
    score. KD terms (one stage): 3 more student forwards and the teacher's."""
    f, w = cfg.fewstep, cfg.loss
    cfg_mult = 1 if f.guidance_scale == 1.0 else 2
    kd = 3 if (w.task > 0 or w.out > 0 or w.feat > 0) else 0
    if f.method == "lcm":
        return {"student": 3 + 1 + kd, "step_teacher": cfg_mult, "teacher": 1 if need_teacher else 0}
    rollout, gan = _expected_max(int(f.steps), batch), f.gan_weight > 0
    fake_updates = int(f.fake_updates)
    return {
        "student": fake_updates * (rollout + 1) + rollout + 3 + kd,
        "fake_score": fake_updates * 3 * (2 if gan else 1) + (3 if gan else 1),
        "step_teacher": cfg_mult,
        "teacher": 1 if need_teacher else 0,
    }


def dummy_uncond(fam, config: dict) -> dict:
    """A stand-in unconditional text conditioning (batch of one) for random-weight models loaded without text
    encoders (a step objective's guidance needs one): the family's dummy conditioning's text keys, zeros where the
    family's empty prompt is all zeros."""
    cond = fam.dummy_cond(config, 1, device="cpu")
    return {k: torch.zeros_like(cond[k]) if fam.zero_uncond else cond[k] for k in fam.text_cond_keys}


def _distiller_and_data(s: TrainBenchSettings, cfg: DistillConfig, acc, preset_mode: bool):
    """``(distiller, latent size, batches)``: random real-size (or tiny) models fed one pre-encoded batch every step,
    or a pipeline's models fed by the recipe's data source."""
    from ..data import make_dataloader
    from ..distill.step import Distiller
    from ..distill.trainer import infinite

    if preset_mode:
        teacher, student, lmap, frozen, vae_scale = build_preset_models(cfg, s.teacher, acc.device)
        d = Distiller(cfg, acc, (teacher, student, lmap, frozen))
        if d.objective is not None and d.objective.uncond is None:  # no text encoders: a stand-in empty prompt
            d.objective.uncond = dummy_uncond(d.family, dict(teacher.config))
        latent = s.resolution // vae_scale
        batches = _cached_batches(d.family, dict(teacher.config), s.batch, latent)
        return d, latent, iter(lambda: batches[0], None)  # the same pre-encoded batch every step (cache-like data)
    d = Distiller(cfg, acc)
    latent = s.resolution // (2 ** (len(d.frozen.parts.vae.config.block_out_channels) - 1))
    loader = make_dataloader(
        cfg.data,
        batch_size=s.batch,
        resolution=s.resolution,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers,
        pipeline_dir=s.teacher,
    )
    return d, latent, infinite(loader)


class _PhaseTimes:
    """Milliseconds per phase (:data:`PHASES`, in order) and per step, a device sync at every mark."""

    def __init__(self, device: torch.device):
        self.sync = functools.partial(_sync, device)
        self.phases: dict[str, list[float]] = {p: [] for p in PHASES}
        self.totals: list[float] = []
        self.losses: list[float] = []
        self.marks: list[float] = []

    def start(self) -> None:
        self.sync()
        self.marks = [time.perf_counter()]

    def mark(self) -> None:
        self.sync()
        self.marks.append(time.perf_counter())

    def record(self, loss: float) -> None:
        for name, a, b in zip(PHASES, self.marks, self.marks[1:]):
            self.phases[name].append(1000 * (b - a))
        self.totals.append(1000 * (self.marks[-1] - self.marks[0]))
        self.losses.append(loss)


def _bench_step(d, data, step: int, gens, times: _PhaseTimes) -> dict[str, float]:
    """One KD step, the trainer's own parts (:meth:`Distiller.kd_item`'s halves, :meth:`Distiller.micro_step`, the
    logging sync, the update without the schedule, EMA), with a mark after every phase."""
    from ..distill.step import KDItem

    times.start()
    p = d.prepare(next(data), gens)
    times.mark()
    item = KDItem(p, *d.teacher_targets(p))
    times.mark()
    losses = d.micro_step(item, step=step, mark=times.mark)  # student forward + losses | backward
    logs = losses.scalars(d.pairs)  # what the trainer logs each step: one device-to-host transfer
    times.mark()
    d.optimizer_step()
    times.mark()
    d.ema_step()
    if d.objective is not None:  # the step objective's own update (LCM's target network), as Distiller.update
        logs.update(d.objective.after_update(step))
    times.mark()
    return logs


def run_train_bench(settings: TrainBenchSettings, log=print) -> dict:
    """Time ``warmup + steps`` KD steps phase by phase; returns the JSON-ready result (schema koala-bench-train/1)."""
    from accelerate import Accelerator

    from ..distill.step import sample_generators

    s = settings
    s.check()
    preset_mode = not os.path.isdir(s.teacher)
    with tempfile.TemporaryDirectory(prefix="koala-bench-train-") as tmp:
        cfg = _config(s, tmp, preset_mode, log)
        if cfg.train.cpu_threads:
            torch.set_num_threads(int(cfg.train.cpu_threads))
        acc = Accelerator(cpu=s.device == "cpu", mixed_precision=cfg.train.mixed_precision)
        if acc.device.type == "cpu":
            torch.set_flush_denormal(True)  # random weights: keep denormals from slowing a CPU down
        t0 = time.perf_counter()
        d, latent, data = _distiller_and_data(s, cfg, acc, preset_mode)
        log(f"built teacher + student on {acc.device} in {time.perf_counter() - t0:.1f}s")
        times = _PhaseTimes(acc.device)
        try:
            for i in range(s.warmup):
                t0 = time.perf_counter()
                _bench_step(d, data, i + 1, sample_generators(cfg.train.seed, i, 0, s.batch, 1), times)
                log(f"warm-up step {i + 1}/{s.warmup}: {1000 * (time.perf_counter() - t0):.0f} ms")
            with PeakMemory(acc.device) as mem:
                for i in range(s.warmup, s.warmup + s.steps):
                    logs = _bench_step(d, data, i + 1, sample_generators(cfg.train.seed, i, 0, s.batch, 1), times)
                    times.record(logs["loss/total"])
            log(f"timed {s.steps} steps: median {statistics.median(times.totals):.1f} ms/step")
        finally:
            d.close()
        flops = step_flops(d, latent, s.batch)
        return _result(s, cfg, d, acc.device, latent, times, flops, mem)


def _peak_tflops(s: TrainBenchSettings, device: torch.device, mixed_precision: str) -> tuple[float, str]:
    """The device's peak and where it comes from: given, the data sheet of a known GPU, or a measured matmul."""
    if s.peak_tflops:
        return s.peak_tflops, "given"
    if device.type == "cuda" and gpu_peak_tflops(torch.cuda.get_device_name(device)):
        return gpu_peak_tflops(torch.cuda.get_device_name(device)), "data sheet (dense bf16/fp16)"
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    if device.type == "cpu" and dt == torch.float16:
        dt = torch.float32
    return measure_matmul_tflops(device, dt), f"measured {str(dt).replace('torch.', '')} matmul"


def _switches(cfg: DistillConfig) -> dict:
    """The fast-path switches a result was measured with."""
    tcfg = cfg.train
    switches = {
        k: getattr(tcfg, k)
        for k in (
            "mixed_precision",
            "gradient_checkpointing",
            "optimizer",
            "fused_optimizer",
            "channels_last",
            "attention",
            "compile",
        )
    }
    switches["teacher_dtype"] = cfg.teacher.dtype
    if tcfg.compile != "none":
        switches["compile_scope"] = tcfg.compile_scope
        if tcfg.teacher_compile_scope:
            switches["teacher_compile_scope"] = tcfg.teacher_compile_scope
    switches["ema_off"] = not tcfg.ema.enabled  # EMA is on by default (not in the paper)
    return switches


def _result(s, cfg, d, device, latent, times: _PhaseTimes, flops, mem) -> dict:
    step_ms = statistics.median(times.totals)
    phase_ms = {k: statistics.median(v) for k, v in times.phases.items()}
    samples_per_s = s.batch * 1000 / step_ms
    achieved = flops["per_sample"] * samples_per_s / 1e12
    peak, source = _peak_tflops(s, device, cfg.train.mixed_precision)
    n_t = sum(p.numel() for p in d.teacher.parameters())
    n_s = sum(p.numel() for p in d.plain_student.parameters())
    return {
        "schema": SCHEMA,
        "settings": asdict(s),
        "environment": _environment(device),
        "models": {
            "teacher": s.teacher,
            "student": cfg.student.preset,
            "family": d.family.name,
            "teacher_params": n_t,
            "student_params": n_s,
            "feature_pairs": len(d.pairs),
            "features": cfg.kd.features,
            "fewstep": cfg.fewstep.method,
            "latent": [s.batch, 4, latent, latent],
        },
        "switches": _switches(cfg),
        "times_ms": {
            "step_median": step_ms,
            "step_min": min(times.totals),
            "steps": times.totals,
            "phases_median": phase_ms,
            "phase_sum_median": sum(phase_ms.values()),
            "phases": times.phases,
        },
        "samples_per_s": samples_per_s,
        "flops": {
            **flops,
            "per_step": flops["per_sample"] * s.batch,
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "peak_source": source,
            "mfu": achieved / peak,
        },
        "memory": {"kind": mem.kind, "peak_bytes": mem.peak, "peak_delta_bytes": mem.delta},
        "losses": times.losses,
    }


def active_switches(switches: dict) -> dict:
    """The switches of a result that differ from the plain setting (what a table row should name)."""
    return {k: v for k, v in switches.items() if v not in (False, "no", "none", "auto", "adamw", None)}


def train_markdown(results: list[dict]) -> str:
    """One row per result: the switches that differ, samples/s, step and phase times, MFU, peak memory."""
    from ..utils.console import markdown_table

    head = ["teacher -> student", "res x batch", "switches", "samples/s", "step ms", "teacher fwd", "student fwd"]
    head += ["backward", "optim+EMA", "MFU", "peak GiB"]
    rows = []
    for r in results:
        on = [f"{k}={v}" for k, v in active_switches(r["switches"]).items()]
        ph = r["times_ms"]["phases_median"]
        rows.append(
            [
                f"{r['models']['teacher']} -> {r['models']['student']}",
                f"{r['settings']['resolution']} x {r['settings']['batch']}",
                ", ".join(on) or "fp32",
                f"{r['samples_per_s']:.2f}",
                f"{r['times_ms']['step_median']:.1f}",
                f"{ph['teacher_forward']:.1f}",
                f"{ph['student_forward']:.1f}",
                f"{ph['backward']:.1f}",
                f"{ph['optimizer'] + ph['ema']:.1f}",
                f"{100 * r['flops']['mfu']:.1f}%",
                f"{r['memory']['peak_bytes'] / 2**30:.2f}",
            ]
        )
    return markdown_table(head, rows) + "\n"
