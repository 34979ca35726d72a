"""Optional NSFW filter (paper App. E): a local image classifier scores each image; above a threshold it is withheld
(generated images in `koala generate`) or skipped and counted as "nsfw" (training data, data config nsfw_model)."""

from __future__ import annotations

import os

import torch

from .errors import KoalaError


class NSFWFilter:
    """Scores images with a local ``AutoModelForImageClassification`` + ``AutoImageProcessor`` directory.

    ``label`` names the class to watch (matched case-insensitively against the model's ``id2label``); the score
    is that class's softmax probability, and images with ``score > threshold`` are withheld.
    """

    def __init__(self, path: str, label: str = "nsfw", threshold: float = 0.5, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if not os.path.isdir(path):
            raise KoalaError(
                f"NSFW model {path}: no such directory (give a local image-classification model)", option="nsfw_model"
            )
        if not 0.0 <= threshold <= 1.0:
            raise KoalaError(f"NSFW threshold {threshold}: must be between 0 and 1", option="nsfw_threshold")
        try:
            self.model = AutoModelForImageClassification.from_pretrained(path).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise KoalaError(
                f"NSFW model {path}: cannot load an image classifier and its image processor ({err})",
                option="nsfw_model",
            ) from err
        labels = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        if label.lower() not in labels:
            raise KoalaError(
                f"NSFW label {label!r} is not a class of {path}/config.json (id2label has "
                f"{sorted(self.model.config.id2label.values())}); choose one of those",
                option="nsfw_label",
            )
        self.index = labels[label.lower()]
        self.label, self.threshold, self.path, self.device = label, threshold, path, device

    @torch.no_grad()
    def scores(self, images) -> list[float]:
        """Probability of ``label`` for each PIL image."""
        if not images:
            return []
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        probs = self.model(**inputs).logits.float().softmax(-1)
        return probs[:, self.index].tolist()

    def flags(self, images) -> list[tuple[bool, float]]:
        return [(s > self.threshold, s) for s in self.scores(images)]
