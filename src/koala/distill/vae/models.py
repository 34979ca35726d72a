"""The teacher VAE and its tiny student: loading, the latent convention, building, saving with a model card.

Latent convention (TAESD's, which diffusers' pipelines follow): a tiny decoder takes the *scaled* latents the
denoiser works in, ``z = (raw - shift_factor) * scaling_factor``, and its config says ``scaling_factor: 1.0`` and
``shift_factor: 0.0``, so a pipeline's ``vae.decode(latents / vae.config.scaling_factor)`` hands it ``z`` unchanged.
The teacher decodes the same ``z`` as ``teacher.decode(z / scaling_factor + shift_factor)``
(:func:`teacher_decode`). The teacher's own factor is recorded in ``koala_vae.json`` beside the weights.
AutoencoderTiny's ``latent_magnitude`` / ``latent_shift`` only map latents to [0, 1] for 8-bit storage
(``scale_latents``, used by its ``forward``); ``decode`` does not read them, so they keep diffusers' defaults.
"""

from __future__ import annotations

import os

import torch

from ...errors import KoalaError
from ...utils.files import read_json

RECORD = "koala_vae.json"  # what the tiny VAE was distilled from (teacher, its latent scaling, the recipe)


def teacher_vae_dir(path: str) -> str:
    """The teacher's AutoencoderKL directory: ``path`` itself, or a pipeline directory's ``vae/``."""
    if not os.path.isdir(path):
        raise KoalaError(f"teacher {path}: no such directory", option="teacher")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        path = os.path.join(path, "vae")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise KoalaError(
            f"teacher {path}: no config.json; give a pipeline directory (with vae/) or an AutoencoderKL directory",
            option="teacher",
        )
    cls = read_json(cfg).get("_class_name")
    if cls != "AutoencoderKL":
        raise KoalaError(
            f"teacher {cfg}: _class_name is {cls!r}; the teacher must be an AutoencoderKL", option="teacher"
        )
    return path


def latent_scaling(vae_config) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config (shift 0 when it has none)."""
    get = vae_config.get if isinstance(vae_config, dict) else lambda k, d=None: getattr(vae_config, k, d)
    return float(get("scaling_factor", 1.0) or 1.0), float(get("shift_factor", 0.0) or 0.0)


def stage_count(vae_config: dict) -> int:
    """Stages of a VAE config (AutoencoderKL ``block_out_channels``; AutoencoderTiny registers its decoder's there
    too): the image is ``2 ** (stages - 1)`` times the latent's size."""
    return len(vae_config["block_out_channels"])


def check_fits(tiny_cfg: dict, teacher_cfg: dict, where: str, option: str) -> None:
    """A tiny VAE (config) can stand in for the teacher's: same latent channels, same downsampling factor."""
    for what, mine, theirs in (
        ("latent channels", tiny_cfg.get("latent_channels"), teacher_cfg.get("latent_channels")),
        ("stages (downsampling 2^(n-1))", stage_count(tiny_cfg), stage_count(teacher_cfg)),
    ):
        if mine != theirs:
            raise KoalaError(
                f"{where}: a VAE of another latent size: {what} {mine}, but the teacher VAE has {theirs}; "
                "use a tiny VAE made for this teacher",
                option=option,
            )


