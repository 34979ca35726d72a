"""The distillation config: a typed schema with every key and its default (the paper's final recipe), and
the value checks.

Recipes (``koala/configs/*.yaml``, see :mod:`koala.recipes`) override these defaults; ``key=value`` on the
command line overrides the recipe. :func:`load_config` returns the typed :class:`DistillConfig`, read by attribute
(``cfg.train.lr``); :class:`RunLayout` holds what a run derives from it and from its processes (the absolute output
folder, the resolved accumulation and thread count), so the config stays what the user wrote.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Iterable, List, Optional

from omegaconf import OmegaConf

from ..arch.layer_map import SELECTIONS as LAYER_SELECTIONS
from ..data.config import normalize_data_cfg
from ..errors import KoalaError
from ..families.sampling import TEACHER_KINDS
from ..recipes import INT_MAX, load
from ..utils.attention import SDPA_BACKENDS
from ..utils.compile import COMPILE_SCOPES
from ..utils.devices import DTYPES
from .losses import FEATURE_LOSSES  # name -> loss function: the allowed kd.feature_loss values
from .sharding import FSDP_MODES

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "came")
LR_SCHEDULES = ("constant", "linear", "cosine")
COMPILE = ("none", "student", "teacher", "both")
from .hooks import FEATURE_TYPES  # noqa: E402  (the feature-type registry: the allowed kd.features keys)


@dataclass
class TeacherConfig:
    pipeline: Optional[str] = None  # local pipeline dir: text encoder(s), tokenizer(s), VAE, scheduler, U-Net; or an
    # SDXL single-file .safetensors (converted once into OUTPUT_DIR/teacher)
    config: Optional[str] = None  # converting a single-file teacher: a pipeline dir of its architecture (configs,
    # tokenizers); null = koala's SDXL-Base configs + cached tokenizers
    unet_path: Optional[str] = None  # replace the pipeline's U-Net (e.g. SDXL-Lightning): U-Net dir or .safetensors
    family: Optional[str] = None  # null = detect from the pipeline; 'sdxl', 'sd' or 'pixart'
    kind: str = "base"  # base | turbo | lightning: how students are sampled (Euler; trailing for turbo /
    # lightning), recorded in the student's layer map for koala generate
    dtype: str = "fp16"  # weight dtype of the frozen teacher U-Net and text encoders
    vae_dtype: Optional[str] = None  # null: fp32 if the VAE config says force_upcast, else teacher.dtype


@dataclass
class StudentConfig:
    path: Optional[str] = None  # compressed student U-Net dir (or pipeline dir) with koala_layer_map.json
    # when path is null: compress the teacher in memory with this preset, or a custom spec (a mapping, e.g.
    # {num_layers: 10} for a DiT, or {encoder_layers: [1,1,1], down_depth: [0,2,4], up_depth: [4,2,0]} for a U-Net)
    preset: Any = "koala-700m"
    layer_selection: str = "bottom"  # which teacher transformer layers initialise the student (compression);
    # kd.layer_selection, when set, takes its place


@dataclass
class KDConfig:
    # feature type -> "all" or a list of stages; replaced as a whole by a recipe, never merged key by key.
    # Paper's best (Table 10d): SA everywhere + LF at DW-1 & UP-3.
    # Table 10d: SA everywhere + LF at the first encoder / last decoder stage (DW-1, UP-3 on SDXL; UP-4 on SD-1.x)
    features: Any = field(default_factory=lambda: {"SA": "all", "LF": ["first", "last"]})
    # teacher layers a shallower student is initialised from AND matched with (Table 10c: bottom | interleave | up);
    # null = student.layer_selection initialises, featKD matches the pairs the layer map names
    layer_selection: Optional[str] = None
    feature_loss: str = "mse"  # one of FEATURE_LOSSES


@dataclass
class LossConfig:
    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999


@dataclass
class TrainConfig:
    output_dir: str = "runs/koala"
    resolution: int = 1024
    batch_size: int = 1  # per process, per micro-step
    grad_accum: int = 1  # effective batch = batch_size * grad_accum * processes
    global_batch: Optional[int] = None  # when set: grad_accum = global_batch / (batch_size * processes), exactly
    max_steps: int = 1000  # optimizer steps
    lr: float = 1.0e-5
    lr_schedule: str = "constant"  # one of LR_SCHEDULES: constant (the paper's), or a decay to 0 at max_steps
    lr_warmup_steps: int = 0  # linear warmup from 0 over this many steps (any schedule)
    weight_decay: float = 1.0e-2
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1.0e-8
    optimizer: str = "adamw"  # one of OPTIMIZERS (adamw8bit needs bitsandbytes, came needs came-pytorch)
    came_betas: List[float] = field(default_factory=lambda: [0.9, 0.999, 0.9999])  # CAME (PixArt's settings)
    came_eps: List[float] = field(default_factory=lambda: [1.0e-30, 1.0e-16])
    mixed_precision: str = "no"  # one of MIXED_PRECISION
    gradient_checkpointing: bool = False
    max_grad_norm: Optional[float] = 1.0  # null or 0 disables clipping
    ema: EMAConfig = field(default_factory=EMAConfig)
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    log_with: str = (
        "tensorboard"  # tensorboard | wandb (pip install 'koala-diffusion[wandb]') | both, comma separated | none
    )
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # 0 keeps all
    resume: Optional[str] = None  # null | latest | path to a checkpoint dir
    allow_world_size_change: bool = False  # resume a checkpoint written with other processes/batch_size/grad_accum
    # seconds a collective (gradient all-reduce, barrier) waits for every process before the run stops with a message
    # naming the rank that stopped answering and the last good checkpoint (the process group's timeout; torch's own
    # default is 30 min). Raise it when one process may legitimately lag (e.g. writing a huge checkpoint)
    collective_timeout: float = 600.0
    progress: bool = True
    cpu_threads: Optional[int] = None  # torch intra-op threads (null: torch's default); 1 is fastest for tiny CPU runs
    caption_dropout: float = (
        0.0  # fraction of captions replaced by the family's uncond (SDXL zeros, SD / PixArt "" prompt)
    )
    # fast paths (each a switch; measured by `koala bench train`, see benchmarks/results/)
    fused_optimizer: bool = False  # torch AdamW(fused=True): one kernel per parameter group (adamw only)
    channels_last: bool = False  # teacher, student and latents in channels_last memory format
    # CPU: the teacher's forwards in a second process, one micro-batch ahead of the student, so a step costs about
    # max(teacher, student) instead of their sum (koala.distill.teacher_worker); both processes use cpu_threads
    # threads (null: half of torch's default each)
    teacher_worker: bool = False
    attention: str = "auto"  # one of SDPA_BACKENDS: force an SDPA backend for teacher and student forwards
    compile: str = "none"  # one of COMPILE: torch.compile the student / teacher / both (hooks still capture)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: trace only, no code generation)
    compile_scope: str = "full"  # full: one graph per model; blocks: regional (each repeated block), faster to compile
    teacher_compile_scope: Optional[str] = None  # the teacher's scope when it differs (null: compile_scope); the
    # fastest measured KD step (H200, results/h200/README.md) compiles the student full and the teacher by blocks
    # ZeRO-1: each of N processes keeps 1/N of the optimizer states (torch ZeroRedundancyOptimizer over DDP);
    # checkpoints hold the consolidated (full) optimizer state in the plain AdamW layout
    shard_optimizer: bool = False
    # FSDP2 over several processes (koala.distill.sharding): grad_op = ZeRO-2 (gradients, optimizer states and EMA
    # sharded), full = ZeRO-3 (parameters too); none = DDP. Checkpoints hold the full states either way
    fsdp: str = "none"


@dataclass
class ValidationConfig:
    every: int = 0  # 0 disables; also runs at the end when > 0
    prompts: List[str] = field(default_factory=lambda: ["a photo of an astronaut riding a horse"])
    seeds: List[int] = field(default_factory=lambda: [0])
    steps: int = 25
    guidance_scale: float = 5.0
    resolution: Optional[int] = None  # null: train.resolution
    use_ema: bool = False


@dataclass
class FewStepConfig:
    """Step distillation (``koala.distill.fewstep``): train the student to sample in ``steps`` steps."""

    method: str = "none"  # none (the KD objective alone) or one of STEP_OBJECTIVES: lcm | dmd
    steps: int = 4  # the sampling steps the student is trained for, recorded with it for koala generate
    # the step teacher: teacher = the big teacher (the default: in the shapes world it gave the few-step student
    # 5-8 binding points more than the KD'ed student did, benchmarks/results/fewstep-shapes.md; from a KD'ed
    # student.path, or in one stage with loss.* KD terms alongside); student = the student's own initial weights
    # (two stages: SA-KD first, then steps on its own ODE); or a denoiser folder of the teacher's family
    teacher: str = "teacher"
    guidance_scale: float = 3.0  # the step teacher's classifier-free guidance (standard scale: 1 = none); the
    # student learns the guided trajectory and samples at guidance 1 (shapes world: 3 beat 2 and 5)
    lora_rank: int = 0  # 0: train all student weights; > 0: LoRA adapters of this rank (the LCM-LoRA form)
    lora_alpha: Optional[float] = None  # LoRA scale numerator (null: lora_rank, so the scale is 1)
    # lcm: latent consistency distillation (Luo et al. 2023)
    ddim_steps: int = 50  # the DDIM solver's grid: skipping interval k = num_train_timesteps / ddim_steps
    target_decay: float = 0.95  # EMA decay of the target network (0: the online weights, without gradient)
    distance: str = "huber"  # one of DISTANCES: huber | l2
    huber_c: float = 0.001
    # dmd: distribution matching distillation, DMD2 form (Yin et al. 2024)
    fake_updates: int = 5  # fake-score updates per generator update (two time-scale update rule)
    fake_lr: Optional[float] = None  # null: train.lr
    gan_weight: float = 0.0  # weight of the GAN loss on the fake score's bottleneck features (0: no GAN head)
    disc_weight: Optional[float] = None  # the GAN head's loss in the fake score's update (null: 2 x gan_weight,
    # DMD2's SDXL ratio 1e-2 : 5e-3)
    min_t: float = 0.02  # the range of noise levels the scores are compared at, as fractions of the schedule
    max_t: float = 0.98


@dataclass
class ControlNetConfig:
    """ControlNet KD (``koala.distill.controlnet``): train the student's ControlNet so that student + ControlNet
    matches teacher + teacher ControlNet on the same noisy latents and control images (``batch["control_image"]``,
    from ``data.control``)."""

    teacher: Optional[str] = None  # the teacher's ControlNet folder (diffusers); null: no ControlNet KD
    student: Optional[str] = None  # the student's ControlNet folder (`koala controlnet transfer`); null: transfer
    # the teacher's through the student's layer map at the start of the run
    train_unet: bool = False  # also train the student U-Net (false: only the ControlNet trains)
    conditioning_scale: float = 1.0  # the ControlNets' residual scale in training (the pipelines' default)
    residual_kd: float = 1.0  # weight of the residual KD term: each student ControlNet residual (zero-convolution
    # output) vs the teacher ControlNet's residual at the slot the layer map maps it to, with kd.feature_loss


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # an open mapping passed to koala.data: type (synthetic | folder | ... | cache) and that type's keys
    # (path, caption_column, buckets, num_samples, ...); schema and checks in koala/data/config.py
    data: Any = field(default_factory=lambda: {"type": "synthetic"})
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    fewstep: FewStepConfig = field(default_factory=FewStepConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)

    def to_dict(self) -> dict:
        """The config as plain nested containers (what ``config.yaml``, checkpoints and trackers store)."""
        return asdict(self)


WHOLE = ("kd.features", "student.preset")  # replaced as a whole by a recipe or override
REMOVED = {
    "teacher.make_tiny": "teacher.make_tiny was removed: create the pipeline once with `koala lab make-tiny DIR` "
    "and set teacher.pipeline=DIR",
    "kd.normalize": f"kd.normalize was replaced by kd.feature_loss: {' | '.join(FEATURE_LOSSES)}",
    "data.caption_dropout": "data.caption_dropout moved to train.caption_dropout",
}


def load_config(recipe: str | None, overrides: Iterable[str] = ()) -> DistillConfig:
    """Schema defaults <- recipe (``extends`` first) <- ``key=value`` overrides, checked: a :class:`DistillConfig`."""
    cfg: DistillConfig = OmegaConf.to_object(load(DistillConfig, recipe, overrides, whole=WHOLE, removed=REMOVED))
    if str(cfg.train.mixed_precision).lower() == "false":  # YAML reads a bare `no` as a boolean
        cfg.train.mixed_precision = "no"
    check_config(cfg, where=recipe or "config")
    return cfg


def feature_stages(features) -> dict[str, list[str] | str]:
    """Validate ``kd.features`` and return it as type -> "all" | [stage names]. Stage names depend on the model
    family (e.g. DW-4 exists for SD-1.x); the trainer checks them against the model."""
    if features is None:
        return {}
    if not isinstance(features, dict):
        raise KoalaError(
            f"kd.features must map feature types to stages (e.g. {{SA: all, LF: [DW-1, UP-3]}}), got {features!r}"
        )
    out: dict[str, list[str] | str] = {}
    for ftype, stages in features.items():
        if ftype not in FEATURE_TYPES:
            raise KoalaError(f"kd.features: unknown feature type {ftype!r}; choose from {', '.join(FEATURE_TYPES)}")
        if isinstance(stages, str) and stages != "all":
            stages = [stages]
        if stages != "all" and (not isinstance(stages, list) or not all(isinstance(s, str) for s in stages)):
            raise KoalaError(
                f"kd.features.{ftype}: stages must be 'all' or a list of stage names "
                f"(e.g. [DW-1, UP-3]), got {stages!r}"
            )
        out[ftype] = stages if stages == "all" else list(stages)
    return out


def _value(cfg: DistillConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _one_of(cfg: DistillConfig, key: str, allowed: tuple) -> None:
    if _value(cfg, key) not in allowed:
        names = ", ".join("null" if a is None else str(a) for a in allowed)
        raise KoalaError(f"{key} must be one of {names}, got {_value(cfg, key)!r}")


def _num(cfg: DistillConfig, key: str, lo=None, hi=None) -> None:
    v = _value(cfg, key)
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or (lo is not None and v < lo)
        or (hi is not None and v > hi)
    ):
        bounds = f" between {lo} and {hi}" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise KoalaError(f"{key} must be a finite number{bounds}, got {v!r}")


def resolve_grad_accum(train: TrainConfig, world_size: int) -> int:
    """``train.grad_accum``, derived from ``train.global_batch`` when that is set: global_batch / (batch_size x
    processes), which must come out whole; a grad_accum set to anything else alongside is refused."""
    gb, bs, accum = train.global_batch, train.batch_size, train.grad_accum
    if not gb:
        return accum
    per_step = bs * world_size
    if gb % per_step:
        q = gb // world_size if gb % world_size == 0 else None
        near = sorted((d for d in range(1, q + 1) if q % d == 0), key=lambda d: abs(d - bs))[:3] if q else []
        raise KoalaError(
            f"train.global_batch {gb} is not a multiple of batch_size {bs} x {world_size} process(es) = "
            f"{per_step}; "
            + (
                f"batch sizes that fit: {', '.join(map(str, sorted(near)))}"
                if near
                else f"{gb} does not split over {world_size} processes"
            )
            + " (or change the process count)",
            option="train.global_batch",
        )
    derived = gb // per_step
    if accum not in (1, derived):
        raise KoalaError(
            f"train.grad_accum={accum} disagrees with train.global_batch {gb} = batch_size {bs} x "
            f"{world_size} process(es) x {derived}; drop grad_accum (it is derived) or global_batch",
            option="train.grad_accum",
        )
    return derived


def resolve_cpu_threads(train: TrainConfig, default_threads: int) -> int | None:
    """``train.cpu_threads``; unset with the teacher worker, the training process and its worker take half of
    ``default_threads`` (torch's) each; unset otherwise: None (torch's default)."""
    if train.teacher_worker and not train.cpu_threads:
        return max(1, default_threads // 2)
    return train.cpu_threads


@dataclass(frozen=True)
class RunLayout:
    """What one distillation process derives from the config and the process group, kept apart from the config:
    the absolute output folder, the processes, the accumulation (from ``train.global_batch`` when set) and the
    intra-op thread count (:func:`resolve_cpu_threads`)."""

    output_dir: str
    world_size: int = 1
    rank: int = 0
    batch_size: int = 1  # per process, per micro-step
    grad_accum: int = 1
    cpu_threads: int | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @classmethod
    def of(cls, cfg: DistillConfig, world_size: int = 1, rank: int = 0, cpu_threads: int | None = None):
        """The layout of process ``rank`` of ``world_size`` running ``cfg``."""
        t = cfg.train
        return cls(
            os.path.abspath(t.output_dir),
            world_size,
            rank,
            t.batch_size,
            resolve_grad_accum(t, world_size),
            cpu_threads,
        )


# numbers the schema's types cannot bound: key -> (lowest, highest); None = open. A list's bounds hold for each item
BOUNDS = {
    "train.checkpoint_every": (0, None),
    "train.keep_checkpoints": (0, None),
    "train.log_every": (1, None),
    "train.num_workers": (0, None),
    "train.cpu_threads": (1, None),
    "train.weight_decay": (0, None),
    "train.adam_eps": (0, None),
    "train.adam_betas": (0, 1),
    "train.came_betas": (0, 1),
    "train.came_eps": (0, None),
    "train.max_grad_norm": (0, None),
    "train.ema.decay": (0, 1),
    "validation.every": (0, None),
    "validation.steps": (1, None),
    "validation.guidance_scale": (0, None),
    "validation.resolution": (8, None),
}


def _check_fields(section, prefix: str) -> None:
    """Every typed setting of a schema section (nested sections too): no empty strings, numbers finite (whole
    numbers within int64) and within :data:`BOUNDS`, list items likewise. The sections typed ``Any`` (``kd.features``,
    ``student.preset``, ``data``) have checks of their own."""
    for f in fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        if is_dataclass(value):
            _check_fields(value, f"{key}.")
        elif isinstance(value, str) and not value.strip():
            raise KoalaError(f"{key} is an empty string; give it a value (or null where it may be unset)", option=key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, (list, dict)):
                    raise KoalaError(f"{key}[{i}] must be a single value, got {item!r}", option=key)
                _in_bounds(f"{key}[{i}]", item, BOUNDS.get(key))
        else:
            _in_bounds(key, value, BOUNDS.get(key))


def _in_bounds(key: str, value, bounds) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = bounds or (None, None)
    option = key.split("[")[0]
    if not math.isfinite(value):
        raise KoalaError(f"{key} must be a finite number, got {value!r}", option=option)
    if isinstance(value, int) and abs(value) > INT_MAX:
        raise KoalaError(f"{key} is too large ({value:.3g}); the most a setting holds is {INT_MAX}", option=option)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        within = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise KoalaError(f"{key} must be {within}, got {value!r}", option=option)


def check_config(cfg: DistillConfig, where: str = "config") -> None:
    """Value checks the schema's types cannot express; KoalaError naming ``where`` and the key."""
    try:
        for f in fields(cfg):
            if is_dataclass(getattr(cfg, f.name)):
                _check_fields(getattr(cfg, f.name), f"{f.name}.")
        _check(cfg)
    except KoalaError as err:
        raise KoalaError(f"{where}: {err}") from err


