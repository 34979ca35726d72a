"""Sharded student training with torch FSDP2 (``fully_shard``, the engine of accelerate's FSDP plugin v2).

``train.fsdp``:

- ``none``: DDP (every process holds the whole student, its gradients and optimizer states);
- ``grad_op`` (ZeRO-2): parameters stay gathered from forward to backward; gradients and optimizer states (and
  the EMA copy) are sharded, 1/N per process;
- ``full`` (ZeRO-3): parameters are sharded too and gathered block by block in forward and backward.

Each repeated block (:data:`koala.utils.compile.REPEATED_BLOCKS`) is one FSDP unit, the rest of the student another.
Module names do not change, so the featKD hooks, the layer map and ``state_dict`` keys work as without sharding.
The frozen teacher is not sharded (it holds no gradients or optimizer states).

The same code runs on CUDA (NCCL) and CPU (gloo), so the multi-process tests run here. accelerate is still used
for the process group, autocast and the optimizer wrapper; the student is not passed to ``accelerator.prepare``
(that would wrap a sharded module in DDP where accelerate's own FSDP path is off, as it is on CPU).

Checkpoints hold the full (consolidated) student, EMA and optimizer states, gathered from every process with
``torch.distributed.checkpoint.state_dict``: a checkpoint is the same files as an unsharded run's, only the
optimizer state is keyed by parameter name, and a run resumes exactly with the same ``train.fsdp`` and world size.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import KoalaError
from ..utils.compile import REPEATED_BLOCKS

FSDP_MODES = ("none", "grad_op", "full")


def shard_student(student: torch.nn.Module, mode: str) -> int:
    """``fully_shard`` every repeated block, then the root; returns the number of FSDP units."""
    from torch.distributed.fsdp import fully_shard

    if mode not in FSDP_MODES[1:]:
        raise KoalaError(f"train.fsdp {mode!r}: choose one of {', '.join(FSDP_MODES)}", option="train.fsdp")
    reshard = mode == "full"
    units = [m for m in student.modules() if type(m).__name__ in REPEATED_BLOCKS]
    for m in units:
        fully_shard(m, reshard_after_forward=reshard)
    fully_shard(student, reshard_after_forward=reshard)
    return len(units) + 1


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """A DTensor gathered to a plain CPU tensor (a collective: every process calls it); plain tensors as they are.
    ``keep=False`` takes part in the gather and drops the result (the processes that do not write)."""
    from torch.distributed.tensor import DTensor

    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().cpu() if keep else None


def gather_states(student, optimizer, ema, keep: bool = True) -> dict | None:
    """The full student / optimizer / EMA states (collective: every process calls it, one tensor at a time);
    returned where ``keep`` (the main process, which writes the checkpoint), None elsewhere, so only one host copy
    of the student exists."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the optimizer state on the main process
    model_sd = {k: _full(v, keep) for k, v in student.state_dict().items()}
    optim_sd = get_optimizer_state_dict(student, optimizer, options=opts)
    ema_sd = None
    if ema is not None:
        ema_sd = {**ema.state_dict(), "shadow_params": [_full(p, keep) for p in ema.shadow_params]}
    return {"student": model_sd, "optimizer": optim_sd, "ema": ema_sd} if keep else None


def load_states(student, optimizer, ema, model_sd: dict, optim_sd: dict, ema_sd: dict | None) -> None:
    """Scatter full states (read by every process) back into the sharded student, optimizer and EMA."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor, distribute_tensor

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, model_sd, options=opts)
    set_optimizer_state_dict(student, optimizer, optim_sd, options=opts)
    if ema is not None and ema_sd is not None:
        like = list(student.parameters())
        full = ema_sd["shadow_params"]
        ema.load_state_dict(ema_sd)  # decay, step counters; the shadow parameters are re-sharded next
        ema.shadow_params = [
            distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            if isinstance(p, DTensor)
            else t.to(p.device)
            for t, p in zip(full, like)
        ]


def plain_class_name(model: torch.nn.Module) -> str:
    """The diffusers class under FSDP2's dynamic ``FSDP<Class>`` subclass."""
    name = type(model).__name__
    return name[4:] if is_fsdp(model) and name.startswith("FSDP") else name


def save_model_dir(model: torch.nn.Module, state_dict: dict, folder: str) -> None:
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors) from a full state dict."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = json.loads(model.to_json_string())
    config["_class_name"] = plain_class_name(model)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()},
        os.path.join(folder, "diffusion_pytorch_model.safetensors"),
        metadata={"format": "pt"},
    )