def load_teacher_vae(path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(teacher_vae_dir(path), dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def build_tiny_vae(model_cfg, teacher_cfg: dict):
    """A fresh ``AutoencoderTiny`` for the teacher (``model.*`` settings), or ``model.init`` loaded and checked."""
    from diffusers import AutoencoderTiny

    if model_cfg.init:
        path = model_cfg.init
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise KoalaError(f"model.init {path}: no config.json (an AutoencoderTiny directory)", option="model.init")
        cfg = read_json(os.path.join(path, "config.json"))
        if cfg.get("_class_name") != "AutoencoderTiny":
            raise KoalaError(
                f"model.init {path}: _class_name is {cfg.get('_class_name')!r}, expected 'AutoencoderTiny'",
                option="model.init",
            )
        check_fits(cfg, teacher_cfg, f"model.init {path}", "model.init")
        return AutoencoderTiny.from_pretrained(path, dtype=torch.float32)
    n = stage_count(teacher_cfg)
    if len(model_cfg.decoder_channels) != n:
        raise KoalaError(
            f"model.decoder_channels has {len(model_cfg.decoder_channels)} stages but the teacher VAE has {n} "
            f"(block_out_channels {teacher_cfg['block_out_channels']}); give {n} decoder stages so both upsample "
            f"by {2 ** (n - 1)}",
            option="model.decoder_channels",
        )
    if model_cfg.encoder and len(model_cfg.encoder_channels) != n:
        raise KoalaError(
            f"model.encoder_channels has {len(model_cfg.encoder_channels)} stages but the teacher VAE has {n}",
            option="model.encoder_channels",
        )
    return AutoencoderTiny(
        in_channels=teacher_cfg.get("in_channels", 3),
        out_channels=teacher_cfg.get("out_channels", 3),
        encoder_block_out_channels=tuple(model_cfg.encoder_channels),
        decoder_block_out_channels=tuple(model_cfg.decoder_channels),
        act_fn=model_cfg.act_fn,
        latent_channels=teacher_cfg["latent_channels"],
        num_encoder_blocks=tuple(model_cfg.encoder_blocks),
        num_decoder_blocks=tuple(model_cfg.decoder_blocks),
        scaling_factor=1.0,  # takes the denoiser's scaled latents as they are (TAESD's convention)
        shift_factor=0.0,
    )


def scaled_latents(teacher, raw: torch.Tensor) -> torch.Tensor:
    """The denoiser's latents ``(raw - shift) * scale`` of the teacher's raw posterior latents."""
    scale, shift = latent_scaling(teacher.config)
    return (raw - shift) * scale


def teacher_decode(teacher, z: torch.Tensor) -> torch.Tensor:
    """The teacher's image [-1, 1] of the denoiser's latents ``z`` (as its pipeline decodes them)."""
    scale, shift = latent_scaling(teacher.config)
    dt = next(teacher.parameters()).dtype
    return teacher.decode((z / scale + shift).to(dt)).sample.float()


def tiny_decode(tiny, z: torch.Tensor) -> torch.Tensor:
    """The tiny VAE's image [-1, 1] of the denoiser's latents ``z``, through its own config as a pipeline does."""
    scale, shift = latent_scaling(tiny.config)
    return tiny.decode(z / scale + shift).sample


def save_tiny_vae(tiny, out_dir: str, record: dict, card: str) -> None:
    """``save_pretrained`` (safetensors) plus ``koala_vae.json`` and the model card ``README.md``."""
    import json

    tiny.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, RECORD), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def model_card(record: dict) -> str:
    """A short model card (Hugging Face format) for a distilled tiny VAE."""
    t = record["teacher"]
    dec = record["params"]["decoder"]
    enc = record["params"].get("encoder")
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [koala, vae, taesd, autoencoder-tiny]",
        "---",
        "",
        "# Tiny VAE (AutoencoderTiny) distilled by koala",
        "",
        f"A TAESD-architecture decoder{' and encoder' if enc else ''} trained by `koala vae distill` to reproduce "
        f"the decodes of the teacher VAE `{t['path']}` ({t['params'] / 1e6:.2f} M parameters, latent channels "
        f"{t['latent_channels']}, scaling factor {t['scaling_factor']:g}).",
        "",
        f"- decoder: {dec / 1e6:.3f} M parameters"
        + (f"; encoder: {enc / 1e6:.3f} M" if enc else "; encoder untrained"),
        f"- trained {record['step']} steps of batch {record['batch_size']} at {record['resolution']} px, loss "
        f"{record['loss']} (last logged {record.get('last_loss', float('nan')):.5f})",
        "- latents: the denoiser's scaled latents go in as they are (`scaling_factor: 1.0`, TAESD's convention); "
        "a diffusers pipeline's `vae.decode(latents / vae.config.scaling_factor)` does exactly that",
        "",
        "```python",
        "from diffusers import AutoencoderTiny",
        "pipe.vae = AutoencoderTiny.from_pretrained('THIS_DIR')  # or: koala generate --vae THIS_DIR",
        "```",
        "",
    ]
    return "\n".join(lines)