def _check(cfg: DistillConfig) -> None:
    data = cfg.data
    if not isinstance(data, dict):
        raise KoalaError(f"data must be a mapping (e.g. {{type: folder, path: images/}}), got {data!r}")
    if data.get("repeat", True) is False:
        raise KoalaError(
            "data.repeat: false is not supported for training (the trainer counts steps over an "
            "endless, per-epoch reshuffled stream); remove it"
        )
    feature_stages(cfg.kd.features)
    _one_of(cfg, "kd.layer_selection", (None, *LAYER_SELECTIONS))
    _one_of(cfg, "student.layer_selection", LAYER_SELECTIONS)
    _one_of(cfg, "kd.feature_loss", tuple(FEATURE_LOSSES))
    for k in ("loss.task", "loss.out", "loss.feat", "train.lr"):
        _num(cfg, k, 0)
    for k in ("train.batch_size", "train.grad_accum", "train.max_steps", "train.resolution"):
        _num(cfg, k, 1)
    if cfg.train.global_batch is not None:
        _num(cfg, "train.global_batch", 1)
    _num(cfg, "train.caption_dropout", 0, 1)
    _num(cfg, "train.lr_warmup_steps", 0)
    _num(cfg, "train.collective_timeout", 1)
    for key, allowed in (
        ("teacher.dtype", tuple(DTYPES)),
        ("teacher.vae_dtype", (None, *DTYPES)),
        ("train.mixed_precision", MIXED_PRECISION),
        ("train.optimizer", OPTIMIZERS),
        ("train.lr_schedule", LR_SCHEDULES),
        ("teacher.kind", TEACHER_KINDS),
        ("train.attention", SDPA_BACKENDS),
        ("train.compile", COMPILE),
        ("train.compile_scope", COMPILE_SCOPES),
        ("train.teacher_compile_scope", (None, *COMPILE_SCOPES)),
        ("train.fsdp", FSDP_MODES),
    ):
        _one_of(cfg, key, allowed)
    _check_sharding(cfg.train)
    _check_optimizer(cfg.train)
    _check_fewstep(cfg)
    _check_controlnet(cfg)
    if not isinstance(cfg.student.preset, (str, dict)):
        raise KoalaError(
            f"student.preset must be a preset name or a spec mapping, got {cfg.student.preset!r}",
            option="student.preset",
        )
    normalize_data_cfg(data)  # unknown keys, missing path, bad type: refuse before loading any model


