"""The distillation config: every key with its default (the paper's final recipe) and its checks.

Recipes in ``configs/`` override these; ``key=value`` on the command line overrides the recipe.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..errors import KoalaError
from ..recipes import load_recipe

FEATURE_TYPES = ("SA", "CA", "FFN", "Res", "LF")
STAGES = ("DW-1", "DW-2", "DW-3", "MID", "UP-1", "UP-2", "UP-3")

DEFAULTS: dict[str, Any] = {
    "teacher": {
        "pipeline": None,        # local SDXL pipeline dir: text encoders, tokenizers, VAE, scheduler, U-Net
        "unet_path": None,       # replace the pipeline's U-Net (e.g. SDXL-Lightning): U-Net dir or .safetensors file
        "dtype": "fp16",         # weight dtype of the frozen teacher U-Net and text encoders
        "vae_dtype": None,       # null: fp32 if the VAE config says force_upcast, else teacher.dtype
        "make_tiny": False,      # create a random tiny SDXL pipeline at teacher.pipeline if it is missing (tests/demo)
    },
    "student": {
        "path": None,            # compressed student U-Net dir (or pipeline dir) with koala_layer_map.json
        "preset": "koala-700m",  # when path is null: compress the teacher in memory with this preset
        "layer_selection": "bottom",  # which teacher transformer layers initialise the student (compression)
    },
    "kd": {
        # feature type -> "all" or a list of stages. Paper's best (Table 10d): SA everywhere + LF at DW-1 & UP-3.
        "features": {"SA": "all", "LF": ["DW-1", "UP-3"]},
        "layer_selection": None,  # teacher layers matched to a shallower student: null (= layer map's) | bottom | interleave | up
        "normalize": "none",      # none | teacher: divide each feature MSE by the teacher feature's mean square
    },
    "loss": {"task": 1.0, "out": 1.0, "feat": 1.0},
    "data": {
        # synthetic (in memory: num_samples, captions) | folder | parquet | csv | webdataset | hf_disk | cache;
        # the real types go to koala.data.make_dataloader with every key here except the trainer's own
        # (TRAINER_DATA_KEYS) -- see koala/data/config.py for theirs (path, caption_column, buckets, ...)
        "type": "synthetic",
        "caption_dropout": 0.0,  # fraction of captions replaced by zero embeddings (SDXL's empty-prompt uncond)
    },
    "train": {
        "output_dir": "runs/koala",
        "resolution": 1024,
        "batch_size": 1,           # per process, per micro-step
        "grad_accum": 1,           # effective batch = batch_size * grad_accum * processes
        "max_steps": 1000,         # optimizer steps
        "lr": 1.0e-5,
        "weight_decay": 1.0e-2,
        "adam_betas": [0.9, 0.999],
        "adam_eps": 1.0e-8,
        "optimizer": "adamw",      # adamw | adamw8bit (needs bitsandbytes)
        "mixed_precision": "no",   # no | fp16 | bf16
        "gradient_checkpointing": False,
        "max_grad_norm": 1.0,      # null or 0 disables clipping
        "ema": {"enabled": True, "decay": 0.9999},
        "seed": 0,
        "num_workers": 0,
        "log_every": 10,
        "checkpoint_every": 1000,
        "keep_checkpoints": 3,     # 0 keeps all
        "resume": None,            # null | latest | path to a checkpoint dir
        "progress": True,
        "cpu_threads": None,       # torch intra-op threads (null: torch's default); 1 is fastest for tiny CPU runs
    },
    "validation": {
        "every": 0,                # 0 disables; also runs at the end when > 0
        "prompts": ["a photo of an astronaut riding a horse"],
        "seeds": [0],
        "steps": 25,
        "guidance_scale": 5.0,
        "resolution": None,        # null: train.resolution
        "use_ema": False,
    },
}

TRAINER_DATA_KEYS = ("caption_dropout",)  # data keys the trainer reads; never passed to the data loader
ATOMIC = ("kd.features",)
OPEN = ("data", "kd.features")  # data keys go to the data loader; features are checked by feature_stages


def load_config(recipe: str | None, overrides: Iterable[str] = ()) -> dict:
    cfg = load_recipe(recipe, overrides, DEFAULTS, atomic=ATOMIC, open_sections=OPEN)
    check_config(cfg)
    return cfg


def loader_data_cfg(data: dict) -> tuple[dict, list[str]]:
    """``(data_cfg for the loader, ignored keys)``: ``data`` minus the trainer's keys; for a real (koala.data)
    type also minus the synthetic source's keys (a recipe like ``tiny`` sets them; they mean nothing there)."""
    from .simple_data import SYNTHETIC_KEYS

    out = {k: v for k, v in data.items() if k not in TRAINER_DATA_KEYS}
    ignored = []
    if out.get("type", "synthetic") != "synthetic":
        ignored = [k for k in SYNTHETIC_KEYS if k in out]
        for k in ignored:
            del out[k]
    return out, ignored


