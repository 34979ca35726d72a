"""Components to benchmark: real-size architectures of any family with random weights, tiny ones, or a pipeline
directory.

Real-size presets need no weights: every module is built on ``meta`` (no memory, no init time), moved with
``to_empty`` and filled in place with small random values. Latency and memory do not depend on the values
(flush-denormal is turned on by the timer so tiny values cannot slow a CPU down).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL

from ..errors import KoalaError
from ..families import Family, all_presets, family_of, model_dir_kind
from ..families.sdxl import SDXL_VAE_CONFIG
from ..utils.files import read_json
from ..utils.weights import count_params, tensor_bytes

SDXL_VAE = SDXL_VAE_CONFIG

TINY_PREFIX = "tiny-"  # "tiny-sdxl-base", "tiny-koala-700m", ...: preset applied to koala.testing.tiny RANDOM teacher


@dataclass
class BenchModel:
    """Everything the timer needs for one model; ``text_encoders``/``vae`` may be None (denoiser only). ``unet`` is
    the denoiser, a U-Net or a DiT transformer (the report's ``unet`` fields name it so for every family)."""

    name: str
    source: str  # "preset", "tiny-preset" or the pipeline directory
    unet: torch.nn.Module
    text_encoders: list = field(default_factory=list)
    vae: AutoencoderKL | None = None
    vae_scale: int = 8
    family: str = "sdxl"

    def params(self) -> dict:
        out = {"unet": count_params(self.unet)}
        if self.text_encoders:
            out["text_encoders"] = sum(count_params(t) for t in self.text_encoders)
        if self.vae is not None:  # Table 1's "VAE Dec." 83M is the whole SDXL VAE; the decoder part is given too
            out["vae"] = count_params(self.vae)
            out["vae_decoder"] = sum(count_params(m) for m in vae_decoder_modules(self.vae))
        return out

    def weight_bytes(self) -> int:
        mods = [self.unet, *self.text_encoders] + ([self.vae] if self.vae is not None else [])
        return sum(tensor_bytes(p) for m in mods for p in m.parameters())  # quantized: their int8 data and scales


def vae_decoder_modules(vae) -> list:
    """The modules a VAE decode runs: the decoder and, for an AutoencoderKL, its post-quant conv (a tiny
    AutoencoderTiny has none)."""
    return [m for m in (vae.decoder, getattr(vae, "post_quant_conv", None)) if m is not None]


def swap_vae(m: BenchModel, path: str, device, dtype) -> None:
    """Put the VAE of ``path`` (an AutoencoderKL or a tiny AutoencoderTiny) in place of ``m``'s; a VAE of another
    latent size (latent channels, downsampling factor) is refused."""
    from ..inference.pipeline import load_vae

    vae = load_vae(path, dtype)
    channels, scale = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    want = m.unet.config.in_channels
    if channels != want or scale != m.vae_scale:
        raise KoalaError(
            f"vae {path}: a VAE of another latent size ({channels} latent channels, downsampling {scale}); "
            f"{m.name} needs {want} channels and {m.vae_scale}",
            option="vae",
        )
    m.vae = _to(vae, device, dtype)


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


def real_text_encoder_factories(family: Family) -> list:
    """Constructors of the family's real-size text towers (SDXL: CLIP-L + OpenCLIP bigG; SD-1.x: CLIP-L; PixArt:
    T5-XXL's encoder)."""
    import transformers

    config_cls = getattr(transformers, family.text_config_class_name)
    return [
        lambda cls=cls, tower=tower: getattr(transformers, cls)(config_cls(**tower))
        for (_, _, cls), tower in zip(family.text_encoders, family.real_text_towers)
    ]


def real_text_encoders(family: Family, device, dtype):
    """The family's real-size text towers with random weights."""
    return [materialize(f, device, dtype, i + 1) for i, f in enumerate(real_text_encoder_factories(family))]


def sdxl_vae(device, dtype):  # SD-1.x's and PixArt's VAEs have the same architecture
    return materialize(lambda: AutoencoderKL(**SDXL_VAE), device, dtype, 3)


def preset_unet_config(name: str) -> tuple[Family, dict]:
    """``(family, denoiser config)`` of a preset (``koala-700m``) or tiny preset (``tiny-koala-700m``; a tiny PixArt
    teacher has the real one's 28 blocks, so ``tiny-dit-m`` keeps 14 as DiT-M does)."""
    base = name[len(TINY_PREFIX) :] if name.startswith(TINY_PREFIX) else name
    fam = all_presets().get(base)
    if fam is None:
        raise KoalaError(
            f"models: {name!r} is neither a preset ({', '.join(all_presets())}; prefix 'tiny-' for "
            "test-size versions) nor an existing pipeline directory",
            option="models",
        )
    if name.startswith(TINY_PREFIX):
        from ..testing.tiny import RANDOM, denoiser_config

        cfg = denoiser_config(RANDOM, fam.name)
        if "num_layers" in fam.reference_config:
            cfg["num_layers"] = fam.reference_config["num_layers"]
        return fam, fam.student_config(cfg, base)
    return fam, fam.student_config(fam.reference_config, base)


def build_bench_model(name: str, device="cpu", dtype=torch.float32, components=("text", "unet", "vae")) -> BenchModel:
    """A preset (random real-size weights), a tiny preset, or a pipeline directory on disk."""
    want_text, want_vae = "text" in components, "vae" in components
    if os.path.isdir(name):
        return _from_pipeline_dir(name, device, dtype, want_text, want_vae)
    fam, cfg = preset_unet_config(name)
    unet = materialize(lambda: fam.build_model(cfg, "meta"), device, dtype)
    if name.startswith(TINY_PREFIX):
        from ..testing.tiny import RANDOM, tiny_text_encoders, tiny_vae

        tes = [_to(m, device, dtype) for m in tiny_text_encoders(RANDOM, 1000, family=fam.name)] if want_text else []
        vae = _to(tiny_vae(RANDOM), device, dtype) if want_vae else None
        return BenchModel(name, "tiny-preset", unet, tes, vae, vae_scale=2, family=fam.name)
    tes = real_text_encoders(fam, device, dtype) if want_text else []
    vae = sdxl_vae(device, dtype) if want_vae else None
    return BenchModel(name, "preset", unet, tes, vae, vae_scale=8, family=fam.name)


def _to(module, device, dtype):
    module = module.to(device)
    return (module.to(dtype=dtype) if dtype != torch.float32 else module).eval().requires_grad_(False)


def _from_pipeline_dir(path, device, dtype, want_text, want_vae) -> BenchModel:
    if model_dir_kind(path) != "pipeline":
        raise KoalaError(
            f"models: {path} is a U-Net directory; give a full pipeline directory (model_index.json)", option="models"
        )
    fam = family_of(path)
    unet = fam.load_model(os.path.join(path, fam.model_subfolder), dtype).to(device).eval()
    parts = fam.load_parts(path, dtype, dtype, device) if (want_text or want_vae) else None
    vae_cfg = read_json(os.path.join(path, "vae", "config.json"))
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return BenchModel(
        os.path.basename(os.path.normpath(path)),
        os.path.abspath(path),
        unet,
        parts.text_encoders if want_text else [],
        parts.vae if want_vae else None,
        scale,
        fam.name,
    )
