"""Components to benchmark: real-size SDXL architectures with random weights, tiny ones, or a pipeline directory.

Real-size presets need no weights: every module is built on ``meta`` (no memory, no init time), moved with
``to_empty`` and filled in place with small random values. Latency and memory do not depend on the values
(flush-denormal is turned on by the timer so tiny values cannot slow a CPU down).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..arch.presets import PRESETS, SDXL_BASE_UNET_CONFIG, student_config
from ..errors import KoalaError
from ..utils import count_params, model_dir_kind, read_json

# CLIP ViT-L/14 text tower (SDXL text_encoder) and OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2).
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

TINY_PREFIX = "tiny-"  # "tiny-sdxl-base", "tiny-koala-700m", ...: preset applied to koala.lab.tiny's teacher


@dataclass
class BenchModel:
    """Everything the timer needs for one model; ``text_encoders``/``vae`` may be None (U-Net only)."""

    name: str
    source: str  # "preset", "tiny-preset" or the pipeline directory
    unet: UNet2DConditionModel
    text_encoders: list = field(default_factory=list)
    vae: AutoencoderKL | None = None
    vae_scale: int = 8

    def params(self) -> dict:
        out = {"unet": count_params(self.unet)}
        if self.text_encoders:
            out["text_encoders"] = sum(count_params(t) for t in self.text_encoders)
        if self.vae is not None:  # Table 1's "VAE Dec." 83M is the whole SDXL VAE; the decoder part is given too
            out["vae"] = count_params(self.vae)
            out["vae_decoder"] = count_params(self.vae.decoder) + count_params(self.vae.post_quant_conv)
        return out

    def weight_bytes(self) -> int:
        mods = [self.unet, *self.text_encoders] + ([self.vae] if self.vae is not None else [])
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


@torch.no_grad()
def random_fill_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Give a ``to_empty`` module usable random weights in place: N(0, std), norms at weight 1 / bias 0.

    Integer buffers named ``*position_ids`` become ``arange``; other buffers are zeroed.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, norms):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif p.device.type == "cpu":
                p.normal_(0.0, std, generator=gen)
            else:
                p.normal_(0.0, std)
        for name, b in mod.named_buffers(recurse=False):
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            else:
                b.zero_()
    return module


def materialize(factory, device, dtype, seed: int = 0):
    """Build ``factory()`` on meta, then allocate on ``device`` in ``dtype`` and random-fill (seconds, not minutes)."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device)
    if dtype != torch.float32:
        module = module.to(dtype=dtype)  # floating tensors only; integer buffers keep their dtype
    random_fill_(module, seed=seed)
    return module.eval().requires_grad_(False)


def sdxl_text_encoders(device, dtype):
    return [materialize(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), device, dtype, 1),
            materialize(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)), device, dtype, 2)]


def sdxl_vae(device, dtype):
    return materialize(lambda: AutoencoderKL(**SDXL_VAE), device, dtype, 3)


def _tiny_parts():
    from ..lab import tiny

    return tiny


def preset_unet_config(name: str) -> dict:
    """U-Net config of a preset (``koala-700m``) or tiny preset (``tiny-koala-700m``)."""
    if name.startswith(TINY_PREFIX):
        base, teacher = name[len(TINY_PREFIX):], _tiny_parts().tiny_unet_config()
    else:
        base, teacher = name, SDXL_BASE_UNET_CONFIG
    if base not in PRESETS:
        raise KoalaError(f"--models: {name!r} is neither a preset ({', '.join(PRESETS)}; prefix 'tiny-' for "
                         "test-size versions) nor an existing pipeline directory")
    return student_config(teacher, base)


def build_bench_model(name: str, device="cpu", dtype=torch.float32, components=("text", "unet", "vae")) -> BenchModel:
    """A preset (random real-size weights), a tiny preset, or an SDXL pipeline directory on disk."""
    want_text, want_vae = "text" in components, "vae" in components
    if os.path.isdir(name):
        return _from_pipeline_dir(name, device, dtype, want_text, want_vae)
    cfg = preset_unet_config(name)
    if name.startswith(TINY_PREFIX):
        tiny = _tiny_parts()
        unet = materialize(lambda: UNet2DConditionModel.from_config(cfg), device, dtype)
        tes = []
        if want_text:
            tes = [_to(m, device, dtype) for m in tiny.tiny_text_encoders(1000)]
        vae = _to(tiny.tiny_vae(), device, dtype) if want_vae else None
        return BenchModel(name, "tiny-preset", unet, tes, vae, vae_scale=2)
    unet = materialize(lambda: UNet2DConditionModel.from_config(cfg), device, dtype)
    tes = sdxl_text_encoders(device, dtype) if want_text else []
    vae = sdxl_vae(device, dtype) if want_vae else None
    return BenchModel(name, "preset", unet, tes, vae, vae_scale=8)


def _to(module, device, dtype):
    module = module.to(device)
    return (module.to(dtype=dtype) if dtype != torch.float32 else module).eval().requires_grad_(False)


def _from_pipeline_dir(path, device, dtype, want_text, want_vae) -> BenchModel:
    if model_dir_kind(path) != "pipeline":
        raise KoalaError(f"--models: {path} is a U-Net directory; give a full pipeline directory (model_index.json)")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"), dtype=dtype).to(device).eval()
    tes = []
    if want_text:
        tes = [CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), dtype=dtype).to(device).eval(),
               CLIPTextModelWithProjection.from_pretrained(os.path.join(path, "text_encoder_2"), dtype=dtype).to(device).eval()]
    vae, scale = None, 8
    vae_cfg = os.path.join(path, "vae", "config.json")
    if os.path.isfile(vae_cfg):
        scale = 2 ** (len(read_json(vae_cfg)["block_out_channels"]) - 1)
    if want_vae:
        vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"), dtype=dtype).to(device).eval()
    return BenchModel(os.path.basename(os.path.normpath(path)), os.path.abspath(path), unet, tes, vae, scale)
