"""Parameter and FLOP counts of real-size architectures, computed on the ``meta`` device (no memory, seconds)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..utils import count_params
from .compress import build_unet
from .presets import PRESETS, SDXL_BASE_UNET_CONFIG, resolve_spec, student_config


def unet_flops(config: dict, resolution: int, batch: int = 1, text_len: int = 77, vae_scale: int = 8) -> int:
    """FLOPs of one U-Net forward (batch ``batch``) at ``resolution`` pixels, counted on meta tensors."""
    unet = build_unet(config, "meta")
    c = unet.config
    lat = resolution // vae_scale
    with torch.device("meta"):
        x = torch.empty(batch, c.in_channels, lat, lat)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, text_len, c.cross_attention_dim)
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
        with FlopCounterMode(display=False) as counter:
            unet(x, t, ctx, added_cond_kwargs=added)
    return int(counter.get_total_flops())


def preset_stats(name: str, teacher_config: dict | None = None, flops: bool = True) -> dict:
    """Row of the presets table: params (exact count), TFLOPs at 1024^2 and 512^2, depth, mid block."""
    spec = resolve_spec(name)
    cfg = student_config(teacher_config or SDXL_BASE_UNET_CONFIG, spec)
    row = {
        "name": name,
        "description": spec.description,
        "unet_params": count_params(build_unet(cfg, "meta")),
        "paper_params": spec.paper_params,
        "encoder_layers": spec.encoder_layers,
        "transformer_depth": spec.down_depth,
        "decoder_transformer_depth": spec.up_depth,
        "mid_block": spec.mid_block,
    }
    if flops:
        row["tflops_1024"] = round(unet_flops(cfg, 1024) / 1e12, 3)
        row["tflops_512"] = round(unet_flops(cfg, 512) / 1e12, 3)
    return row


def all_preset_stats(flops: bool = True) -> list[dict]:
    return [preset_stats(n, flops=flops) for n in PRESETS]
