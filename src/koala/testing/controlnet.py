"""A tiny teacher ControlNet for tests: diffusers' ``ControlNetModel.from_unet`` of a tiny U-Net, with its zero
convolutions filled with small random values (a trained ControlNet's are not zero, and a test of what is copied
where, or of whether control changes an image, needs them not to be)."""

from __future__ import annotations

import torch


def tiny_controlnet(unet, seed: int = 0, scale: float = 0.05):
    """A ControlNet for ``unet`` (its encoder's weights; conditioning embedding (8, 16): one downsampling, as the
    tiny VAE's) with random zero convolutions, seeded."""
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    gen = torch.Generator().manual_seed(seed)
    zero = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero:
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return cn.eval()


def save_tiny_controlnet(pipeline_dir: str, out_dir: str, seed: int = 0) -> str:
    """:func:`tiny_controlnet` of the U-Net of ``pipeline_dir``, saved to ``out_dir`` (safetensors)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    tiny_controlnet(unet, seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
