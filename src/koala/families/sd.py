"""SD-1.x / 2.x family: Stable Diffusion v1.4/v1.5 (and 2.x) teachers and BK-SDM's students (paper Table 7).

Conditioning exactly as ``StableDiffusionPipeline`` computes it: one CLIP text encoder, last hidden state
(no added conditions). The unconditional input is the encoding of the empty prompt.
BK-SDM (Kim et al., 2023): Base keeps one resnet(+attention) pair per encoder stage and two per decoder
stage, Small also drops the mid block, Tiny also drops the innermost stage.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..arch.unet import UNetSpec
from .base import Parts, UNetFamily

# The SD-v1.4 / v1.5 U-Net config (public fact: CompVis/stable-diffusion-v1-4 unet/config.json).
SD_V1_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

PRESETS: dict[str, UNetSpec] = {
    "sd-v1": UNetSpec(
        [2, 2, 2, 2], [1, 1, 1, 0], [0, 1, 1, 1], True, None, "SD-v1.4/1.5 U-Net (teacher)", 859_520_964
    ),
    "bk-sdm-base": UNetSpec(
        [1, 1, 1, 1],
        [1, 1, 1, 0],
        [0, 1, 1, 1],
        True,
        None,
        "BK-SDM-Base: 1 pair per encoder stage, 2 per decoder stage",
        579_384_964,
    ),
    "bk-sdm-small": UNetSpec(
        [1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1], False, None, "BK-SDM-Small: Base without the mid block", 482_346_884
    ),
    "bk-sdm-tiny": UNetSpec(
        [1, 1, 1], [1, 1, 1], [1, 1, 1], False, 3, "BK-SDM-Tiny: Small without the innermost stage", 323_384_964
    ),
}


class SDFamily(UNetFamily):
    name = "sd"
    label = "SD-1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    text_cond_keys = ("prompt_embeds",)
    reference_config = SD_V1_UNET_CONFIG
    presets = PRESETS
    real_text_towers = (
        dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
    )  # CLIP ViT-L/14 text tower
    # koala never runs SD's safety checker implicitly (generate has an opt-in NSFW filter)
    pipeline_load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    single_file_layout = "ldm"
    lora_transfer = True
    ip_adapter_transfer = True
    t2i_adapter_pipeline = "StableDiffusionAdapterPipeline"
    controlnet_pipeline_class_name = "StableDiffusionControlNetPipeline"
    reference_name = "SD-v1.4/v1.5"

    def problems(self, config: dict) -> list[str]:
        problems = super().problems(config)
        for key in ("addition_embed_type", "class_embed_type"):
            if config.get(key) is not None:
                problems.append(f"{key} is {config.get(key)!r}; SD-1.x/2.x U-Nets have none")
        return problems

    def encode_tokens(self, ids: Sequence[torch.Tensor], text_encoders) -> dict[str, torch.Tensor]:
        enc = text_encoders[0]
        if getattr(enc.config, "use_attention_mask", False):
            raise ValueError("text encoders with use_attention_mask are not supported (SD-1.x/2.x CLIP has none)")
        return {"prompt_embeds": enc(ids[0].to(next(enc.parameters()).device))[0]}

    def model_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["prompt_embeds"]}

    def dummy_cond(
        self, config: dict, batch: int = 1, text_len: int | None = None, device="meta", dtype=torch.float32
    ) -> dict[str, torch.Tensor]:
        with torch.device(device):
            return {
                "prompt_embeds": torch.randn(
                    batch, text_len or self.default_text_len, config["cross_attention_dim"], dtype=dtype
                )
            }

    def make_pipeline(self, parts: Parts, model, scheduler=None):
        return self.pipeline_class(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            unet=model,
            scheduler=scheduler or parts.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
