"""Tiny image-prompt adapters for tests: a CLIP image encoder and an IP-Adapter file for a tiny U-Net (random
weights, in the layout diffusers' ``load_ip_adapter`` reads)."""

from __future__ import annotations

import torch


def tiny_image_encoder(embed_dim: int = 16, image_size: int = 32, seed: int = 0):
    """A random ``CLIPVisionModelWithProjection`` (2 layers, width 32) whose image embedding has ``embed_dim``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=embed_dim,
    )
    return CLIPVisionModelWithProjection(cfg).eval()


def tiny_ip_adapter(unet, embed_dim: int = 16, tokens: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random IP-Adapter state dict for ``unet``: ``image_proj.proj`` / ``image_proj.norm`` (the plain IP-Adapter's
    projection to ``tokens`` context tokens) and ``ip_adapter.{2k+1}.to_k_ip`` / ``to_v_ip`` for the k-th
    cross-attention processor (diffusers' numbering), shaped like that layer's ``to_k``."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {
        "image_proj.proj.weight": torch.randn(cross * tokens, embed_dim, generator=g) * 0.2,
        "image_proj.proj.bias": torch.randn(cross * tokens, generator=g) * 0.1,
        "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
        "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=g),
    }
    mods = dict(unet.named_modules())
    names = [n[: -len(".processor")] for n in unet.attn_processors if not n.endswith("attn1.processor")]
    for k, name in enumerate(names):
        shape = mods[name].to_k.weight.shape
        for part in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * k + 1}.{part}.weight"] = torch.randn(*shape, generator=g) * 0.2
    return sd