def feature_stages(features: dict) -> dict[str, list[str] | str]:
    """Validate ``kd.features`` and return it as type -> "all" | [stages]."""
    if features is None:
        return {}
    if not isinstance(features, dict):
        raise KoalaError(f"kd.features must map feature types to stages (e.g. {{SA: all, LF: [DW-1, UP-3]}}), got {features!r}")
    out: dict[str, list[str] | str] = {}
    for ftype, stages in features.items():
        if ftype not in FEATURE_TYPES:
            raise KoalaError(f"kd.features: unknown feature type {ftype!r}; choose from {', '.join(FEATURE_TYPES)}")
        if stages == "all":
            out[ftype] = "all"
            continue
        if isinstance(stages, str):
            stages = [stages]
        if not isinstance(stages, list) or any(s not in STAGES for s in stages):
            raise KoalaError(f"kd.features.{ftype}: stages must be 'all' or a list from {', '.join(STAGES)}, got {stages!r}")
        out[ftype] = list(stages)
    return out


def _num(cfg, key, lo=None):
    sec, name = key.split(".")
    v = cfg[sec][name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (lo is not None and v < lo):
        raise KoalaError(f"{key} must be a finite number{f' >= {lo}' if lo is not None else ''}, got {v!r}")


def check_config(cfg: dict) -> None:
    if cfg["data"].get("repeat", True) is False:
        raise KoalaError("data.repeat: false is not supported for training (the trainer counts steps over an "
                         "endless, per-epoch reshuffled stream); remove it")
    feature_stages(cfg["kd"]["features"])
    if cfg["kd"]["layer_selection"] not in (None, "bottom", "interleave", "up"):
        raise KoalaError(f"kd.layer_selection must be null, bottom, interleave or up, got {cfg['kd']['layer_selection']!r}")
    if cfg["kd"]["normalize"] not in ("none", "teacher"):
        raise KoalaError(f"kd.normalize must be none or teacher, got {cfg['kd']['normalize']!r}")
    for k in ("loss.task", "loss.out", "loss.feat"):
        _num(cfg, k, 0)
    for k in ("train.batch_size", "train.grad_accum", "train.max_steps", "train.resolution"):
        _num(cfg, k, 1)
        if not isinstance(cfg[k.split(".")[0]][k.split(".")[1]], int):
            raise KoalaError(f"{k} must be an integer")
    _num(cfg, "train.lr", 0)
    if cfg["train"]["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise KoalaError(f"train.mixed_precision must be no, fp16 or bf16, got {cfg['train']['mixed_precision']!r}")
    if cfg["train"]["optimizer"] not in ("adamw", "adamw8bit"):
        raise KoalaError(f"train.optimizer must be adamw or adamw8bit, got {cfg['train']['optimizer']!r}")
    p = cfg["data"].get("caption_dropout", 0.0)
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise KoalaError(f"data.caption_dropout must be between 0 and 1, got {p!r}")
    loader_cfg, _ = loader_data_cfg(cfg["data"])
    if loader_cfg.get("type", "synthetic") != "synthetic":
        from ..data.config import normalize_data_cfg

        normalize_data_cfg(loader_cfg)  # unknown keys, missing path, bad type: refuse before loading any model
    if not cfg["teacher"]["pipeline"]:
        raise KoalaError("teacher.pipeline is required: a local SDXL pipeline directory (set it in the recipe or "
                         "pass teacher.pipeline=/path/to/sdxl)")
