"""Training checkpoints: ``OUTPUT/checkpoints/step-0000010/`` written atomically (temp dir + rename).

Layout::

    unet/            student as a diffusers model (safetensors) + koala_layer_map.json (transformer/ for a DiT)
    unet_ema/        EMA weights, same format (when EMA is on; transformer_ema/ for a DiT)
    trainer_state.pt optimizer / EMA / grad-scaler state (tensors and numbers only; loaded with weights_only=True)
    state.json       step, the batch layout (world size, accumulation, global batch) and the config as written
    README.md        the model card (koala.card): student, layer map per stage, sampling defaults, training so far
    controlnet/      ControlNet KD (controlnet.teacher): the student ControlNet (diffusers folder, with its card)
"""

from __future__ import annotations

import json
import os
import re
import shutil

from safetensors.torch import load_file

from ..card import write_model_card
from ..errors import KoalaError
from ..families import find_model_folder, get_family, model_subfolders
from ..utils.files import atomic_output_dir
from ..utils.weights import load_tensor_file, save_tensor_file
from .ema import ema_weights

STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """``latest`` -> newest checkpoint in ``output_dir`` (None when there is none yet); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    if not os.path.isfile(os.path.join(resume, "state.json")):
        raise KoalaError(
            f"train.resume {resume}: not a koala distill checkpoint (no state.json); use 'latest' or a "
            f"path like {checkpoint_root(output_dir)}/step-0001000"
        )
    return resume


def model_folder(lmap) -> str:
    """The student's folder in a checkpoint: its family's pipeline subfolder (unet, or transformer for a DiT)."""
    return get_family(lmap.family).model_subfolder


def save_checkpoint(
    layout,
    step: int,
    student,
    lmap,
    ema,
    optimizer,
    scaler,
    cfg,
    keep: int = 0,
    states: dict | None = None,
    objective=None,
    controlnet=None,
) -> str:
    """Write ``step-NNNNNNN`` under ``layout.output_dir`` (a :class:`~koala.distill.config.RunLayout`) for the run
    of ``cfg`` (a :class:`~koala.distill.config.DistillConfig`); keep the newest ``keep`` (0: all). ``states``: the
    full student / optimizer / EMA states gathered from a sharded (FSDP) run
    (:func:`koala.distill.sharding.gather_states`); written in the same layout as an unsharded run's. ``objective``:
    the run's step objective (:mod:`koala.distill.fewstep`), when it has one: its state goes into
    ``trainer_state.pt`` and, in LoRA mode, it writes the student (merged) and the LoRA file. ``controlnet``: the
    run's :class:`~koala.distill.controlnet.ControlNetKD` (ControlNet KD): it writes the student ControlNet into
    ``controlnet/`` (its optimizer state is in the optimizer's)."""
    final = os.path.join(checkpoint_root(layout.output_dir), f"step-{step:07d}")
    with atomic_output_dir(final, overwrite=True) as tmp:
        sub = model_folder(lmap)
        if states is not None:
            _save_gathered(tmp, sub, student, lmap, states, scaler)
        else:
            _save_plain(tmp, sub, student, lmap, ema, optimizer, scaler, objective)
        if controlnet is not None:
            controlnet.save(os.path.join(tmp, "controlnet"))
        n_params = sum(p.numel() for p in student.parameters())
        write_model_card(tmp, lmap, n_params, training=training_summary(cfg, step, layout), layout="checkpoint")
        _write_state(tmp, step, layout, cfg, "names" if states is not None else "indices")
    if keep and keep > 0:
        for _, old in list_checkpoints(layout.output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(folder: str, step: int, layout, cfg, optimizer_layout: str) -> None:
    """``state.json``: the step, the batch layout the run trained with (a resume checks it) and the config."""
    state = {
        "step": step,
        "world_size": layout.world_size,
        "grad_accum": layout.grad_accum,
        "global_batch": layout.global_batch,
        "optimizer_layout": optimizer_layout,
        "config": cfg.to_dict(),
    }
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


def training_summary(cfg, step: int, layout) -> dict:
    """What a checkpoint's model card says about its training."""
    features = cfg.kd.features or {}
    feats = ", ".join(f"{k} at {v if isinstance(v, str) else ', '.join(map(str, v))}" for k, v in features.items())
    loss = cfg.loss
    return {
        "step": step,
        "global_batch": layout.global_batch,
        "features": feats or "none",
        "loss": f"task {loss.task} + out {loss.out} + feat {loss.feat}",
    }


def _save_gathered(tmp: str, sub: str, student, lmap, states: dict, scaler) -> None:
    from .sharding import save_model_dir

    save_model_dir(student, states["student"], os.path.join(tmp, sub))
    lmap.save(os.path.join(tmp, sub))
    ema = states["ema"]
    if ema is not None:
        names = [n for n, _ in student.named_parameters()]
        weights = {**states["student"], **dict(zip(names, ema["shadow_params"]))}
        save_model_dir(student, weights, os.path.join(tmp, f"{sub}_ema"))
        lmap.save(os.path.join(tmp, f"{sub}_ema"))
    save_tensor_file(
        {"optimizer": states["optimizer"], "ema": ema, "scaler": scaler.state_dict() if scaler is not None else None},
        os.path.join(tmp, "trainer_state.pt"),
    )


def _save_plain(tmp: str, sub: str, student, lmap, ema, optimizer, scaler, objective=None) -> None:
    if objective is None or not objective.save_model(student, os.path.join(tmp, sub)):
        student.save_pretrained(os.path.join(tmp, sub), safe_serialization=True)
    lmap.save(os.path.join(tmp, sub))
    if ema is not None:
        with ema_weights(ema, student):
            student.save_pretrained(os.path.join(tmp, f"{sub}_ema"), safe_serialization=True)
        lmap.save(os.path.join(tmp, f"{sub}_ema"))
    state = {
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    if objective is not None:
        state["fewstep"] = objective.state_dict()
    save_tensor_file(state, os.path.join(tmp, "trainer_state.pt"))


def load_checkpoint(path: str, student, ema, optimizer, scaler, objective=None, controlnet=None) -> int:
    """Restore weights and trainer state in place; return the step the checkpoint was taken at. A sharded (FSDP)
    student takes the full states back through :func:`koala.distill.sharding.load_states` (every process calls).
    ``objective``: the run's step objective; it takes its state back (in LoRA mode the adapters: the checkpoint's
    model folder then holds merged weights, which are not loaded); ``controlnet``: ControlNet KD's student ControlNet
    takes its weights back from ``controlnet/``."""
    from .sharding import is_fsdp, load_states

    with open(os.path.join(path, "state.json")) as f:
        meta = json.load(f)
    step, layout = int(meta["step"]), meta.get("optimizer_layout", "indices")
    if (layout == "names") != is_fsdp(student):
        raise KoalaError(
            f"{path} was written by a run with train.fsdp={meta['config']['train'].get('fsdp', 'none')}"
            f" and its optimizer state is keyed by parameter {layout}; resume it with the same "
            "train.fsdp setting (sharded runs keep the optimizer state by parameter name)",
            option="train.fsdp",
        )
    folder = find_model_folder(path)
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors") if folder else None
    if weights is None or not os.path.isfile(weights):
        raise KoalaError(
            f"{path}: missing {' or '.join(f'{d}/' for d in model_subfolders())} diffusion_pytorch_model.safetensors"
        )
    state = load_tensor_file(os.path.join(path, "trainer_state.pt"))
    if not isinstance(state, dict) or "optimizer" not in state:
        raise KoalaError(f"{path}/trainer_state.pt: not a koala trainer state (no optimizer entry)")
    try:
        if layout == "names":
            load_states(
                student,
                getattr(optimizer, "optimizer", optimizer),
                ema,
                load_file(weights, device="cpu"),
                state["optimizer"],
                state.get("ema"),
            )
        elif objective is None or not objective.lora:
            student.load_state_dict(load_file(weights, device="cpu"), strict=True)
    except RuntimeError as err:
        raise KoalaError(
            f"{path}: checkpoint does not fit this student (different preset?): {str(err)[:300]}"
        ) from err
    if controlnet is not None:
        controlnet.load(path)
    if layout != "names":
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if objective is not None:
        if "fewstep" not in state:
            raise KoalaError(
                f"{path} was written by a run without fewstep.method; start the step stage from its student "
                "(student.path=.../unet) instead of resuming it",
                option="train.resume",
            )
        objective.load_state_dict(state["fewstep"])
    return step