def _check_sharding(t: TrainConfig) -> None:
    if t.fsdp == "none":
        return
    if t.shard_optimizer:
        raise KoalaError(
            "train.fsdp already shards the optimizer states; set train.shard_optimizer=false (ZeRO-1 "
            "is the DDP alternative)",
            option="train.fsdp",
        )
    if t.mixed_precision == "fp16":
        raise KoalaError(
            "train.fsdp with train.mixed_precision=fp16: the fp16 loss scaler would see only this "
            "process's gradient shard and could skip a step on some processes only; use "
            "train.mixed_precision=bf16 (no loss scaling) or no",
            option="train.fsdp",
        )
    if t.optimizer != "adamw":
        raise KoalaError(
            f"train.fsdp works with train.optimizer=adamw (torch AdamW on sharded parameters); "
            f"{t.optimizer} keeps per-tensor statistics that sharding would split",
            option="train.fsdp",
        )


def _check_optimizer(t: TrainConfig) -> None:
    if t.fused_optimizer and t.optimizer != "adamw":
        raise KoalaError("train.fused_optimizer applies to train.optimizer=adamw only")
    for key, n in (("came_betas", 3), ("came_eps", 2)):
        if len(getattr(t, key)) != n:
            raise KoalaError(
                f"train.{key} needs {n} numbers (CAME: betas (b1, b2, b3), eps (eps1, eps2)), got {getattr(t, key)}",
                option=f"train.{key}",
            )


