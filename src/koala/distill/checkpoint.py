"""Training checkpoints: ``OUTPUT/checkpoints/step-0000010/`` written atomically (temp dir + rename).

Layout::

    unet/            student as a diffusers model (safetensors) + koala_layer_map.json (transformer/ for a DiT)
    unet_ema/        EMA weights, same format (when EMA is on; transformer_ema/ for a DiT)
    trainer_state.pt optimizer / EMA / grad-scaler state (tensors and numbers only; loaded with weights_only=True)
    state.json       step, world size and global batch, and the resolved config
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file

from ..errors import KoalaError
from ..utils import atomic_output_dir

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
        raise KoalaError(f"train.resume {resume}: not a koala distill checkpoint (no state.json); use 'latest' or a "
                         f"path like {checkpoint_root(output_dir)}/step-0001000")
    return resume


def model_folder(lmap) -> str:
    """The student's folder in a checkpoint: its family's pipeline subfolder (unet, or transformer for a DiT)."""
    from ..families import get_family

    return get_family(lmap.meta.get("family", "sdxl")).model_subfolder


def save_checkpoint(output_dir: str, step: int, student, lmap, ema, optimizer, scaler, cfg: dict, keep: int = 0,
                    world_size: int = 1) -> str:
    final = os.path.join(checkpoint_root(output_dir), f"step-{step:07d}")
    with atomic_output_dir(final, overwrite=True) as tmp:
        sub = model_folder(lmap)
        student.save_pretrained(os.path.join(tmp, sub), safe_serialization=True)
        lmap.save(os.path.join(tmp, sub))
        if ema is not None:
            params = list(student.parameters())
            ema.store(params)
            ema.copy_to(params)
            try:
                student.save_pretrained(os.path.join(tmp, f"{sub}_ema"), safe_serialization=True)
            finally:
                ema.restore(params)
            lmap.save(os.path.join(tmp, f"{sub}_ema"))
        state = {"optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            tcfg = cfg["train"]
            json.dump({"step": step, "world_size": world_size,
                       "global_batch": tcfg["batch_size"] * tcfg["grad_accum"] * world_size, "config": cfg}, f, indent=1)
    if keep and keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, student, ema, optimizer, scaler) -> int:
    """Restore weights and trainer state in place; return the step the checkpoint was taken at."""
    with open(os.path.join(path, "state.json")) as f:
        step = int(json.load(f)["step"])
    cands = [os.path.join(path, d, "diffusion_pytorch_model.safetensors") for d in ("unet", "transformer")]
    weights = next((c for c in cands if os.path.isfile(c)), None)
    if weights is None:
        raise KoalaError(f"{path}: missing unet/ (or transformer/) diffusion_pytorch_model.safetensors")
    try:
        student.load_state_dict(load_file(weights, device="cpu"), strict=True)
    except RuntimeError as err:
        raise KoalaError(f"{path}: checkpoint does not fit this student (different preset?): {str(err)[:300]}") from err
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return step
