"""The tiny-decoder recipe (``koala vae distill``): a typed schema with every key and its default, and the checks.

Defaults are the TAESD architecture (diffusers' ``AutoencoderTiny`` defaults, which are madebyollin/taesdxl's config:
64 channels, decoder blocks 3-3-3-1, encoder blocks 1-3-3-3) trained to reproduce the teacher VAE's decodes with an
L1 + L2 pixel loss. Recipes (``koala/configs/tiny-vae.yaml``, ``sdxl-tiny-vae.yaml``) override them and
``key=value`` overrides the recipe, as for ``koala distill`` (:mod:`koala.recipes`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, List, Optional

from omegaconf import OmegaConf

from ...data.config import normalize_data_cfg
from ...errors import KoalaError
from ...recipes import load, package_configs

LATENTS = ("sample", "mean")  # which latent of the teacher's posterior an image gives (raw-image sources)
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class TinyModelConfig:
    # one entry per decoder stage, lowest resolution first; the stage count must equal the teacher VAE's (its
    # len(block_out_channels)), so both upsample by the same factor (TAESD / SDXL: 4 stages, factor 8)
    decoder_channels: List[int] = field(default_factory=lambda: [64, 64, 64, 64])
    decoder_blocks: List[int] = field(default_factory=lambda: [3, 3, 3, 1])
    encoder: bool = False  # also train the tiny encoder (MSE to the teacher's scaled latents; needs images)
    encoder_channels: List[int] = field(default_factory=lambda: [64, 64, 64, 64])
    encoder_blocks: List[int] = field(default_factory=lambda: [1, 3, 3, 3])
    act_fn: str = "relu"
    init: Optional[str] = None  # an AutoencoderTiny directory to start from (e.g. a taesdxl download) instead of
    # random weights; its latent channels and stage count must fit the teacher's


@dataclass
class VaeLossConfig:
    l1: float = 1.0  # mean absolute error between tiny and teacher decodes (pixels in [-1, 1])
    l2: float = 1.0  # mean squared error, same pixels
    latent: float = 1.0  # encoder: MSE between tiny and teacher latents (model.encoder only)


@dataclass
class VaeTrainConfig:
    resolution: int = 256  # image side (raw sources); a latent cache keeps the size it was built with
    batch_size: int = 8
    max_steps: int = 1000
    lr: float = 1.0e-4
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: Optional[float] = 1.0  # null or 0: no clipping
    latent: str = "sample"  # raw images: decode a sample of the teacher's posterior (what a decoder sees in
    # training) or its mean; a latent cache holds what `koala cache` stored
    teacher_dtype: str = "fp32"  # the frozen teacher VAE's dtype (fp16 needs an fp16-safe VAE, on a GPU)
    device: Optional[str] = None  # null: cuda when available, else cpu
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # 0 keeps all
    resume: Optional[str] = None  # null | latest | a checkpoint folder (OUT/checkpoints/step-N)
    progress: bool = True
    cpu_threads: Optional[int] = None  # torch intra-op threads (null: torch's default)


@dataclass
class VaeDistillConfig:
    teacher: Optional[str] = None  # the teacher: a pipeline directory (its vae/) or an AutoencoderKL directory
    out: Optional[str] = None  # the AutoencoderTiny directory written at the end (checkpoints under OUT/checkpoints)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    loss: VaeLossConfig = field(default_factory=VaeLossConfig)
    # koala.data's open mapping: images (folder, parquet/csv, webdataset, hf_disk, synthetic) or a latent cache
    # written by `koala cache` with the same teacher (type: cache)
    data: Any = field(default_factory=lambda: {"type": "synthetic"})
    train: VaeTrainConfig = field(default_factory=VaeTrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def vae_recipes() -> list[str]:
    """Names of the tiny-VAE recipes shipped in the package (``koala/configs/vae/*.yaml``; kept apart from the
    ``koala distill`` recipes, whose schema differs)."""
    return sorted(p.name[:-5] for p in (package_configs() / "vae").iterdir() if p.name.endswith(".yaml"))


def resolve_vae_recipe(name: str) -> str:
    """A YAML file path, or a bare name: ``./configs/NAME.yaml`` first, then the shipped ``configs/vae/NAME.yaml``."""
    if os.path.isfile(name) or "/" in name or os.sep in name:
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    for cand in (os.path.join("configs", f"{stem}.yaml"), package_configs() / "vae" / f"{stem}.yaml"):
        if os.path.isfile(str(cand)):
            return str(cand)
    raise KoalaError(
        f"recipe {name!r} not found: give a YAML file path or a tiny-VAE recipe name: {', '.join(vae_recipes())}",
        option="config",
    )


def load_vae_config(recipe: str | None, overrides: Iterable[str] = ()) -> VaeDistillConfig:
    """Schema defaults <- recipe (``extends`` first) <- ``key=value`` overrides, checked."""
    recipe = resolve_vae_recipe(recipe) if recipe else None
    cfg: VaeDistillConfig = OmegaConf.to_object(load(VaeDistillConfig, recipe, overrides))
    where = recipe or "config"
    try:
        check_vae_config(cfg)
    except KoalaError as err:
        raise KoalaError(f"{where}: {err}", option=err.option) from err
    return cfg


def _number(value, key: str, lo: float, whole: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= lo
    if not ok or (whole and not isinstance(value, int)):
        kind = "a whole number" if whole else "a number"
        raise KoalaError(f"{key} must be {kind} >= {lo}, got {value!r}", option=key)


def _stages(channels: list, blocks: list, key: str) -> None:
    if not channels or len(channels) != len(blocks):
        raise KoalaError(
            f"model.{key}_channels {channels} and model.{key}_blocks {blocks} need one entry per stage each",
            option=f"model.{key}_blocks",
        )
    for i, (c, b) in enumerate(zip(channels, blocks)):
        _number(c, f"model.{key}_channels[{i}]", 1, whole=True)
        _number(b, f"model.{key}_blocks[{i}]", 1, whole=True)


def check_vae_config(cfg: VaeDistillConfig) -> None:
    """Value checks the schema's types cannot express (KoalaError naming the key)."""
    if not cfg.teacher:
        raise KoalaError("no teacher: give --teacher PIPE (a pipeline or AutoencoderKL directory)", option="teacher")
    if not cfg.out:
        raise KoalaError("no output folder: give --out DIR", option="out")
    m, t, loss = cfg.model, cfg.train, cfg.loss
    _stages(m.decoder_channels, m.decoder_blocks, "decoder")
    if m.encoder:
        _stages(m.encoder_channels, m.encoder_blocks, "encoder")
    for key in ("l1", "l2", "latent"):
        _number(getattr(loss, key), f"loss.{key}", 0)
    if loss.l1 + loss.l2 <= 0:
        raise KoalaError("loss.l1 + loss.l2 must be above 0 (the decoder's pixel loss)", option="loss.l1")
    for key in ("resolution", "batch_size", "max_steps", "log_every"):
        _number(getattr(t, key), f"train.{key}", 1, whole=True)
    for key in ("lr_warmup_steps", "checkpoint_every", "keep_checkpoints", "num_workers", "seed"):
        _number(getattr(t, key), f"train.{key}", 0, whole=True)
    _number(t.lr, "train.lr", 0)
    _number(t.weight_decay, "train.weight_decay", 0)
    for key, value, allowed in (
        ("train.lr_schedule", t.lr_schedule, LR_SCHEDULES),
        ("train.latent", t.latent, LATENTS),
        ("train.teacher_dtype", t.teacher_dtype, DTYPES),
    ):
        if value not in allowed:
            raise KoalaError(f"{key} must be one of {', '.join(allowed)}, got {value!r}", option=key)
    if not isinstance(cfg.data, dict):
        raise KoalaError(f"data must be a mapping (e.g. {{type: folder, path: images/}}), got {cfg.data!r}")
    data = normalize_data_cfg(cfg.data)
    if data["type"] == "cache" and m.encoder:
        raise KoalaError(
            "model.encoder=true needs images to encode, and a latent cache (data.type=cache) holds latents only; "
            "train the encoder on an image source or set model.encoder=false",
            option="model.encoder",
        )
    if data.get("repeat") is False:
        raise KoalaError("data.repeat: false is not supported for training (steps count an endless stream)")
