"""SDXL conditioning exactly as ``StableDiffusionXLPipeline`` computes it at inference.

Two CLIP text encoders: penultimate hidden states concatenated along the feature axis; the pooled
embedding comes from the encoder whose first output is 2-D (the second, ``CLIPTextModelWithProjection``).
``add_time_ids`` = original_size (h, w) + crop top-left (top, left) + target_size (h, w).
Training, caching and inference all call these functions, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Sequence

import torch


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], tokenizers, text_encoders, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(prompt_embeds [B, L, D1+D2], pooled_prompt_embeds [B, P])`` for ``prompts``."""
    embeds, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        dev = device if device is not None else next(enc.parameters()).device
        out = enc(tokenize(tok, prompts).to(dev), output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        embeds.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("no text encoder returned a pooled (2-D) embedding; SDXL's second encoder must be "
                         "CLIPTextModelWithProjection")
    return torch.cat(embeds, dim=-1), pooled


def time_ids(original_size, crop_top_left, target_size, dtype=torch.float32) -> torch.Tensor:
    """``[B, 6]`` SDXL micro-conditioning from per-sample (h, w), (top, left), (h, w); tensors or tuples."""
    parts = [torch.as_tensor(x, dtype=dtype) for x in (original_size, crop_top_left, target_size)]
    parts = [p.unsqueeze(0) if p.ndim == 1 else p for p in parts]
    return torch.cat(parts, dim=-1)
