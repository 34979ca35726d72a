"""LoRA mode of a step objective (the LCM-LoRA form): adapters on the student (peft, through diffusers'
``add_adapter``), the LoRA file diffusers' ``load_lora_weights`` reads, and the merged weights.

Only the adapters train; a checkpoint holds the merged student (``unet/``: a plain few-step student) and the LoRA
file next to it (``pytorch_lora_weights.safetensors``, for ``load_lora_weights`` on the KD student or
``koala generate --lora``); a resume reads the adapters' own tensors from ``trainer_state.pt``.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ...errors import KoalaError

# the layers LCM-LoRA adapts in a U-Net: attention projections, feed-forwards, resnet convs, up/down samplers,
# the time-embedding projections
TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
ADAPTER = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"


def check_family(family) -> None:
    if not hasattr(family.pipeline_class, "save_lora_weights"):
        raise KoalaError(
            f"fewstep.lora_rank > 0: diffusers has no LoRA loader for {family.label} pipelines "
            f"({family.pipeline_class.__name__}); train all weights with fewstep.lora_rank=0",
            option="fewstep.lora_rank",
        )


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None) -> None:
    """Freeze ``model`` and add LoRA adapters of ``rank`` (scale ``alpha / rank``) on the :data:`TARGETS` it has;
    the adapters' down projections start random (from torch's generator), their up projections at zero, so the
    model starts as it was."""
    from peft import LoraConfig

    from ...utils.extras import require

    require("peft", "lora", "fewstep.lora_rank")
    names = {n for n, _ in model.named_modules()}
    targets = [t for t in TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    model.add_adapter(config, adapter_name=ADAPTER)


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (peft names), detached copies on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise KoalaError(f"the checkpoint's LoRA state does not fit this student (missing {missing[:3]})")


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter merged in, under the plain model's names (fp32, CPU)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            out[name.replace(".base_layer.", ".")] = tensor.detach().float().cpu()
    for name, module in _lora_layers(model):
        key = f"{name}.weight"
        delta = module.get_delta_weight(ADAPTER).float().cpu()
        out[key] = out[key] + delta.reshape(out[key].shape)
    return out


def save_merged(model: torch.nn.Module, folder: str) -> None:
    """A plain diffusers model folder (config + safetensors) holding the merged weights."""
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    weights = {k: v.contiguous() for k, v in merged_state_dict(model).items()}
    save_file(weights, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def save_lora_file(model: torch.nn.Module, family, folder: str) -> str:
    """``folder/pytorch_lora_weights.safetensors`` in the peft layout diffusers' ``load_lora_weights`` reads. The
    scale alpha / rank is folded into the up projections, so the file means the same to a loader that reads the
    adapter metadata and to one that takes alpha = rank (older diffusers, other tools)."""
    config = model.peft_config[ADAPTER]
    scale = float(config.lora_alpha) / float(config.r)
    layers = {k: v * scale if ".lora_B." in k else v for k, v in lora_state(model).items()}
    meta = {"r": config.r, "lora_alpha": config.r, "target_modules": sorted(config.target_modules or [])}
    family.pipeline_class.save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=meta
    )
    return os.path.join(folder, LORA_FILE)
