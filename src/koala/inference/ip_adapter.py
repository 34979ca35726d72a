"""An IP-Adapter (image prompt) on a loaded pipeline: the CLIP image encoder, the adapter file through diffusers'
``load_ip_adapter``, its scale and the reference image that every pipeline call gets."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import KoalaError


@dataclass
class IPAdapterArgs:
    """``koala generate --ip-adapter FILE --ip-image IMG [--ip-scale S] [--image-encoder DIR]``."""

    file: str
    image: str
    scale: float = 1.0
    image_encoder: str | None = None  # None: the pipeline's own, else an image_encoder/ folder beside the file


@dataclass
class AppliedIPAdapter:
    desc: str  # "file:scale (image)" for the PNG metadata
    image: "object"  # the reference image (PIL, RGB)

    def call_kwargs(self, n: int) -> dict:
        """What a pipeline call for ``n`` images gets: the reference image once per image, for the one adapter."""
        return {"ip_adapter_image": [[self.image] * n]}


def apply_ip_adapter(pipe, fam, args: IPAdapterArgs) -> AppliedIPAdapter:
    """Check the IP-Adapter fits the pipeline's U-Net (a teacher's adapter on a student is refused with the
    transfer command), register the image encoder, load the adapter and set its scale."""
    from ..families import denoiser_of
    from ..formats.ip_adapter import check_fits, cross_attention_layers, read_ip_adapter

    if not fam.ip_adapter_transfer:
        raise KoalaError(f"--ip-adapter: not for {fam.label} models: {fam.ip_adapter_missing}", option="ip_adapter")
    try:
        ipa = read_ip_adapter(args.file)
        unet = denoiser_of(pipe)
        check_fits(ipa, unet, cross_attention_layers(unet), "this model's U-Net")
    except KoalaError as err:
        raise KoalaError(str(err), option="ip_adapter") from None
    image = _reference_image(args.image)
    if getattr(pipe, "image_encoder", None) is None or args.image_encoder:
        pipe.register_modules(image_encoder=_image_encoder(args, ipa, denoiser_of(pipe).dtype))
    folder, name = os.path.split(os.path.abspath(args.file))
    pipe.load_ip_adapter(folder, subfolder="", weight_name=name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(args.scale)
    return AppliedIPAdapter(f"{name}:{args.scale:g} ({os.path.basename(args.image)})", image)


def _reference_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise KoalaError(f"--ip-image {path}: no such file", option="ip_image")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise KoalaError(f"--ip-image {path}: not an image PIL can read ({err})", option="ip_image") from None


def _image_encoder(args: IPAdapterArgs, ipa, dtype):
    """The CLIP image encoder (``CLIPVisionModelWithProjection``, safetensors only): ``--image-encoder``, else an
    ``image_encoder/`` folder beside the adapter file (the h94/IP-Adapter repository's layout)."""
    from transformers import CLIPVisionModelWithProjection

    path = args.image_encoder or os.path.join(os.path.dirname(os.path.abspath(args.file)), "image_encoder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise KoalaError(
            f"--image-encoder {path}: no config.json there; give the CLIP image encoder directory the IP-Adapter "
            "was trained with (e.g. h94/IP-Adapter sdxl_models/image_encoder for the SDXL adapters)",
            option="image_encoder",
        )
    enc = CLIPVisionModelWithProjection.from_pretrained(path, use_safetensors=True, dtype=dtype)
    width = ipa.image_proj["proj.weight"].shape[1] if "proj.weight" in ipa.image_proj else None
    if width is not None and width != enc.config.projection_dim:
        raise KoalaError(
            f"--image-encoder {path}: its image embedding has {enc.config.projection_dim} values but the "
            f"IP-Adapter {args.file} projects {width}: another image encoder than the adapter's",
            option="image_encoder",
        )
    return enc