DISTANCES = ("huber", "l2")


def _check_fewstep(cfg: DistillConfig) -> None:
    """``fewstep.*``: the method from the registry, numbers in range, and the training modes it runs with. What
    needs the models (the step teacher's family, steps the noise schedule can hold) is checked when they load."""
    from .fewstep import STEP_OBJECTIVES

    f = cfg.fewstep
    _one_of(cfg, "fewstep.method", ("none", *STEP_OBJECTIVES))
    if f.method == "none":
        return
    _one_of(cfg, "fewstep.distance", DISTANCES)
    for key, lo in (("fewstep.steps", 1), ("fewstep.ddim_steps", 1), ("fewstep.fake_updates", 1)):
        _num(cfg, key, lo)
        if not isinstance(_value(cfg, key), int):
            raise KoalaError(f"{key} must be a whole number, got {_value(cfg, key)!r}", option=key)
    if isinstance(f.lora_rank, bool) or not isinstance(f.lora_rank, int) or f.lora_rank < 0:
        raise KoalaError(
            f"fewstep.lora_rank must be 0 (train all weights) or a positive whole number (LoRA rank), got "
            f"{f.lora_rank!r}",
            option="fewstep.lora_rank",
        )
    if f.lora_alpha is not None:
        _num(cfg, "fewstep.lora_alpha", 0)
    _num(cfg, "fewstep.guidance_scale", 0)
    _num(cfg, "fewstep.target_decay", 0, 1)
    _num(cfg, "fewstep.huber_c", 0)
    _num(cfg, "fewstep.gan_weight", 0)
    if f.disc_weight is not None:
        _num(cfg, "fewstep.disc_weight", 0)
    _num(cfg, "fewstep.min_t", 0, 1)
    _num(cfg, "fewstep.max_t", 0, 1)
    if f.min_t >= f.max_t:
        raise KoalaError(f"fewstep.min_t {f.min_t} must be below fewstep.max_t {f.max_t}", option="fewstep.min_t")
    if f.fake_lr is not None:
        _num(cfg, "fewstep.fake_lr", 0)
    if f.steps > f.ddim_steps and f.method == "lcm":
        raise KoalaError(
            f"fewstep.steps {f.steps} is more than the solver grid's fewstep.ddim_steps {f.ddim_steps}: an LCM "
            "student samples on that grid; lower fewstep.steps or raise fewstep.ddim_steps",
            option="fewstep.steps",
        )
    t = cfg.train
    for key, on, why in (
        ("train.teacher_worker", t.teacher_worker, "the step objective runs its teacher in the training process"),
        ("train.fsdp", t.fsdp != "none", "step distillation trains unsharded (DDP / ZeRO-1) for now"),
    ):
        if on:
            raise KoalaError(f"fewstep.method={f.method} with {key}: {why}; turn {key} off", option=key)
    if f.method == "dmd" and t.mixed_precision == "fp16":  # the fake score's optimizer has no loss scaler
        raise KoalaError(
            "fewstep.method=dmd with train.mixed_precision=fp16: the fake score trains without a loss scaler; use "
            "train.mixed_precision=bf16 or no",
            option="train.mixed_precision",
        )
    if f.lora_rank and t.ema.enabled:
        raise KoalaError(
            "fewstep.lora_rank > 0 with train.ema.enabled: the EMA of a LoRA run would copy the whole student; "
            "set train.ema.enabled=false (LCM's target network is fewstep.target_decay)",
            option="train.ema.enabled",
        )


