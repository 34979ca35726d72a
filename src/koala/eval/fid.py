"""FID of a folder of generated images against a reference folder (torchmetrics' ``FrechetInceptionDistance``).

The Inception network comes from a local TorchScript file: the standard FID Inception-v3 as StyleGAN2-ADA and
clean-fid distribute it (``inception-2015-12-05.pt``; called as ``model(images, return_features=True)`` on
float images in [0, 255], 2048 features). A TorchScript file is code plus tensors in a zip and is not unpickled.
torchmetrics computes the statistic (means, covariances, the matrix square root) from those features.

Images are resized to 299 x 299 with PIL's bicubic filter on the uint8 image (clean-fid's "clean" resize) before
they are batched. Unreadable images are skipped and counted.
"""

from __future__ import annotations

import os

import torch

from ..errors import KoalaError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InceptionFeatures(torch.nn.Module):
    """uint8 [N, 3, H, W] -> features, through a TorchScript Inception called with ``return_features=True``."""

    def __init__(self, scripted):
        super().__init__()
        self.net = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float(), return_features=True)


def load_inception(path: str, device: str = "cpu") -> InceptionFeatures:
    if not os.path.isfile(path):
        raise KoalaError(
            f"Inception {path}: no such file (the FID Inception as TorchScript, inception-2015-12-05.pt)",
            option="inception",
        )
    try:
        net = torch.jit.load(path, map_location=device)
    except (RuntimeError, ValueError) as err:
        raise KoalaError(
            f"Inception {path}: not a TorchScript file ({str(err).splitlines()[0][:200]})", option="inception"
        ) from None
    feats = InceptionFeatures(net.eval()).to(device)
    try:
        with torch.no_grad():
            out = feats(torch.zeros(1, 3, 299, 299, dtype=torch.uint8, device=device))
    except Exception as err:  # noqa: BLE001 - a TorchScript model with another interface
        raise KoalaError(
            f"Inception {path}: calling it as model(images, return_features=True) failed "
            f"({str(err).splitlines()[0][:200]})",
            option="inception",
        ) from None
    if out.ndim != 2:
        raise KoalaError(
            f"Inception {path}: returned features of shape {tuple(out.shape)}, expected [N, D]", option="inception"
        )
    return feats


def read_images(folder: str, size: int = 299) -> tuple[list[torch.Tensor], list[dict]]:
    """uint8 [3, size, size] tensors of every image of ``folder`` (sorted), and the skipped files."""
    import numpy as np
    from PIL import Image

    if not os.path.isdir(folder):
        raise KoalaError(f"{folder}: no such directory")
    out, skipped = [], []
    for name in sorted(os.listdir(folder)):
        if not name.lower().endswith(IMAGE_EXTS) or name.startswith("."):
            continue
        try:
            with Image.open(os.path.join(folder, name)) as im:
                arr = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
        except (OSError, ValueError) as err:
            skipped.append({"file_name": name, "reason": str(err)[:200]})
            continue
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return out, skipped


def fid(
    generated: str,
    reference: str,
    inception: str,
    device: str = "cpu",
    batch_size: int = 32,
    size: int = 299,
    features=None,
) -> dict:
    """FID between the images of ``generated`` and ``reference``; JSON-ready."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    feats = features or load_inception(inception, device)
    metric = FrechetInceptionDistance(feature=feats, normalize=False).to(device)
    counts, skipped = {}, {}
    for real, folder in ((True, reference), (False, generated)):
        images, skip = read_images(folder, size)
        if len(images) < 2:
            raise KoalaError(
                f"{folder}: FID needs at least 2 readable images, found {len(images)} ({len(skip)} unreadable)"
            )
        for i in range(0, len(images), batch_size):
            metric.update(torch.stack(images[i : i + batch_size]).to(device), real=real)
        counts["reference" if real else "generated"] = len(images)
        skipped["reference" if real else "generated"] = skip
    value = float(metric.compute())
    return {
        "schema": "koala-eval-fid/1",
        "generated": generated,
        "reference": reference,
        "inception": inception,
        "fid": value,
        "n_generated": counts["generated"],
        "n_reference": counts["reference"],
        "skipped": skipped,
    }
