"""The tiny VAE decoder (``koala vae distill``): an ``AutoencoderTiny`` (TAESD architecture) trained to reproduce a
teacher AutoencoderKL's decodes from the denoiser's latents; decoder always, encoder optionally."""

from .config import VaeDistillConfig, load_vae_config
from .models import check_fits, latent_scaling, teacher_decode, teacher_vae_dir, tiny_decode

__all__ = [
    "VaeDistillConfig",
    "load_vae_config",
    "distill_vae",
    "check_fits",
    "latent_scaling",
    "teacher_decode",
    "teacher_vae_dir",
    "tiny_decode",
]


def distill_vae(cfg, log=print) -> dict:
    """Train the tiny VAE of a resolved config (see :func:`load_vae_config`)."""
    from .train import distill_vae as _distill_vae

    return _distill_vae(cfg, log)