def _check_controlnet(cfg: DistillConfig) -> None:
    """``controlnet.*``: the folders exist, the weights are sane, and the training modes ControlNet KD runs with."""
    c, t = cfg.controlnet, cfg.train
    if c.teacher is None:
        if c.student is not None:
            raise KoalaError(
                "controlnet.student is set but controlnet.teacher is not: ControlNet KD needs the teacher ControlNet "
                "(controlnet.teacher=DIR)",
                option="controlnet.teacher",
            )
        return
    for key in ("controlnet.teacher", "controlnet.student"):
        path = _value(cfg, key)
        if path is not None and not os.path.isfile(os.path.join(str(path), "config.json")):
            raise KoalaError(
                f"{key} {path}: not a ControlNet folder (no config.json); give a diffusers ControlNet folder"
                + (" (koala controlnet transfer writes one)" if key.endswith("student") else ""),
                option=key,
            )
    if cfg.data.get("control") is None:
        raise KoalaError(
            "controlnet.teacher is set but data.control is not: ControlNet KD needs a control image with each "
            "training image; set data.control=canny (Canny edges of each image) or data.control=NAME (a file "
            "<image stem>.NAME.png next to each image, e.g. layout for koala lab's shapes data)",
            option="data.control",
        )
    _num(cfg, "controlnet.conditioning_scale", 0)
    _num(cfg, "controlnet.residual_kd", 0)
    for key, on, why in (
        ("fewstep.method", cfg.fewstep.method != "none", "ControlNet KD trains with the KD objective alone"),
        ("train.teacher_worker", t.teacher_worker, "the teacher ControlNet runs in the training process"),
        ("train.fsdp", t.fsdp != "none", "ControlNet KD trains unsharded in one process for now"),
        ("train.ema.enabled", t.ema.enabled, "the EMA would not cover the ControlNet"),
    ):
        if on:
            raise KoalaError(f"controlnet.teacher with {key}: {why}; turn {key} off", option=key)
